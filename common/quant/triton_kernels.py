"""The Triton kernels of the group-wise code quantizers: quantize + pack, and unpack + dequantize,
each in one pass over the tensor. `common.quant.kernels` launches them and decides when.

Every kernel mirrors its torch twin (`Uniform`, `NF4`) operation by operation, so that the bytes
and values are bit-identical (DESIGN invariant 9):
- inputs are read in their dtype and widened to fp32 in registers, as `x.float()` does;
- divisions are IEEE round-to-nearest (`div_rn`), as torch's on the CPU; the default Triton
  division is an approximation;
- rounding is half-to-even, as torch.round; codes are clamped to an integer range first, which
  commutes with rounding and keeps |q| < 2**22 for the rounding trick in `_round_even`;
- fp32 -> fp16 parameters round to nearest even, with the same subnormal-step fix-up as
  `Uniform._levels`;
- kernels are launched with `enable_fp_fusion=False`: `codes * scale + low` is two roundings in
  torch, and must not become one fma.

A launch covers a 4-D view (payloads, heads, rows, cols), of any strides: each payload is the
matrix (heads * rows, cols), groups run along cols. Keys per channel are the view
keys.transpose(2, 3) of (1, heads, tokens, head_dim), read in place. One program takes a tile of
BR rows of one head and NG whole groups of columns: its statistics, parameters and codes need no
other program's data.

Codes are packed as `common.quant.packing` lays them out: n codes of b bits in ceil(n * b / 8)
bytes, least significant bit first. UC codes (8 / gcd(b, 8)) fill UB whole bytes (b / gcd(b, 8)),
and every tile starts on a unit, so a program's bytes are its own as long as every row of the
matrix starts on a byte (cols * b % 8 == 0). Otherwise the encoder packs each row into a
byte-padded scratch row, and `compact_kernel` shifts the rows together into the dense stream.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The quantizer a launch runs (the KIND constexpr), numbered as common.quant.kernels numbers them.
ASYM, SYM, SIGN, NF4 = (tl.constexpr(kind) for kind in range(4))
FP16_MAX = tl.constexpr(65504.0)
FP16_MIN_NORMAL = tl.constexpr(2.0**-14)


@triton.jit
def _round_even(q):
    # |q| < 2**22: adding 1.5 * 2**23 moves q into a binade whose spacing is 1, so the fp32 add
    # rounds it to an integer, half to even, exactly as torch.round.
    return (q + 12582912.0) - 12582912.0


@triton.jit
def _group_scale(x3, ok3, mean, KIND: tl.constexpr, BITS: tl.constexpr):
    """x3: (BR, NG, GP) fp32, ok3 its mask -> the fp16 (scale, low) of each group, (BR, NG) each.

    Masked lanes are the group's padding: repeating the last column (base.group_view) changes no
    minimum or maximum, so leaving them out gives the same statistics."""
    if KIND == ASYM:
        any_ok = tl.max(ok3.to(tl.int32), axis=2) > 0
        high = tl.where(any_ok, tl.max(tl.where(ok3, x3, float("-inf")), axis=2), 0.0)
        low = tl.where(any_ok, tl.min(tl.where(ok3, x3, float("inf")), axis=2), 0.0)
        scale = tl.math.div_rn(high - low, (2**BITS - 1) * 1.0)
    elif KIND == SIGN:
        scale = mean
        low = scale
    else:
        absmax = tl.max(tl.where(ok3, tl.abs(x3), 0.0), axis=2)
        if KIND == SYM:
            scale = tl.math.div_rn(absmax, (2 ** (BITS - 1) - 1) * 1.0)
        else:
            scale = absmax
        low = scale
    stored = scale.to(tl.float16)
    if KIND != NF4:
        # Uniform._levels: a step below fp16's normal range, rounded down, goes up one fp16 step.
        rounded_down = (stored.to(tl.float32) < scale) & (scale < FP16_MIN_NORMAL)
        stored = tl.where(rounded_down, (stored.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True), stored)
    return stored, low.to(tl.float16)


@triton.jit
def _codes(x, stored, low, mid_ptr, KIND: tl.constexpr, BITS: tl.constexpr):
    """x fp32, with its group's fp16 scale `stored` and `low` (broadcastable) -> int32 codes."""
    scale = stored.to(tl.float32)
    safe = tl.where(scale > 0, scale, 1.0)
    if KIND == ASYM:
        q = tl.math.div_rn(x - low.to(tl.float32), safe)
        code = _round_even(tl.minimum(tl.maximum(q, 0.0), (2**BITS - 1) * 1.0)).to(tl.int32)
    elif KIND == SYM:
        half: tl.constexpr = 2 ** (BITS - 1) - 1
        q = tl.math.div_rn(x, safe)
        code = (_round_even(tl.minimum(tl.maximum(q, -half * 1.0), half * 1.0)) + half).to(tl.int32)
    elif KIND == SIGN:
        code = (x >= 0).to(tl.int32)
    else:
        # torch.bucketize(v, midpoints, right=False): how many midpoints lie strictly below v.
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, safe), -1.0), 1.0)
        code = tl.zeros(v.shape, tl.int32)
        for i in tl.static_range(15):
            code += (v > tl.load(mid_ptr + i)).to(tl.int32)
    return code


