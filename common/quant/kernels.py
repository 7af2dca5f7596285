"""Fused codec kernels for the group-wise code quantizers (Uniform int1..int8, NF4), and the one
place that decides when they run.

The torch implementations in `uniform.py` and `nf4.py` are the CPU path and the reference: the
kernels (`common.quant.triton_kernels`) produce the same bytes and the same decoded values, bit
for bit (DESIGN invariant 9; tests/common/quant/test_kernels.py checks it on the CPU through
Triton's interpreter, and the GPU run checked CUDA kernels against torch on the CPU). One
exception: int1 sym's scale is mean |x|, whose float sum torch orders differently on each device;
the kernels take that mean from torch on the tensor's device, so they match torch there.

Dispatch: `use_kernels(quantizer, tensor)` is the only decision. KVWIRE_KERNELS (the settings'
`kernels`, read once per process; `forced(path)` overrides it in a block) picks the path:
- auto (default): the kernels for tensors on CUDA when triton imports, torch otherwise;
- torch: always torch;
- triton: always the kernels; on a CPU tensor that needs TRITON_INTERPRET=1 (set before triton
  is first imported), else it is an error.

Entry points, for a matrix or a whole KV tensor (`encode`/`decode` take a 4-D view of any strides,
so per-channel keys are read and written in place, with no transposed copy):
- encode(quantizer, x, check=True): x (payloads, heads, rows, cols) -> (payloads, size) uint8, each
  row the payload `quantizer.encode` gives for the (heads * rows, cols) matrix;
- decode(quantizer, payload, out): the inverse, written into `out` (payloads, heads, rows, cols);
- encode_kv / decode_kv: KVCodec's payload of one layer's keys and values, or of stacked layers
  (layers, heads, tokens, head_dim), one launch per tensor.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

from common.quant.base import QuantError, check_finite, group_view, num_groups
from common.settings import KERNEL_PATHS, get_settings

ENV = "KVWIRE_KERNELS"
MODES = KERNEL_PATHS
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ASYM, SYM, SIGN, NF4_KIND = range(4)  # the KIND of a launch (triton_kernels.ASYM, ...)
TILE = 8192  # elements a program takes (about): large enough to stream, small enough for registers


_forced: str | None = None  # set by `forced()`: benchmarks and tests compare the two paths in one process


@functools.cache
def _configured() -> str:
    # Read once per process: the dispatch runs per tensor, and building the settings takes about a millisecond.
    return get_settings().kernels


def mode() -> str:
    """The path asked for: `forced()`'s, else the settings' (KVWIRE_KERNELS)."""
    return _forced or _configured()


@contextlib.contextmanager
def forced(path: str):
    """Run the codecs on one path ("auto", "torch" or "triton") inside the block."""
    global _forced
    if path not in MODES:
        raise ValueError(f"kernel path {path!r}; expected one of {', '.join(MODES)}")
    before, _forced = _forced, path
    try:
        yield
    finally:
        _forced = before


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_kernels(quantizer, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether `quantizer` should encode `tensor`, or decode the payload `tensor` into `dtype`, with the kernels."""
    if tensor.numel() == 0 or tensor.dtype not in FLOATS + (torch.uint8,):
        return False
    return kernels_on(quantizer, tensor.device, dtype)


