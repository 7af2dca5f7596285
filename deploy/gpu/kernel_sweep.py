"""Tile shapes of the fast codec kernels (encode_groups_kernel, decode_groups_kernel) on a GPU: an
experiment that picks the constants of `common.quant.kernels._groups_geometry`, not a test.

Whole cache at Llama-3.1-8B's KV shape, (32 layers, 8 KV heads, T tokens, 128) bf16, one launch per
tensor (`kernels.encode` on the 4-D view; the finite check's flag read once, at the end, as the wire
reads it with the payload's host copy). Prints GB/s of bf16 input and the ratio to a device copy
of the same tensor in the same run, for keys per channel (the view transposed) and values per token:

    python3 deploy/gpu/kernel_sweep.py [TOKENS ...]
"""

from __future__ import annotations

import contextlib
import sys

import torch
import triton
import triton.language as tl

from channel.bench_gpu import cuda_seconds, warm_up
from common.quant import kernels
from common.quant.uniform import Uniform


@triton.jit
def _roof(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """Read bf16, write a byte per element: the memory roofline of an int8 encoder."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    x = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, (x * 8.0).to(tl.int32).to(tl.uint8), mask=ok)


@contextlib.contextmanager
def geometry(**override):
    shipped = kernels._groups_geometry

    def patched(*args):
        meta = shipped(*args)
        if meta is None:
            return None
        key = "transposed" if meta["TRANSPOSE"] else "plain"
        return {**meta, **override.get(key, {})}

    kernels._groups_geometry = patched
    try:
        yield
    finally:
        kernels._groups_geometry = shipped


def main(token_counts: list[int]) -> None:
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    for tokens in token_counts:
        x = torch.randn(32, 8, tokens, 128, device="cuda", dtype=torch.bfloat16,
                        generator=torch.Generator("cuda").manual_seed(0))
        nbytes = x.numel() * 2
        warm_up()
        copy_s = cuda_seconds(lambda: x.clone())
        print(f"\ntokens={tokens}: copy {nbytes / copy_s / 1e9:.0f} GB/s ({copy_s * 1e6:.0f} us)", flush=True)

        def report(label, seconds):
            print(f"  {label:52s} {nbytes / seconds / 1e9:6.0f} GB/s  x{copy_s / seconds:.2f}", flush=True)

        y = torch.empty(x.numel(), dtype=torch.uint8, device="cuda")
        report("roof: bf16 in, a byte out", cuda_seconds(lambda: _roof[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)))
        del y
        target = torch.empty_like(x)
        for bits in (8, 4):
            q = Uniform(bits, 32)
            for name, view, out_view, key in (("K/chan", x.transpose(2, 3), target.transpose(2, 3), "transposed"),
                                              ("V/tok", x, target, "plain")):
                out = kernels.encode(q, view, check=False)
                decoded = kernels.decode(q, out, torch.empty_like(out_view))
                shapes = [dict(NG=2), dict(NG=8), dict(BR=64, num_warps=2), dict(PAIR=False)] \
                    if key == "transposed" else [dict(BR=8), dict(BR=32, num_warps=2)]
                flag = torch.zeros(1, dtype=torch.int32, device="cuda")
                for shape in [{}] + shapes:
                    label = " ".join(f"{k} {v}" for k, v in shape.items()) or "shipped"
                    with geometry(**{key: shape}):
                        same = torch.equal(kernels.encode(q, view, check=False), out)
                        kernels.decode(q, out, out_view)
                        same = same and torch.equal(out_view, decoded)
                        enc = cuda_seconds(lambda: kernels.encode(q, view, out=out, flag=flag))
                        dec = cuda_seconds(lambda: kernels.decode(q, out, out_view))
                        if not shape:
                            report(f"int{bits} {name} encode shipped, check synced", cuda_seconds(
                                lambda: kernels.encode(q, view, out=out, check=True)))
                            report(f"int{bits} {name} encode shipped, no check", cuda_seconds(
                                lambda: kernels.encode(q, view, out=out, check=False)))
                    report(f"int{bits} {name} encode {label}" + ("" if same else " DIFFERS"), enc)
                    report(f"int{bits} {name} decode {label}", dec)
                del out
        del x, target
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main([int(t) for t in sys.argv[1:]] or [4096, 32768])
