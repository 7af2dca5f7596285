"""How many instructions the fast encoder runs per element, on a machine without a GPU: triton
compiles `encode_groups_kernel` for sm_90 (an H100 or H200) with its bundled ptxas, and cuobjdump
lists the SASS. The kernel has no loops, so the listing is what one program runs once. An
experiment that guided the kernels (Nsight Compute found them bound by their instructions), not a
test:

    .venv/bin/python deploy/gpu/sass_count.py [--show]

Prints, for keys per channel and values per token at int8/int4/int2, the SASS instructions of a
program, warp instructions per element, and with --show the most frequent opcodes.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.getcwd())
from common.quant import triton_kernels as tk  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_encoder(bits: int, transpose: bool, ng: int, br: int, num_warps: int = 1):
    """The kernel as kernels._encode launches it on a whole (layers, heads, tokens, 128) bf16 cache:
    pointers and sizes 16-divisible, the contiguous stride 1, keys' token stride 128."""
    fn = tk.encode_groups_kernel
    consts = dict(KIND=0, BITS=bits, GROUP=32, NG=ng, BR=br, TRANSPOSE=transpose, CHECK=True, PAIR=transpose,
                  WHOLE=True, COL_STRIDE=128 if transpose else 0)
    consts["x_sr" if transpose else "x_sc"] = 1
    types = {"x_ptr": "*bf16", "codes_ptr": "*u8", "params_ptr": "*u8", "flag_ptr": "*i32"}
    signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}
    divisible = [n for n in fn.arg_names if n not in consts and n not in ("flag_ptr", "channel_stride", "heads", "groups")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    return triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, enable_fp_fusion=False))


def sass(kernel) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        listing = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                                 check=True).stdout
    return [re.sub(r"^\s+/\*[0-9a-f]{4}\*/\s+", "", line).split(";")[0] for line in listing.splitlines()
            if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]


def main(show: bool) -> None:
    print(f"triton {triton.__version__}, sm_90, group 32, bf16 input, CHECK on")
    for bits in (8, 4, 2):
        for name, transpose, ng, br in (("keys per channel", True, 4, 32), ("values per token", False, 4, 16)):
            ins = sass(compile_encoder(bits, transpose, ng, br))
            elements = ng * 32 * br
            print(f"int{bits} {name:17s} (BR {br}, NG {ng}): {len(ins):5d} instructions a program, "
                  f"{len(ins) / elements:.3f} warp instructions an element")
            if show:
                ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", i).split()[0] for i in ins)
                print("   ", ", ".join(f"{op} {n}" for op, n in ops.most_common(14)))


if __name__ == "__main__":
    main("--show" in sys.argv)
