"""The Triton kernels of `common.quant.pca_fused`: each pass its torch reference's arithmetic, in the same order, with
IEEE divisions (`div_rn`), no fused multiply-adds (`enable_fp_fusion=False`) and bf16 rounded to nearest even by hand
(`triton_kernels._narrow`), so the values are the same bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.quant.pca_fused import BLOCK, BLOCK_TOKENS
from common.quant.triton_kernels import _narrow


@triton.jit
def _write_parts(row, column, width, x, SPLIT: tl.constexpr, mask):
    """x's bf16 parts at columns column, width + column (and 2 width + column) of the rows `row`: [x, x] or
    [high, high, low]."""
    high = _narrow(x, tl.bfloat16)
    tl.store(row + column, high, mask=mask)
    tl.store(row + width + column, high, mask=mask)
    if SPLIT:
        tl.store(row + 2 * width + column, _narrow(x - high.to(tl.float32), tl.bfloat16), mask=mask)


@triton.jit
def _operand(keys, k_head, k_token, k_dim, values, v_head, v_token, v_dim, cos, sin, r_head, r_token, r_dim,
             out, out_row, tokens, width, DIM: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, ROPE: tl.constexpr,
             SPLIT_KEYS: tl.constexpr, SPLIT_VALUES: tl.constexpr):
    h = tl.program_id(1)
    t = tl.program_id(0) * BT + tl.arange(0, BT)[:, None]
    d = tl.arange(0, BD)[None, :]  # BD: DIM rounded up to a power of two
    mask = (t < tokens) & (d < DIM)
    x = tl.load(keys + h * k_head + t * k_token + d * k_dim, mask=mask, other=0.0).to(tl.float32)
    if ROPE:  # rope.unrotate: (x cos - rotate_half(x) sin) / (cos^2 + sin^2)
        half: tl.constexpr = DIM // 2
        partner = tl.load(keys + h * k_head + t * k_token + ((d + half) % DIM) * k_dim, mask=mask,
                          other=0.0).to(tl.float32)
        rotated = tl.where(d < half, -partner, partner)
        c = tl.load(cos + h * r_head + t * r_token + d * r_dim, mask=mask, other=1.0)
        s = tl.load(sin + h * r_head + t * r_token + d * r_dim, mask=mask, other=0.0)
        x = tl.math.div_rn(x * c - rotated * s, c * c + s * s)
    row = out + t.to(tl.int64) * out_row
    column = h * DIM + d
    _write_parts(row, column, width, x, SPLIT_KEYS, mask)
    after = width * (3 if SPLIT_KEYS else 2)
    v = tl.load(values + h * v_head + t * v_token + d * v_dim, mask=mask, other=0.0).to(tl.float32)
    _write_parts(row + after, column, width, v, SPLIT_VALUES, mask)


def operand(keys: torch.Tensor, values: torch.Tensor, rope, out: torch.Tensor, split_keys: bool) -> None:
    _, heads, tokens, dim = keys.shape
    cos, sin = rope if rope is not None else (keys, keys)  # not read without ROPE
    _operand[(triton.cdiv(tokens, BLOCK_TOKENS), heads)](
        keys, *keys.stride()[1:], values, *values.stride()[1:], cos, sin, *cos.stride()[1:], out, out.stride(0),
        tokens, heads * dim, DIM=dim, BD=triton.next_power_of_2(dim), BT=BLOCK_TOKENS, ROPE=rope is not None,
        SPLIT_KEYS=split_keys, SPLIT_VALUES=values.dtype != torch.bfloat16, enable_fp_fusion=False)


@triton.jit
def _quantize(coords, coords_row, bias, steps, classes, models, class_scale, limits, out, out_row, flag, tokens, coded,
              rounding, class_tables, top, MAX_CLASS: tl.constexpr, CLASSES: tl.constexpr, BT: tl.constexpr,
              BC: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    j = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (t < tokens)[:, None] & (j < coded)[None, :]
    x = (tl.load(coords + t.to(tl.int64)[:, None] * coords_row + j[None, :], mask=mask, other=0.0)
         - tl.load(bias + j, mask=j < coded, other=0.0)[None, :])
    step = tl.load(steps + j, mask=j < coded, other=1.0)[None, :]
    model = tl.load(models + j, mask=j < coded, other=0)[None, :]
    if CLASSES:
        c = tl.load(classes + t, mask=t < tokens, other=0).to(tl.int32)
        c = tl.minimum(tl.maximum(c, -MAX_CLASS), MAX_CLASS)  # the caller's classes are in range; no load strays
        step = step * tl.load(class_scale + c + MAX_CLASS)[:, None]
        model = tl.minimum(tl.maximum(model + class_tables * c[:, None], 0), top)
    scaled = tl.math.div_rn(x, step)
    whole = tl.floor(tl.abs(scaled) + rounding)
    indices = tl.where(scaled < 0, -whole, tl.where(scaled > 0, whole, 0.0))
    limit = tl.load(limits + model, mask=mask, other=0.0)
    indices = tl.maximum(tl.minimum(indices, limit), -limit)
    indices = tl.where(scaled == scaled, indices, 0.0)  # NaN (flagged below) codes as 0: every index stays in range
    tl.store(out + t.to(tl.int64)[:, None] * out_row + j[None, :], indices.to(tl.int16), mask=mask)
    bad = tl.max(tl.max(tl.where(mask & ~(tl.abs(x) < float("inf")), 1, 0), axis=1), axis=0)
    tl.atomic_max(flag, bad, mask=bad > 0, sem="relaxed")


def quantize(coords, bias, steps, classes, models, class_scale, limits, rounding, class_tables, top, out, flag) -> None:
    tokens, coded = coords.shape
    bt, bc = BLOCK
    _quantize[(triton.cdiv(tokens, bt), triton.cdiv(coded, bc))](
        coords, coords.stride(0), bias, steps, classes if classes is not None else coords, models, class_scale, limits,
        out, out.stride(0), flag, tokens, coded, rounding, class_tables, top, MAX_CLASS=(len(class_scale) - 1) // 2,
        CLASSES=classes is not None, BT=bt, BC=bc, enable_fp_fusion=False)


@triton.jit
def _dequantize(indices, indices_row, classes, steps, class_scale, out, out_row, tokens, coded, half_bin,
                MAX_CLASS: tl.constexpr, CLASSES: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    j = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (t < tokens)[:, None] & (j < coded)[None, :]
    q = tl.load(indices + t.to(tl.int64)[:, None] * indices_row + j[None, :], mask=mask, other=0).to(tl.float32)
    step = tl.load(steps + j, mask=j < coded, other=0.0)[None, :]
    if CLASSES:
        c = tl.load(classes + t, mask=t < tokens, other=0).to(tl.int32)
        c = tl.minimum(tl.maximum(c, -MAX_CLASS), MAX_CLASS)
        step = step * tl.load(class_scale + c + MAX_CLASS)[:, None]
    y = (q + tl.where(q > 0, half_bin, tl.where(q < 0, -half_bin, 0.0))) * step
    _write_parts(out + t.to(tl.int64)[:, None] * out_row, j[None, :], coded, y, True, mask)


def dequantize(indices, classes, steps, class_scale, half_bin, out) -> None:
    tokens, coded = indices.shape
    bt, bc = BLOCK
    _dequantize[(triton.cdiv(tokens, bt), triton.cdiv(coded, bc))](
        indices, indices.stride(0), classes if classes is not None else indices, steps, class_scale, out,
        out.stride(0), tokens, coded, half_bin, MAX_CLASS=(len(class_scale) - 1) // 2, CLASSES=classes is not None,
        BT=bt, BC=bc, enable_fp_fusion=False)


@triton.jit
def _reconstruct(x, x_row, mean, cos, sin, r_head, r_token, r_dim, keys, values, tokens, width, DIM: tl.constexpr,
                 BD: tl.constexpr, BT: tl.constexpr, ROPE: tl.constexpr):
    h = tl.program_id(1)
    t = tl.program_id(0) * BT + tl.arange(0, BT)[:, None]
    d = tl.arange(0, BD)[None, :]
    mask = (t < tokens) & (d < DIM)
    row = x + t.to(tl.int64) * x_row
    column = h * DIM + d
    k = tl.load(row + column, mask=mask, other=0.0) + tl.load(mean + column, mask=d < DIM, other=0.0)
    if ROPE:  # rope.rotate: x cos + rotate_half(x) sin
        half: tl.constexpr = DIM // 2
        at = h * DIM + (d + half) % DIM
        partner = tl.load(row + at, mask=mask, other=0.0) + tl.load(mean + at, mask=d < DIM, other=0.0)
        rotated = tl.where(d < half, -partner, partner)
        c = tl.load(cos + h * r_head + t * r_token + d * r_dim, mask=mask, other=0.0)
        s = tl.load(sin + h * r_head + t * r_token + d * r_dim, mask=mask, other=0.0)
        k = k * c + rotated * s
    v = tl.load(row + width + column, mask=mask, other=0.0) + tl.load(mean + width + column, mask=d < DIM, other=0.0)
    at = (h * tokens + t).to(tl.int64) * DIM + d
    tl.store(keys + at, _narrow(k, keys.dtype.element_ty), mask=mask)
    tl.store(values + at, _narrow(v, values.dtype.element_ty), mask=mask)


def reconstruct(x, mean, rope, keys, values) -> None:
    _, heads, tokens, dim = keys.shape
    cos, sin = rope if rope is not None else (x, x)
    strides = cos.stride()[1:] if rope is not None else (0, 0, 0)
    _reconstruct[(triton.cdiv(tokens, BLOCK_TOKENS), heads)](
        x, x.stride(0), mean, cos, sin, *strides, keys, values, tokens, heads * dim, DIM=dim,
        BD=triton.next_power_of_2(dim), BT=BLOCK_TOKENS,
        ROPE=rope is not None, enable_fp_fusion=False)