def kernels_on(quantizer, device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """Whether `quantizer`'s tensors on `device` (decoded into `dtype`) take the kernels."""
    chosen = mode()
    if chosen == "torch" or _spec(quantizer) is None or (dtype is not None and dtype not in FLOATS):
        return False
    if chosen == "auto":
        return device.type == "cuda" and triton_available()
    if not triton_available():
        raise RuntimeError(f"{ENV}=triton, but triton does not import")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{ENV}=triton on a {device} tensor needs TRITON_INTERPRET=1, set before triton is imported")
    return True


def _spec(quantizer) -> tuple[int, int, int] | None:
    """(kind, bits, group) of a quantizer the kernels implement; None for the others."""
    from common.quant.nf4 import NF4
    from common.quant.uniform import Uniform

    if type(quantizer) is NF4:
        return NF4_KIND, 4, quantizer.group
    if type(quantizer) is Uniform:
        kind = (SIGN if quantizer.bits == 1 else SYM) if quantizer.symmetric else ASYM
        return kind, quantizer.bits, quantizer.group
    return None


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _geometry(bits: int, group: int, rows: int, cols: int) -> dict:
    """Tile shape of encode_kernel and decode_kernel: NG whole groups of columns, of BR rows; the
    groups of a tile start on a packing unit."""
    unit_codes = 8 // math.gcd(bits, 8)  # UC codes fill UB whole bytes
    unit_bytes = bits // math.gcd(bits, 8)
    gp = _pow2(group)
    want = max(8, min(256, _pow2(cols)))  # columns a tile should span
    if gp == group:
        ng = max(1, want // gp)
        bcw = ng * gp
    else:
        ng = unit_codes // math.gcd(group, unit_codes)
        while ng * group * 2 <= want:
            ng *= 2
        bcw = _pow2(ng * group)
    span = max(bcw, ng * gp)
    br = max(1, min(_pow2(rows), TILE // span))
    return dict(GROUP=group, GP=gp, NG=ng, BR=br, BCW=bcw, UC=unit_codes, UB=unit_bytes, UBP=_pow2(unit_bytes),
                num_warps=8 if br * span >= 4096 else 4)


def _rows_geometry(x: torch.Tensor, kind: int, bits: int, group: int, codes: torch.Tensor, row_stride: int) -> dict | None:
    """Tile shape of encode_rows_kernel, or None where it does not apply: it takes views whose rows
    are contiguous and columns strided (keys per channel), and unrolls a group (at most 128)."""
    if not (x.stride(2) == 1 and x.stride(3) != 1 and kind in (ASYM, SYM) and group <= 128 and group % 8 == 0):
        return None
    word = 0  # 3, 5, 6, 7 bits: units of 8 codes, stored byte by byte
    if 8 % bits == 0:
        word = next(w for w in (8, 4, 2, 1) if group % (w * 8 // bits) == 0 and row_stride % w == 0
                    and (codes.shape[0] == 1 or codes.stride(0) % w == 0) and codes.data_ptr() % w == 0)
    br = min(_pow2(x.shape[2]), 128)
    return dict(GROUP=group, NG=max(1, 32 // group), BR=br, WORD=word, num_warps=max(1, min(4, br // 32)))


def _groups_geometry(kind: int, bits: int, group: int, rows: int, cols: int, transpose: bool,
                     params: torch.Tensor) -> dict | None:
    """Tile shape of encode_groups_kernel and decode_groups_kernel, or None where they do not apply:
    Uniform of 8, 4 or 2 bits, groups a power of two (8 to 128), rows that start on a byte, fp16
    parameters 2-byte aligned (`params` is the payloads' parameter columns), and the view's columns
    (or, with transpose, its rows) contiguous. Sizes from a sweep on an H200 (deploy/gpu/kernel_sweep.py)."""
    if kind not in (ASYM, SYM) or bits not in (2, 4, 8) or group not in (8, 16, 32, 64, 128) or cols * bits % 8:
        return None
    if params.data_ptr() % 2 or (params.shape[0] > 1 and params.stride(0) % 2):
        return None
    if transpose:  # keys per channel: a channel per thread, four groups of its tokens, (scale, low) stored together
        pair = kind == ASYM and params.data_ptr() % 4 == 0 and (params.shape[0] == 1 or params.stride(0) % 4 == 0)
        return dict(GROUP=group, NG=4, BR=min(32, _pow2(rows)), TRANSPOSE=True, PAIR=pair, num_warps=1)
    ng = max(1, min(_pow2(num_groups(cols, group)), 256 // group))
    return dict(GROUP=group, NG=ng, BR=max(1, 2048 // (ng * group)), TRANSPOSE=False, PAIR=False, num_warps=1)


def _whole(meta: dict, rows: int, cols: int) -> bool:
    """Whether encode_groups_kernel's tiles fill the view (with TRANSPOSE), or its columns (without:
    the rows are clamped), so that it reads them without masks."""
    whole_cols = cols % (meta["NG"] * meta["GROUP"]) == 0
    return whole_cols and rows % meta["BR"] == 0 if meta["TRANSPOSE"] else whole_cols


def _transposed(x: torch.Tensor) -> bool:
    """Whether a (payloads, heads, rows, cols) view is best read along rows (keys per channel)."""
    return x.stride(3) != 1 and x.stride(2) == 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _grid(meta: dict, payloads: int, heads: int, rows: int, cols: int) -> tuple[int, int, int]:
    return (_cdiv(rows, meta["BR"]), _cdiv(cols, meta["NG"] * meta["GROUP"]), payloads * heads)


@functools.cache
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4's code book and bucketize midpoints, computed as nf4.py computes them."""
    from common.quant.nf4 import NF4_CODE_BOOK

    book = NF4_CODE_BOOK.to(device)
    return book, ((book[1:] + book[:-1]) / 2).contiguous()


def _group_means(x: torch.Tensor, group: int) -> torch.Tensor:
    """int1 sym's scale, mean |x| per group, by torch itself: the kernels cannot reproduce the order
    of torch's sum. x (payloads, heads, rows, cols) -> (payloads, heads * rows, groups) fp32."""
    payloads, heads, rows, cols = x.shape
    return torch.stack([group_view(x[p].reshape(heads * rows, cols).float(), group).abs().mean(dim=-1)
                        for p in range(payloads)])


def encode(quantizer, x: torch.Tensor, *, out: torch.Tensor | None = None, check: bool = True,
           flag: torch.Tensor | None = None) -> torch.Tensor:
    """x: (payloads, heads, rows, cols), float, any strides -> (payloads, size) uint8: payload p is
    `quantizer.encode(x[p].reshape(heads * rows, cols))`, byte for byte.

    out: a uint8 (payloads, size) tensor (rows may be strided) to write into. check: refuse NaN, Inf
    and magnitudes past fp16 with check_finite's QuantError (one device sync); False skips it.
    flag: an int32 device tensor of one zero instead: the kernels set it where check would refuse,
    with no sync, and the caller passes it to `refuse_flagged` once the payload is on the host."""
    payloads, heads, rows, cols = x.shape
    if out is None:
        out = torch.empty(payloads, quantizer.size(heads * rows, cols), dtype=torch.uint8, device=x.device)
    with _checked(check, flag, [x]) as flag:
        _encode(quantizer, x, out, flag)
    return out


@contextlib.contextmanager
def _checked(check: bool, flag: torch.Tensor | None, inputs: list[torch.Tensor]):
    """The flag the kernels set where check_finite would refuse `inputs`: the caller's `flag`, or,
    with check and no flag, one of its own, read (one sync) and refused on leaving; None without check."""
    if flag is not None or not check:
        yield flag
        return
    own = torch.zeros(1, dtype=torch.int32, device=inputs[0].device)
    yield own
    refuse_flagged(own, inputs)


def refuse_flagged(flag: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    """Raise check_finite's QuantError if the kernels set `flag` while encoding `inputs`."""
    if flag.item():
        for x in inputs:
            for matrix in x:
                check_finite(matrix)  # raises the torch path's error
        raise QuantError("input contains NaN or Inf, or a magnitude past fp16's range")


def _encode(quantizer, x: torch.Tensor, out: torch.Tensor, flag: torch.Tensor | None) -> None:
    from common.quant import triton_kernels as tk

    kind, bits, group = _spec(quantizer)
    payloads, heads, rows, cols = x.shape
    matrix_rows = heads * rows
    size = quantizer.size(matrix_rows, cols)
    if out.shape != (payloads, size) or out.dtype != torch.uint8 or out.stride(1) != 1:
        raise ValueError(f"out must be uint8 ({payloads}, {size}) with contiguous rows")
    code_bytes = (matrix_rows * cols * bits + 7) // 8
    row_bytes = (cols * bits + 7) // 8
    aligned = cols * bits % 8 == 0
    if aligned:  # rows start on a byte: pack straight into the payload
        codes, row_stride = out, row_bytes
    else:  # pack rows into a scratch buffer, rows 16 bytes aligned, then shift them together
        row_stride = -(-row_bytes // 16) * 16
        codes = torch.empty(payloads, matrix_rows * row_stride, dtype=torch.uint8, device=x.device)
    one = payloads == 1  # a zero payload stride keeps the compiler's alignment facts
    groups = num_groups(cols, group)
    flag_or_any = out if flag is None else flag
    params = out[:, code_bytes:]
    fast = _groups_geometry(kind, bits, group, rows, cols, _transposed(x), params)
    rows_meta = None if fast is not None else _rows_geometry(x, kind, bits, group, codes, row_stride)
    if fast is not None:
        tk.encode_groups_kernel[(_cdiv(rows, fast["BR"]), _cdiv(groups, fast["NG"]), payloads * heads)](
            x, 0 if one else x.stride(0), *x.stride()[1:], heads, rows, cols,
            out, 0 if one else out.stride(0), row_bytes,
            params, 0 if one else out.stride(0) // 2, groups,
            flag_or_any, x.stride(2),
            KIND=kind, BITS=bits, CHECK=flag is not None, WHOLE=_whole(fast, rows, cols),
            COL_STRIDE=x.stride(3) if fast["TRANSPOSE"] else 0, enable_fp_fusion=False, **fast)
    elif rows_meta is not None:
        tk.encode_rows_kernel[(_cdiv(rows, rows_meta["BR"]), _cdiv(groups, rows_meta["NG"]), payloads * heads)](
            x, 0 if one else x.stride(0), *x.stride()[1:], heads, rows, cols,
            codes, 0 if one else codes.stride(0), row_stride, row_bytes,
            params, 0 if one else out.stride(0), groups,
            flag_or_any,
            KIND=kind, BITS=bits, CHECK=flag is not None, enable_fp_fusion=False, **rows_meta)
    else:
        mean = _group_means(x, group) if kind == SIGN else out
        mids = _constants(x.device)[1] if kind == NF4_KIND else out
        meta = _geometry(bits, group, rows, cols)
        tk.encode_kernel[_grid(meta, payloads, heads, rows, cols)](
            x, 0 if one else x.stride(0), *x.stride()[1:], heads, rows, cols,
            codes, 0 if one else codes.stride(0), row_stride, row_bytes,
            params, 0 if one else out.stride(0), groups,
            mean, mids, flag_or_any,
            KIND=kind, BITS=bits, CHECK=flag is not None, enable_fp_fusion=False, **meta)
    if not aligned:
        block = 1024
        tk.compact_kernel[(_cdiv(code_bytes, block), payloads)](
            codes, codes.stride(0), row_stride, out, out.stride(0), row_bytes, cols * bits, code_bytes,
            matrix_rows * cols * bits, BLOCK=block, SHORT_ROWS=cols * bits < 8)


def decode(quantizer, payload: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """payload: (payloads, size) uint8 -> out: (payloads, heads, rows, cols), any float dtype and strides,
    written as `quantizer.decode(payload[p], heads * rows, cols, out.dtype)` reshaped."""
    from common.quant import triton_kernels as tk

    kind, bits, group = _spec(quantizer)
    payloads, heads, rows, cols = out.shape
    matrix_rows = heads * rows
    size = quantizer.size(matrix_rows, cols)
    if payload.shape != (payloads, size) or payload.dtype != torch.uint8 or payload.stride(1) != 1:
        raise QuantError(f"payload must be uint8 ({payloads}, {size}) with contiguous rows, got {tuple(payload.shape)}")
    code_bytes = (matrix_rows * cols * bits + 7) // 8
    one = payloads == 1
    fast = _groups_geometry(kind, bits, group, rows, cols, _transposed(out), payload[:, code_bytes:])
    if fast is not None:
        groups = num_groups(cols, group)
        tk.decode_groups_kernel[(_cdiv(rows, fast["BR"]), _cdiv(groups, fast["NG"]), payloads * heads)](
            payload, 0 if one else payload.stride(0), code_bytes, (cols * bits + 7) // 8, groups,
            out, 0 if one else out.stride(0), *out.stride()[1:], heads, rows, cols,
            KIND=kind, BITS=bits, enable_fp_fusion=False, **fast)
        return out
    book = _constants(payload.device)[0] if kind == NF4_KIND else payload
    meta = _geometry(bits, group, rows, cols)
    tk.decode_kernel[_grid(meta, payloads, heads, rows, cols)](
        payload, 0 if one else payload.stride(0), code_bytes, (cols * bits + 7) // 8, num_groups(cols, group),
        out, 0 if one else out.stride(0), *out.stride()[1:], heads, rows, cols,
        book,
        KIND=kind, BITS=bits, ALIGNED=cols * bits % 8 == 0, enable_fp_fusion=False, **meta)
    return out


def encode_matrix(quantizer, x: torch.Tensor) -> torch.Tensor:
    """quantizer.encode(x) for x (rows, cols): a flat uint8 payload."""
    return encode(quantizer, x[None, None])[0]


def decode_matrix(quantizer, blob: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """quantizer.decode(blob, rows, cols, dtype)."""
    out = torch.empty(rows, cols, dtype=dtype, device=blob.device)
    decode(quantizer, blob.contiguous().reshape(1, -1), out[None, None])
    return out


def kv_view(t: torch.Tensor, axis: str) -> torch.Tensor:
    """(layers, heads, tokens, head_dim) -> the (payloads, heads, rows, cols) view a KVCodec matrix
    is made of: per channel, rows are channels and cols tokens; per token, the reverse."""
    from common.quant.kv import CHANNEL

    return t.transpose(2, 3) if axis == CHANNEL else t


def encode_kv(quantizer, keys: torch.Tensor, values: torch.Tensor, key_axis: str, value_axis: str,
              *, check: bool = True, flag: torch.Tensor | None = None) -> torch.Tensor:
    """keys, values: (layers, heads, tokens, head_dim) -> (layers, bytes) uint8: row l is
    KVCodec(quantizer, key_axis, value_axis).encode(keys[l:l+1], values[l:l+1]). Two launches (four
    where rows do not start on a byte), and one sync for the check (none with `flag`: see encode)."""
    k_view, v_view = kv_view(keys, key_axis), kv_view(values, value_axis)
    k_size = quantizer.size(k_view.shape[1] * k_view.shape[2], k_view.shape[3])
    v_size = quantizer.size(v_view.shape[1] * v_view.shape[2], v_view.shape[3])
    out = torch.empty(keys.shape[0], k_size + v_size, dtype=torch.uint8, device=keys.device)
    with _checked(check, flag, [keys, values]) as flag:
        _encode(quantizer, k_view, out[:, :k_size], flag)
        _encode(quantizer, v_view, out[:, k_size:], flag)
    return out


def decode_kv(quantizer, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, key_axis: str,
              value_axis: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of encode_kv: payload (layers, bytes) -> keys, values of `shape` (layers, heads, tokens, head_dim)."""
    keys = torch.empty(shape, dtype=dtype, device=payload.device)
    values = torch.empty(shape, dtype=dtype, device=payload.device)
    k_view, v_view = kv_view(keys, key_axis), kv_view(values, value_axis)
    k_size = quantizer.size(k_view.shape[1] * k_view.shape[2], k_view.shape[3])
    decode(quantizer, payload[:, :k_size], k_view)
    decode(quantizer, payload[:, k_size:], v_view)
    return keys, values
