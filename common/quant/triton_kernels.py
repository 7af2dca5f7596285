"""The Triton kernels of the group-wise code quantizers: quantize + pack, and unpack + dequantize,
each in one pass over the tensor. `common.quant.kernels` launches them and decides when.

Every kernel mirrors its torch twin (`Uniform`, `NF4`) operation by operation, so that the bytes
and values are bit-identical (DESIGN invariant 9):
- inputs are read in their dtype and widened to fp32 in registers, as `x.float()` does;
- divisions are IEEE round-to-nearest (`div_rn`), as torch's on the CPU; the default Triton
  division is an approximation. Uniform codes multiply by the reciprocal of their group's step,
  as `Uniform.encode` does (one division per group); NF4 divides each element;
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
other program's data. `encode_groups_kernel` and `decode_groups_kernel` are the fast pair for
the common case (Uniform of 8, 4 or 2 bits, power-of-two groups, rows that start on a byte): a
tile held as (rows, groups, group), so that a byte's codes stay in one thread (the encoder gives
keys per channel a channel per thread; the decoder transposes them in registers). `encode_kernel`
and `decode_kernel` take any view and any quantizer; `encode_rows_kernel` takes the other views
whose rows are contiguous (keys per channel) for the uniform quantizers, one row per thread.

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
    """fp32 -> int32, rounding half to even as torch.round, for 0 <= q + 2**22 < 2**23: adding
    1.5 * 2**23 moves q into a binade whose spacing is 1, so the fp32 add rounds it to an integer,
    which the sum's low mantissa bits then hold (no conversion instruction, which runs at an eighth
    of the rate of an add)."""
    return (q + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max(x, AXIS: tl.constexpr, NAN: tl.constexpr):
    """The maximum along AXIS; NAN: a NaN anywhere makes it NaN (the built-in may drop one)."""
    if NAN:
        return tl.reduce(x, AXIS, _max_nan)
    else:
        return tl.max(x, axis=AXIS)


@triton.jit
def _group_scale(x3, ok3, mean, KIND: tl.constexpr, BITS: tl.constexpr, CHECK: tl.constexpr, AXIS: tl.constexpr,
                 MASKED: tl.constexpr):
    """x3: fp32 with a group along AXIS, ok3 its mask (MASKED; without, every lane is a value) -> the
    fp16 (scale, low) of each group (x3's shape without AXIS), and whether the group holds a value
    check_finite refuses.

    Masked lanes are the group's padding: repeating the last column (base.group_view) changes no
    minimum or maximum, so leaving them out gives the same statistics. With CHECK, the maximum
    propagates a NaN, which the check then finds (|x| <= 65504 finds the infinities)."""
    if KIND == ASYM:
        if MASKED:
            high = _max(tl.where(ok3, x3, float("-inf")), AXIS, CHECK)
            low = tl.min(tl.where(ok3, x3, float("inf")), axis=AXIS)
        else:
            high = _max(x3, AXIS, CHECK)
            low = tl.min(x3, axis=AXIS)
        bad = (high > FP16_MAX) | (low < -FP16_MAX) | (high != high)
        if MASKED:
            empty = high < low  # a tile's groups past the end of the row
            high = tl.where(empty, 0.0, high)
            low = tl.where(empty, 0.0, low)
        scale = _div_odd(high - low, 2**BITS - 1)
    else:
        if KIND == SIGN and not CHECK:
            absmax = mean
        elif MASKED:
            absmax = _max(tl.where(ok3, tl.abs(x3), 0.0), AXIS, CHECK)
        else:
            absmax = _max(tl.abs(x3), AXIS, CHECK)
        if KIND == SIGN:
            scale = mean
        elif KIND == SYM:
            scale = _div_odd(absmax, 2 ** (BITS - 1) - 1)
        else:
            scale = absmax
        low = scale
        bad = (absmax > FP16_MAX) | (absmax != absmax)
    return _fp16_scale(scale, KIND), low.to(tl.float16), bad


@triton.jit
def _fp16_scale(scale, KIND: tl.constexpr):
    stored = scale.to(tl.float16)
    if KIND != NF4:
        # Uniform._levels: a step below fp16's normal range, rounded down, goes up one fp16 step.
        rounded_down = (stored.to(tl.float32) < scale) & (scale < FP16_MIN_NORMAL)
        stored = tl.where(rounded_down, (stored.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True), stored)
    return stored


@triton.jit
def _divide(num, den):
    """num / den, IEEE round to nearest, for den > 0 (NF4's per-element division). A zero numerator
    would send the GPU's division to its slow path; 0 / den is 0 anyway."""
    zero = num == 0
    return tl.where(zero, 0.0, tl.math.div_rn(tl.where(zero, 1.0, num), den))


@triton.jit
def _div_odd(x, D: tl.constexpr):
    """x / D, fp32 by an odd integer, rounded to nearest as an IEEE division (torch's), in three
    instructions instead of a division's ten: the fp64 product x * (1 / D) is within 2**-52 of the
    quotient, which lies at least 2**-25 / D from any midpoint between two fp32 numbers (x has 24
    significant bits and D is odd), so rounding the product to fp32 rounds the quotient."""
    if D == 1:
        return x
    else:
        return (x.to(tl.float64) * (tl.full([], 1.0, tl.float64) / D)).to(tl.float32)


@triton.jit
def _reciprocal(s):
    """1 / s, for fp32 s > 0 that holds an fp16 value, rounded to nearest as an IEEE division:
    an approximate reciprocal r (within 2**-22) and one Newton step in fp64, r * (2 - s * r), whose
    products are exact, are within 2**-43 of 1 / s, which lies at least 2**-36 from any midpoint
    between two fp32 numbers (s has 11 significant bits), so rounding to fp32 rounds the quotient."""
    r = tl.math.fdiv(tl.full(s.shape, 1.0, tl.float32), s).to(tl.float64)
    return (r + r * (1.0 - s.to(tl.float64) * r)).to(tl.float32)


@triton.jit
def _inverse(stored, KIND: tl.constexpr):
    """What `_codes` takes for a group's fp16 scale: Uniform multiplies by 1 / step (a division per
    group, not per element: `Uniform.encode` does the same), NF4 divides by the scale."""
    scale = stored.to(tl.float32)
    safe = tl.where(scale > 0, scale, 1.0)
    if KIND == ASYM or KIND == SYM:
        return _reciprocal(safe)
    else:
        return safe


@triton.jit
def _codes(x, inverse, low, mid_ptr, KIND: tl.constexpr, BITS: tl.constexpr):
    """x fp32, with its group's `_inverse(scale)` and fp16 `low` (broadcastable) -> int32 codes."""
    if KIND == ASYM:
        q = (x - low.to(tl.float32)) * inverse
        code = _round_even(tl.minimum(tl.maximum(q, 0.0), (2**BITS - 1) * 1.0))
    elif KIND == SYM:
        half: tl.constexpr = 2 ** (BITS - 1) - 1
        q = x * inverse
        code = _round_even(tl.minimum(tl.maximum(q, -half * 1.0), half * 1.0)) + half
    elif KIND == SIGN:
        code = (x >= 0).to(tl.int32)
    else:
        # torch.bucketize(v, midpoints, right=False): how many midpoints lie strictly below v.
        v = tl.minimum(tl.maximum(_divide(x, inverse), -1.0), 1.0)
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
    codes_ptr, codes_sp, row_stride, row_bytes,
    params_ptr, params_sp, groups,
    mean_ptr, mid_ptr, flag_ptr,
    KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, NG: tl.constexpr,
    BR: tl.constexpr, BCW: tl.constexpr, UC: tl.constexpr, UB: tl.constexpr, UBP: tl.constexpr,
    CHECK: tl.constexpr,
):
    """One tile: groups [NG * pid1, NG * pid1 + NG) of rows [r0, r0 + BR) of head h of payload p,
    laid out (group, position in group, row).

    Codes go to codes_ptr + p * codes_sp + m * row_stride (m = h * rows + r, the matrix row; row_bytes
    of them are the row's), the fp16 parameters to params_ptr + p * params_sp, (m, group, param)
    in row-major order."""
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
    ok3 = ((e[None, :] < GROUP) & (col3 < cols))[:, :, None] & row_ok[None, None, :]
    x3 = tl.load(x_base + col3[:, :, None] * x_sc + r[None, None, :] * x_sr, mask=ok3, other=0.0).to(tl.float32)

    gj = tl.program_id(1) * NG + j
    g_ok = (gj < groups)[:, None] & row_ok[None, :]
    if KIND == SIGN:
        mean = tl.load(mean_ptr + p.to(tl.int64) * rows * heads * groups + m[None, :] * groups + gj[:, None],
                       mask=g_ok, other=0.0)
    else:
        mean = 0.0
    stored, low, bad = _group_scale(x3, ok3, mean, KIND, BITS, CHECK, 1, True)
    if CHECK:  # check_finite's conditions; the host raises its error. No atomics unless some group is bad.
        tl.atomic_max(flag_ptr + tl.zeros([NG, BR], tl.int32), 1, mask=bad & g_ok, sem="relaxed")

    NP: tl.constexpr = 2 if KIND == ASYM else 1
    p_ptr = params_ptr + p.to(tl.int64) * params_sp + (m[None, :] * groups + gj[:, None]) * (2 * NP)
    _store_half(p_ptr, stored, g_ok)
    if KIND == ASYM:
        _store_half(p_ptr + 2, low, g_ok)

    if GP == GROUP:  # the tile's columns are contiguous: reuse the statistics tile
        code = tl.where(ok3, _codes(x3, _inverse(stored, KIND)[:, None, :], low[:, None, :], mid_ptr, KIND, BITS), 0)
        code = tl.reshape(code, (BCW, BR))
    else:  # a group of odd size: read the columns again, as one row segment, and gather parameters
        k = tl.arange(0, BCW)
        col = c0 + k
        ok = ((k < NG * GROUP) & (col < cols))[:, None] & row_ok[None, :]
        x = tl.load(x_base + col[:, None] * x_sc + r[None, :] * x_sr, mask=ok, other=0.0).to(tl.float32)
        which = tl.broadcast_to(tl.minimum(k // GROUP, NG - 1)[:, None], (BCW, BR))
        inverse = _inverse(stored, KIND)
        code = tl.where(ok, _codes(x, tl.gather(inverse, which, 0), tl.gather(low, which, 0), mid_ptr, KIND, BITS), 0)

    # Pack UC codes into UB bytes; the tile starts on a unit (NG * GROUP % UC == 0).
    c_base = codes_ptr + p.to(tl.int64) * codes_sp + m * row_stride
    limit = tl.minimum(row_bytes, (c0 + NG * GROUP) * BITS // 8)
    NU: tl.constexpr = BCW // UC
    u = tl.arange(0, NU)
    if BITS == 8:
        byte_at = c0 + u
        tl.store(c_base[None, :] + byte_at[:, None], code.to(tl.uint8), mask=(byte_at < limit)[:, None] & row_ok[None, :])
    elif UB == 1:
        units = tl.reshape(code, (NU, UC, BR))
        byte = tl.sum(units << (tl.arange(0, UC) * BITS)[None, :, None], axis=1)
        byte_at = c0 * BITS // 8 + u
        tl.store(c_base[None, :] + byte_at[:, None], byte.to(tl.uint8), mask=(byte_at < limit)[:, None] & row_ok[None, :])
    else:
        units = tl.reshape(code, (NU, UC, BR)).to(tl.int64)
        word = tl.sum(units << (tl.arange(0, UC) * BITS).to(tl.int64)[None, :, None], axis=1)
        kb = tl.arange(0, UBP)
        byte = (word[:, None, :] >> (kb * 8).to(tl.int64)[None, :, None]) & 0xFF
        byte_at = c0 * BITS // 8 + u[:, None] * UB + kb[None, :]
        ok = ((kb < UB)[None, :] & (byte_at < limit))[:, :, None] & row_ok[None, None, :]
        tl.store(c_base[None, None, :] + byte_at[:, :, None], byte.to(tl.uint8), mask=ok)


@triton.jit
def _pack(code, BR: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr):
    """(BR, NG, GROUP) codes of 8, 4 or 2 bits -> (BR, NG, GROUP * BITS // 8) uint8 bytes, the first
    code in the low bits. Splitting the last axis keeps a byte's codes in one thread. Narrowed to
    bytes here, before any layout change, so that the compiler sees that only the codes' low bits
    matter (and drops `_round_even`'s last subtraction, which leaves them as they are)."""
    UC: tl.constexpr = 8 // BITS
    NB: tl.constexpr = GROUP // UC
    if UC == 1:
        byte = code
    elif UC == 2:
        first, second = tl.split(tl.reshape(code, (BR, NG, NB, 2)))
        byte = first | (second << BITS)
    else:
        even, odd = tl.split(tl.reshape(code, (BR, NG, NB, 2, 2)))
        c0, c2 = tl.split(even)
        c1, c3 = tl.split(odd)
        byte = c0 | (c1 << BITS) | (c2 << (2 * BITS)) | (c3 << (3 * BITS))
    return byte.to(tl.uint8)


@triton.jit
def _unpack(byte, BITS: tl.constexpr):
    """The inverse of _pack: (BR, NG, NB) int32 bytes -> (BR, NG, NB * 8 // BITS) codes."""
    UC: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    if UC == 1:
        return byte
    elif UC == 2:
        return tl.interleave(byte & MASK, byte >> BITS)
    else:
        return tl.interleave(tl.interleave(byte & MASK, (byte >> (2 * BITS)) & MASK),
                             tl.interleave((byte >> BITS) & MASK, byte >> (3 * BITS)))


@triton.jit(do_not_specialize=["channel_stride"])
def encode_groups_kernel(
    x_ptr, x_sp, x_sh, x_sr, x_sc, heads, rows, cols,
    codes_ptr, codes_sp, row_bytes,
    params_ptr, params_sp, groups,
    flag_ptr, channel_stride,
    KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, NG: tl.constexpr, BR: tl.constexpr,
    TRANSPOSE: tl.constexpr, CHECK: tl.constexpr, PAIR: tl.constexpr, WHOLE: tl.constexpr, COL_STRIDE: tl.constexpr,
):
    """The fast encoder: Uniform of 8, 4 or 2 bits, groups a power of two, rows that start on a byte.
    One program takes BR rows and NG groups, held as (BR, NG, GROUP). Parameters are stored as fp16
    (params_ptr is 2-byte aligned, params_sp in fp16s); PAIR (asymmetric; params_ptr and params_sp
    4-byte aligned): a group's (scale, low) in one 4-byte store instead of two 2-byte ones; for keys
    per channel, whose rows lie far apart, each store fills an L2 sector of its own, so this halves
    the parameters' write traffic.

    The kernel is bound by its instructions as much as by memory (Nsight Compute), so:
    - TRANSPOSE (keys per channel: the view's rows, the channels, are contiguous): one channel per
      thread, its tokens in registers, so that a group's statistics, its parameters and its codes
      are the thread's own, with no shuffles (and no parameter computed twice). The loads of a
      token are coalesced across the warp's channels; the packed bytes alone change threads on the
      way out (see the store). channel_stride is x_sr again, a value triton does not
      specialize, so that the compiler does not see the channels as contiguous (it would read 8 of
      them per thread and spread a group's tokens over threads); COL_STRIDE is x_sc as a constant,
      so that a thread's loads take immediate offsets from one pointer. WHOLE: the tiles fill the
      view, and nothing is masked.
    - else (values per token: the columns are contiguous): the loads are vectors along the columns,
      and a group spans a few threads. The rows are clamped to the last one (its duplicates' stores
      are masked), and WHOLE: the tiles fill the columns, so no lane is masked.
    CHECK: a program that finds a value check_finite refuses sets the flag, with one atomic."""
    pid_ph = tl.program_id(2)
    p = pid_ph // heads
    h = pid_ph % heads
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    g = tl.program_id(1) * NG + tl.arange(0, NG)
    col = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    x_base = x_ptr + p.to(tl.int64) * x_sp + h.to(tl.int64) * x_sh
    NB: tl.constexpr = GROUP * BITS // 8
    NP: tl.constexpr = 2 if KIND == ASYM else 1
    m = h * rows + r
    if TRANSPOSE:
        ok = (r < rows)[:, None, None] & (col < cols)[None]
        first = x_base + (tl.program_id(1) * NG * GROUP).to(tl.int64) * COL_STRIDE + r[:, None, None] * channel_stride
        at = first + ((tl.arange(0, NG) * GROUP)[:, None] + tl.arange(0, GROUP)[None, :])[None] * COL_STRIDE
    else:
        ok = (col < cols)[None]
        at = x_base + tl.minimum(r, rows - 1)[:, None, None].to(tl.int64) * x_sr + col[None] * x_sc
    if WHOLE:
        x = tl.load(at).to(tl.float32)
    else:
        x = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    stored, low, bad = _group_scale(x, ok, 0.0, KIND, BITS, CHECK, 2, not WHOLE)
    g_ok = (r < rows)[:, None] & (g < groups)[None, :]
    if CHECK:
        hit = tl.max(tl.max(tl.where(bad & g_ok, 1, 0), axis=1), axis=0)
        tl.atomic_max(flag_ptr, hit, mask=hit > 0, sem="relaxed")
    byte = _pack(_codes(x, _inverse(stored, KIND)[:, :, None], low[:, :, None], x_ptr, KIND, BITS), BR, NG, GROUP, BITS)
    c_row = codes_ptr + p.to(tl.int64) * codes_sp + m.to(tl.int64) * row_bytes
    if TRANSPOSE:
        # A row's bytes as one axis: the compiler then spreads them over neighbouring threads (moved
        # there from the thread that made them), so that a store fills whole L2 sectors of a row.
        at = tl.program_id(1) * NG * NB + tl.arange(0, NG * NB)
        tl.store(c_row[:, None] + at[None, :], tl.reshape(byte, (BR, NG * NB)),
                 mask=(r < rows)[:, None] & (at < row_bytes)[None, :])
    else:
        at = g[:, None] * NB + tl.arange(0, NB)[None, :]
        tl.store(c_row[:, None, None] + at[None], byte, mask=(r < rows)[:, None, None] & (at < row_bytes)[None])
    p_ptr = params_ptr.to(tl.pointer_type(tl.float16)) + p.to(tl.int64) * params_sp + (m[:, None] * groups + g[None, :]) * NP
    if PAIR:  # (scale, low) in one 4-byte store
        word = (stored.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (low.to(tl.int16, bitcast=True).to(tl.int32) << 16)
        tl.store(p_ptr.to(tl.pointer_type(tl.int32)), word, mask=g_ok)
    else:
        tl.store(p_ptr, stored, mask=g_ok)
        if KIND == ASYM:
            tl.store(p_ptr + 1, low, mask=g_ok)


@triton.jit
def _dequantize(level, p_ptr, g_ok, KIND: tl.constexpr, BITS: tl.constexpr, AXIS: tl.constexpr, PAIR: tl.constexpr):
    """fp32 levels, with their groups' fp16 parameters at p_ptr (masked by g_ok; PAIR: scale and low
    in one 4-byte load), which broadcast along AXIS -> fp32 values, as Uniform.decode computes them."""
    if PAIR:
        word = tl.load(p_ptr.to(tl.pointer_type(tl.int32)), mask=g_ok, other=0)
        scale = tl.expand_dims((word & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32), AXIS)
        return level * scale + tl.expand_dims((word >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32), AXIS)
    scale = tl.expand_dims(tl.load(p_ptr, mask=g_ok, other=0.0).to(tl.float32), AXIS)
    if KIND == ASYM:
        return level * scale + tl.expand_dims(tl.load(p_ptr + 1, mask=g_ok, other=0.0).to(tl.float32), AXIS)
    else:
        return (level - (2 ** (BITS - 1) - 1)) * scale


@triton.jit
def decode_groups_kernel(
    blob_ptr, blob_sp, code_bytes, row_bytes, groups,
    y_ptr, y_sp, y_sh, y_sr, y_sc, heads, rows, cols,
    KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, NG: tl.constexpr, BR: tl.constexpr,
    TRANSPOSE: tl.constexpr, PAIR: tl.constexpr,
):
    """The inverse of encode_groups_kernel, on the same tiles (the blob's parameters 2-byte aligned).
    TRANSPOSE: the codes, a byte each, are transposed to (NG, GROUP, BR) and dequantized there, so
    that the stores run along the view's contiguous rows (transposing the values instead, two or four
    bytes each, measured slower: results/gpu/kernel_sweep_late_h200_session5.txt)."""
    pid_ph = tl.program_id(2)
    p = pid_ph // heads
    h = pid_ph % heads
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    g = tl.program_id(1) * NG + tl.arange(0, NG)
    m = h * rows + r
    NB: tl.constexpr = GROUP * BITS // 8
    at = g[:, None] * NB + tl.arange(0, NB)[None, :]
    blob = blob_ptr + p.to(tl.int64) * blob_sp
    byte = tl.load(blob + m[:, None, None].to(tl.int64) * row_bytes + at[None],
                   mask=(r < rows)[:, None, None] & (at < row_bytes)[None], other=0)
    level = _unpack(byte.to(tl.int32), BITS)
    NP: tl.constexpr = 2 if KIND == ASYM else 1
    p_ptr = (blob + code_bytes).to(tl.pointer_type(tl.float16))
    col = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    y = y_ptr + p.to(tl.int64) * y_sp + h.to(tl.int64) * y_sh
    if TRANSPOSE:
        level = tl.permute(level.to(tl.uint8), (1, 2, 0)).to(tl.float32)
        g_ok = (g < groups)[:, None] & (r < rows)[None, :]
        value = _dequantize(level, p_ptr + (m[None, :] * groups + g[:, None]) * NP, g_ok, KIND, BITS, 1, PAIR)
        tl.store(y + col[:, :, None].to(tl.int64) * y_sc + r[None, None, :] * y_sr, _narrow(value, y_ptr.dtype.element_ty),
                 mask=(col < cols)[:, :, None] & (r < rows)[None, None, :])
    else:
        g_ok = (r < rows)[:, None] & (g < groups)[None, :]
        value = _dequantize(level.to(tl.float32), p_ptr + (m[:, None] * groups + g[None, :]) * NP, g_ok, KIND, BITS, 2, PAIR)
        tl.store(y + r[:, None, None].to(tl.int64) * y_sr + col[None] * y_sc, _narrow(value, y_ptr.dtype.element_ty),
                 mask=(r < rows)[:, None, None] & (col < cols)[None])


@triton.jit
def encode_rows_kernel(
    x_ptr, x_sp, x_sh, x_sr, x_sc, heads, rows, cols,
    codes_ptr, codes_sp, row_stride, row_bytes,
    params_ptr, params_sp, groups,
    flag_ptr,
    KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, NG: tl.constexpr, BR: tl.constexpr,
    WORD: tl.constexpr, CHECK: tl.constexpr,
):
    """The encoder for views whose rows are contiguous and columns strided (keys per channel), for
    Uniform (not int1 sym) with GROUP * BITS % 8 == 0. A tile is one row per thread: loads of a
    column are coalesced across the warp's rows, a group's statistics and codes stay in its thread
    (a 2-D tile would vectorize along rows and reduce every group across warps), and codes leave in
    words of WORD bytes (1, 2, 4, 8; 0 for BITS 3, 5, 6, 7: a unit of 8 codes, byte by byte).

    Columns past the end of the row read the last column: that is base.group_view's padding."""
    pid_ph = tl.program_id(2)
    p = pid_ph // heads
    h = pid_ph % heads
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = r < rows
    m = h * rows + r
    x_row = x_ptr + p.to(tl.int64) * x_sp + h.to(tl.int64) * x_sh + r * x_sr
    c_row = codes_ptr + p.to(tl.int64) * codes_sp + m * row_stride
    NP: tl.constexpr = 2 if KIND == ASYM else 1
    CHUNK: tl.constexpr = WORD * 8 // BITS if WORD > 0 else 8
    for gi in tl.static_range(NG):
        gj = tl.program_id(1) * NG + gi
        first = gj * GROUP
        g_ok = row_ok & (gj < groups)
        if KIND == ASYM:
            high = tl.full([BR], float("-inf"), tl.float32)
            low = tl.full([BR], float("inf"), tl.float32)
        else:
            absmax = tl.zeros([BR], tl.float32)
        for t in tl.static_range(GROUP):
            v = tl.load(x_row + tl.minimum(first + t, cols - 1) * x_sc, mask=g_ok, other=0.0).to(tl.float32)
            if KIND == ASYM:
                if CHECK:  # a NaN must reach the check, which a plain max drops
                    high = tl.maximum(high, v, propagate_nan=tl.PropagateNan.ALL)
                    low = tl.minimum(low, v, propagate_nan=tl.PropagateNan.ALL)
                else:
                    high = tl.maximum(high, v)
                    low = tl.minimum(low, v)
            else:
                if CHECK:
                    absmax = tl.maximum(absmax, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)
                else:
                    absmax = tl.maximum(absmax, tl.abs(v))
        if KIND == ASYM:
            scale = _div_odd(high - low, 2**BITS - 1)
            bad = (high != high) | (high > FP16_MAX) | (low < -FP16_MAX)
        else:
            scale = _div_odd(absmax, 2 ** (BITS - 1) - 1)
            low = scale
            bad = (absmax != absmax) | (absmax > FP16_MAX)
        if CHECK:
            tl.atomic_max(flag_ptr + tl.zeros([BR], tl.int32), 1, mask=bad & g_ok, sem="relaxed")
        stored = _fp16_scale(scale, KIND)
        low = low.to(tl.float16)
        inverse = _inverse(stored, KIND)
        p_ptr = params_ptr + p.to(tl.int64) * params_sp + (m * groups + gj) * (2 * NP)
        _store_half(p_ptr, stored, g_ok)
        if KIND == ASYM:
            _store_half(p_ptr + 2, low, g_ok)

        for w in tl.static_range(GROUP // CHUNK):
            if WORD == 8 or WORD == 0:
                word = tl.zeros([BR], tl.int64)
            else:
                word = tl.zeros([BR], tl.int32)
            for i in tl.static_range(CHUNK):
                col = first + w * CHUNK + i
                v = tl.load(x_row + tl.minimum(col, cols - 1) * x_sc, mask=g_ok, other=0.0).to(tl.float32)
                code = tl.where(col < cols, _codes(v, inverse, low, x_ptr, KIND, BITS), 0)
                word |= code.to(word.dtype) << (i * BITS)
            at = (first + w * CHUNK) * BITS // 8
            w_ok = g_ok & (at < row_bytes)
            if WORD == 0:
                for k in tl.static_range(BITS):
                    tl.store(c_row + at + k, ((word >> (8 * k)) & 0xFF).to(tl.uint8), mask=w_ok)
            elif WORD == 1:
                tl.store(c_row + at, word.to(tl.uint8), mask=w_ok)
            elif WORD == 2:
                tl.store((c_row + at).to(tl.pointer_type(tl.int16)), word.to(tl.int16), mask=w_ok)
            elif WORD == 4:
                tl.store((c_row + at).to(tl.pointer_type(tl.int32)), word, mask=w_ok)
            else:
                tl.store((c_row + at).to(tl.pointer_type(tl.int64)), word, mask=w_ok)


@triton.jit
def compact_kernel(scratch_ptr, scratch_sp, row_stride, out_ptr, out_sp, row_bytes, row_bits, code_bytes, total_bits,
                   BLOCK: tl.constexpr, SHORT_ROWS: tl.constexpr):
    """Rows of row_bits bits, row_stride bytes apart -> the dense stream: output byte i holds stream
    bits [8i, 8i + 8), taken from the row(s) they lie in."""
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
            b = tl.load(src + row * row_stride + (at >> 3), mask=ok & (bit < total_bits), other=0).to(tl.int32)
            byte |= ((b >> (at & 7).to(tl.int32)) & 1) << t
    else:  # a byte spans at most two rows
        row = first // row_bits
        at = first - row * row_bits
        here = src + row * row_stride + (at >> 3)
        b0 = tl.load(here, mask=ok, other=0).to(tl.int32)
        b1 = tl.load(here + 1, mask=ok & ((at >> 3) + 1 < row_bytes), other=0).to(tl.int32)
        bits = ((b0 | (b1 << 8)) >> (at & 7).to(tl.int32)) & 0xFF
        left = (row_bits - at).to(tl.int32)  # bits of this row from `at` on
        spill = ok & (left < 8) & (first + left < total_bits)
        nxt = tl.load(src + (row + 1) * row_stride, mask=spill, other=0).to(tl.int32)
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
    """The inverse of the encoder, on the same tiles, into y: (payloads, heads, rows, cols) of any strides."""
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
    g_ok = (gj < groups)[:, None] & row_ok[None, :]
    p_ptr = blob + code_bytes + (m[None, :] * groups + gj[:, None]) * (2 * NP)
    scale = _load_half(p_ptr, g_ok)
    if KIND == ASYM:
        low = _load_half(p_ptr + 2, g_ok)
    else:
        low = scale

    k = tl.arange(0, BCW)
    col = c0 + k
    ok = ((k < NG * GROUP) & (col < cols))[:, None] & row_ok[None, :]
    MASK: tl.constexpr = (1 << BITS) - 1
    if ALIGNED:  # rows start on a byte: read whole units
        NU: tl.constexpr = BCW // UC
        u = tl.arange(0, NU)
        c_base = blob + m * row_bytes
        if UB == 1:
            byte_at = c0 * BITS // 8 + u
            byte = tl.load(c_base[None, :] + byte_at[:, None], mask=(byte_at < row_bytes)[:, None] & row_ok[None, :],
                           other=0).to(tl.int32)
            if BITS == 8:
                code = byte
            else:
                code = tl.reshape((byte[:, None, :] >> (tl.arange(0, UC) * BITS)[None, :, None]) & MASK, (BCW, BR))
        else:
            kb = tl.arange(0, UBP)
            byte_at = c0 * BITS // 8 + u[:, None] * UB + kb[None, :]
            b_ok = ((kb < UB)[None, :] & (byte_at < row_bytes))[:, :, None] & row_ok[None, None, :]
            byte = tl.load(c_base[None, None, :] + byte_at[:, :, None], mask=b_ok, other=0).to(tl.int64)
            word = tl.sum(byte << (kb * 8).to(tl.int64)[None, :, None], axis=1)
            code = tl.reshape((word[:, None, :] >> (tl.arange(0, UC) * BITS).to(tl.int64)[None, :, None]) & MASK,
                              (BCW, BR)).to(tl.int32)
    else:  # rows start mid-byte: each code from the two bytes it may straddle
        bit = (m[None, :].to(tl.int64) * cols + col[:, None]) * BITS
        at = bit >> 3
        b0 = tl.load(blob + at, mask=ok, other=0).to(tl.int32)
        b1 = tl.load(blob + at + 1, mask=ok & (at + 1 < code_bytes), other=0).to(tl.int32)
        code = ((b0 | (b1 << 8)) >> (bit & 7).to(tl.int32)) & MASK

    if GP == GROUP:
        scale = tl.reshape(tl.broadcast_to(scale[:, None, :], (NG, GROUP, BR)), (BCW, BR))
        low = tl.reshape(tl.broadcast_to(low[:, None, :], (NG, GROUP, BR)), (BCW, BR))
    else:
        which = tl.broadcast_to(tl.minimum(k // GROUP, NG - 1)[:, None], (BCW, BR))
        scale = tl.gather(scale, which, 0)
        low = tl.gather(low, which, 0)

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
    tl.store(y + col[:, None] * y_sc + r[None, :] * y_sr, _narrow(value, y_ptr.dtype.element_ty), mask=ok)