@triton.jit
def _store_half(ptr, value, mask):
    bits = value.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    tl.store(ptr, (bits & 0xFF).to(tl.uint8), mask=mask)
    tl.store(ptr + 1, (bits >> 8).to(tl.uint8), mask=mask)


@triton.jit
def _load_half(ptr, mask):
    bits = tl.load(ptr, mask=mask, other=0).to(tl.int32) | (tl.load(ptr + 1, mask=mask, other=0).to(tl.int32) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _narrow(value, dtype: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even as torch's .to(dtype). bf16 is rounded by hand: the
    interpreter truncates, and one code path for both keeps CI testing what the GPU runs."""
    if dtype == tl.bfloat16:
        bits = value.to(tl.int32, bitcast=True)
        bits = tl.where(value != value, 0x7FC0, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)
        return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return value.to(dtype)


@triton.jit
def encode_kernel(
    x_ptr, x_sp, x_sh, x_sr, x_sc, heads, rows, cols,
    codes_ptr, codes_sp, row_bytes,
    params_ptr, params_sp, groups,
    mean_ptr, mid_ptr, flag_ptr,
    KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, NG: tl.constexpr,
    BR: tl.constexpr, BCW: tl.constexpr, UC: tl.constexpr, UB: tl.constexpr, UBP: tl.constexpr,
    CHECK: tl.constexpr,
):
    """One tile: rows [r0, r0 + BR) of head h of payload p, groups [NG * pid1, NG * pid1 + NG).

    Codes go to codes_ptr + p * codes_sp + m * row_bytes (m = h * rows + r, the matrix row), the
    fp16 parameters to params_ptr + p * params_sp, (m, group, param) in row-major order."""
    pid_ph = tl.program_id(2)
    p = pid_ph // heads
    h = pid_ph % heads
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = r < rows
    m = h * rows + r
    c0 = tl.program_id(1) * (NG * GROUP)
    x_base = x_ptr + p.to(tl.int64) * x_sp + h.to(tl.int64) * x_sh

    j = tl.arange(0, NG)
    e = tl.arange(0, GP)
    col3 = c0 + j[:, None] * GROUP + e[None, :]
    ok3 = row_ok[:, None, None] & ((e[None, :] < GROUP) & (col3 < cols))[None, :, :]
    x3 = tl.load(x_base + r[:, None, None] * x_sr + col3[None, :, :] * x_sc, mask=ok3, other=0.0).to(tl.float32)
    if CHECK:  # check_finite's conditions; the host raises its error
        bad = (ok3 & ((x3 != x3) | (tl.abs(x3) > FP16_MAX))).to(tl.int32)
        found = tl.max(tl.max(tl.max(bad, axis=2), axis=1), axis=0)
        tl.atomic_max(flag_ptr, found, mask=found > 0)

    gj = tl.program_id(1) * NG + j
    if KIND == SIGN:
        mean = tl.load(mean_ptr + p.to(tl.int64) * rows * heads * groups + m[:, None] * groups + gj[None, :],
                       mask=row_ok[:, None] & (gj < groups)[None, :], other=0.0)
    else:
        mean = 0.0
    stored, low = _group_scale(x3, ok3, mean, KIND, BITS)

    NP: tl.constexpr = 2 if KIND == ASYM else 1
    p_ok = row_ok[:, None] & (gj < groups)[None, :]
    p_ptr = params_ptr + p.to(tl.int64) * params_sp + (m[:, None] * groups + gj[None, :]) * (2 * NP)
    _store_half(p_ptr, stored, p_ok)
    if KIND == ASYM:
        _store_half(p_ptr + 2, low, p_ok)

    if GP == GROUP:  # the tile's columns are contiguous: reuse the statistics tile
        code = tl.reshape(tl.where(ok3, _codes(x3, stored[:, :, None], low[:, :, None], mid_ptr, KIND, BITS), 0),
                          (BR, BCW))
    else:  # a group of odd size: read the columns again, as one row segment, and gather parameters
        k = tl.arange(0, BCW)
        col = c0 + k
        ok = row_ok[:, None] & ((k < NG * GROUP) & (col < cols))[None, :]
        x = tl.load(x_base + r[:, None] * x_sr + col[None, :] * x_sc, mask=ok, other=0.0).to(tl.float32)
        which = tl.broadcast_to(tl.minimum(k // GROUP, NG - 1)[None, :], (BR, BCW))
        code = tl.where(ok, _codes(x, tl.gather(stored, which, 1), tl.gather(low, which, 1), mid_ptr, KIND, BITS), 0)

    # Pack UC codes into UB bytes; the tile starts on a unit (NG * GROUP % UC == 0).
    c_base = codes_ptr + p.to(tl.int64) * codes_sp + m * row_bytes
    limit = tl.minimum(row_bytes, (c0 + NG * GROUP) * BITS // 8)
    NU: tl.constexpr = BCW // UC
    u = tl.arange(0, NU)
    if BITS == 8:
        byte_at = c0 + u
        tl.store(c_base[:, None] + byte_at[None, :], code.to(tl.uint8), mask=row_ok[:, None] & (byte_at < limit)[None, :])
    elif UB == 1:
        units = tl.reshape(code, (BR, NU, UC))
        byte = tl.sum(units << (tl.arange(0, UC) * BITS)[None, None, :], axis=2)
        byte_at = c0 * BITS // 8 + u
        tl.store(c_base[:, None] + byte_at[None, :], byte.to(tl.uint8), mask=row_ok[:, None] & (byte_at < limit)[None, :])
    else:
        units = tl.reshape(code, (BR, NU, UC)).to(tl.int64)
        word = tl.sum(units << (tl.arange(0, UC) * BITS).to(tl.int64)[None, None, :], axis=2)
        kb = tl.arange(0, UBP)
        byte = (word[:, :, None] >> (kb * 8).to(tl.int64)[None, None, :]) & 0xFF
        byte_at = c0 * BITS // 8 + u[:, None] * UB + kb[None, :]
        ok = row_ok[:, None, None] & ((kb < UB)[None, :] & (byte_at < limit))[None, :, :]
        tl.store(c_base[:, None, None] + byte_at[None, :, :], byte.to(tl.uint8), mask=ok)


@triton.jit
def compact_kernel(scratch_ptr, scratch_sp, out_ptr, out_sp, row_bytes, row_bits, code_bytes, total_bits,
                   BLOCK: tl.constexpr, SHORT_ROWS: tl.constexpr):
    """Byte-padded rows of row_bits bits each -> the dense stream: output byte i holds stream bits
    [8i, 8i + 8), taken from the row(s) they lie in."""
    p = tl.program_id(1)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < code_bytes
    src = scratch_ptr + p.to(tl.int64) * scratch_sp
    first = i.to(tl.int64) * 8
    if SHORT_ROWS:  # rows under a byte: gather bit by bit
        byte = tl.zeros([BLOCK], tl.int32)
        for t in tl.static_range(8):
            bit = first + t
            row = bit // row_bits
            at = bit - row * row_bits
            b = tl.load(src + row * row_bytes + (at >> 3), mask=ok & (bit < total_bits), other=0).to(tl.int32)
            byte |= ((b >> (at & 7).to(tl.int32)) & 1) << t
    else:  # a byte spans at most two rows
        row = first // row_bits
        at = first - row * row_bits
        here = src + row * row_bytes + (at >> 3)
        b0 = tl.load(here, mask=ok, other=0).to(tl.int32)
        b1 = tl.load(here + 1, mask=ok & ((at >> 3) + 1 < row_bytes), other=0).to(tl.int32)
        bits = ((b0 | (b1 << 8)) >> (at & 7).to(tl.int32)) & 0xFF
        left = (row_bits - at).to(tl.int32)  # bits of this row from `at` on
        spill = ok & (left < 8) & (first + left < total_bits)
        nxt = tl.load(src + (row + 1) * row_bytes, mask=spill, other=0).to(tl.int32)
        keep = tl.where(left < 8, (1 << tl.minimum(left, 8)) - 1, 0xFF)
        byte = (bits & keep) | tl.where(spill, (nxt << tl.minimum(left, 8)) & 0xFF, 0)
    tl.store(out_ptr + p.to(tl.int64) * out_sp + i, byte.to(tl.uint8), mask=ok)


@triton.jit
def decode_kernel(
    blob_ptr, blob_sp, code_bytes, row_bytes, groups,
    y_ptr, y_sp, y_sh, y_sr, y_sc, heads, rows, cols,
    book_ptr,
    KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, NG: tl.constexpr,
    BR: tl.constexpr, BCW: tl.constexpr, UC: tl.constexpr, UB: tl.constexpr, UBP: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """The inverse of encode_kernel, on the same tiles, into y: (payloads, heads, rows, cols) of any strides."""
    pid_ph = tl.program_id(2)
    p = pid_ph // heads
    h = pid_ph % heads
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = r < rows
    m = h * rows + r
    c0 = tl.program_id(1) * (NG * GROUP)
    blob = blob_ptr + p.to(tl.int64) * blob_sp

    j = tl.arange(0, NG)
    gj = tl.program_id(1) * NG + j
    NP: tl.constexpr = 2 if KIND == ASYM else 1
    p_ok = row_ok[:, None] & (gj < groups)[None, :]
    p_ptr = blob + code_bytes + (m[:, None] * groups + gj[None, :]) * (2 * NP)
    scale = _load_half(p_ptr, p_ok)
    if KIND == ASYM:
        low = _load_half(p_ptr + 2, p_ok)
    else:
        low = scale

    k = tl.arange(0, BCW)
    col = c0 + k
    ok = row_ok[:, None] & ((k < NG * GROUP) & (col < cols))[None, :]
    MASK: tl.constexpr = (1 << BITS) - 1
    if ALIGNED:  # rows start on a byte: read whole units
        NU: tl.constexpr = BCW // UC
        u = tl.arange(0, NU)
        c_base = blob + m * row_bytes
        if UB == 1:
            byte_at = c0 * BITS // 8 + u
            byte = tl.load(c_base[:, None] + byte_at[None, :], mask=row_ok[:, None] & (byte_at < row_bytes)[None, :],
                           other=0).to(tl.int32)
            if BITS == 8:
                code = byte
            else:
                code = tl.reshape((byte[:, :, None] >> (tl.arange(0, UC) * BITS)[None, None, :]) & MASK, (BR, BCW))
        else:
            kb = tl.arange(0, UBP)
            byte_at = c0 * BITS // 8 + u[:, None] * UB + kb[None, :]
            b_ok = row_ok[:, None, None] & ((kb < UB)[None, :] & (byte_at < row_bytes))[None, :, :]
            byte = tl.load(c_base[:, None, None] + byte_at[None, :, :], mask=b_ok, other=0).to(tl.int64)
            word = tl.sum(byte << (kb * 8).to(tl.int64)[None, None, :], axis=2)
            code = tl.reshape((word[:, :, None] >> (tl.arange(0, UC) * BITS).to(tl.int64)[None, None, :]) & MASK,
                              (BR, BCW)).to(tl.int32)
    else:  # rows start mid-byte: each code from the two bytes it may straddle
        bit = (m[:, None].to(tl.int64) * cols + col[None, :]) * BITS
        at = bit >> 3
        b0 = tl.load(blob + at, mask=ok, other=0).to(tl.int32)
        b1 = tl.load(blob + at + 1, mask=ok & (at + 1 < code_bytes), other=0).to(tl.int32)
        code = ((b0 | (b1 << 8)) >> (bit & 7).to(tl.int32)) & MASK

    if GP == GROUP:
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BR, NG, GROUP)), (BR, BCW))
        low = tl.reshape(tl.broadcast_to(low[:, :, None], (BR, NG, GROUP)), (BR, BCW))
    else:
        which = tl.broadcast_to(tl.minimum(k // GROUP, NG - 1)[None, :], (BR, BCW))
        scale = tl.gather(scale, which, 1)
        low = tl.gather(low, which, 1)

    level = code.to(tl.float32)
    if KIND == ASYM:
        value = level * scale + low  # two roundings: launched without fp fusion
    elif KIND == SYM:
        value = (level - (2 ** (BITS - 1) - 1)) * scale
    elif KIND == SIGN:
        value = (2 * level - 1) * scale
    else:
        value = tl.load(book_ptr + code, mask=ok, other=0.0) * scale
    y = y_ptr + p.to(tl.int64) * y_sp + h.to(tl.int64) * y_sh
    tl.store(y + r[:, None] * y_sr + col[None, :] * y_sc, _narrow(value, y_ptr.dtype.element_ty), mask=ok)
