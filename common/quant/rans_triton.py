"""The GPU kernels of `common.quant.rans`: one program (a warp) per group of lanes.

They write what the torch reference writes (the encoder: every lane's state and its words in the
reference's (group, step, sub-step, lane) scratch, which `rans._pack` compacts; the decoder: the
symbols), in the same integer arithmetic, so the bytes are the same bit for bit
(tests/common/quant/test_rans.py runs them in Triton's interpreter against the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.quant import rans


# Every program runs STEPS steps, the layout's most rounded up to a power of two (a chunk's lanes idle
# past their own): a loop bound that is not a constant does not run in Triton's interpreter, which CI
# tests the kernels in, and the rounding bounds the variants compiled.


@triton.jit
def _group(first_of, count_of, lanes_of, at_of, size_of, lane_start_of, BLOCK: tl.constexpr):
    """This program's group: its chunk's first symbol, symbols and lanes, its first lane of all, its lanes;
    its lanes' indices in the chunk, and which of them the group has."""
    g = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    size = tl.load(size_of + g)
    return (g, tl.load(first_of + g), tl.load(count_of + g), tl.load(lanes_of + g), tl.load(lane_start_of + g), size,
            tl.load(at_of + g) + lane, lane, lane < size)


@triton.jit
def _encode(symbols, models_of, shift_of, offset_of, freq, cum, width, first_of, count_of, lanes_of, at_of, size_of,
            lane_start_of, words, emitted, written, states, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    g, first, count, lanes, lane_start, size, index, lane, valid = _group(first_of, count_of, lanes_of, at_of,
                                                                        size_of, lane_start_of, BLOCK)
    base = lane_start * 2 * STEPS + lane  # rans.scratch_index
    state = tl.full((BLOCK,), 65536, tl.uint32)
    total = tl.zeros((BLOCK,), tl.int32)
    # each step loads the next step's symbols and models, so that no step waits on its own loads
    position = (STEPS - 1) * lanes + index
    live = valid & (position < count)
    symbol = tl.load(symbols + first + position, mask=live, other=0).to(tl.int32)
    m = tl.load(models_of + first + position, mask=live, other=0).to(tl.int32)
    for i in range(0, STEPS):
        k = STEPS - 1 - i
        ahead = position - lanes
        live_ahead = valid & (ahead >= 0) & (ahead < count)
        symbol_ahead = tl.load(symbols + first + ahead, mask=live_ahead, other=0).to(tl.int32)
        m_ahead = tl.load(models_of + first + ahead, mask=live_ahead, other=0).to(tl.int32)
        shift = tl.load(shift_of + m, mask=live, other=0).to(tl.int32)
        offset = tl.load(offset_of + m, mask=live, other=0).to(tl.int32)
        top = symbol >> shift
        low = (symbol - (top << shift)).to(tl.uint32)
        high = top + offset
        # the low step (sub-step 1), then the high step (0): the decoder reads them the other way round
        f = (tl.full((BLOCK,), 1, tl.int32) << (16 - shift)).to(tl.uint32)
        out = live & ((state >> 16) >= f)
        tl.store(words + base + (2 * k + 1) * size, state.to(tl.int16), mask=valid)
        tl.store(emitted + base + (2 * k + 1) * size, out.to(tl.int8), mask=valid)
        total += out.to(tl.int32)
        state = tl.where(out, state >> 16, state)
        q = state // f
        state = tl.where(live, (q << 16) + (state - q * f) + (low << (16 - shift).to(tl.uint32)), state)
        f = tl.load(freq + m * width + high, mask=live, other=1).to(tl.uint32)
        start = tl.load(cum + m * width + high, mask=live, other=0).to(tl.uint32)
        out = live & ((state >> 16) >= f)
        tl.store(words + base + 2 * k * size, state.to(tl.int16), mask=valid)
        tl.store(emitted + base + 2 * k * size, out.to(tl.int8), mask=valid)
        total += out.to(tl.int32)
        state = tl.where(out, state >> 16, state)
        q = state // f
        state = tl.where(live, (q << 16) + (state - q * f) + start, state)
        position, live, symbol, m = ahead, live_ahead, symbol_ahead, m_ahead
    tl.store(states + lane_start + lane, state.to(tl.int64), mask=valid)
    tl.store(written + lane_start + lane, total, mask=valid)


@triton.jit
def _renormalize(state, live, words, cursor, end, bad):
    need = live & (state < 65536)
    taken = need.to(tl.int32)
    at = cursor + tl.cumsum(taken, 0) - taken
    bad = bad | (need & (at >= end))
    word = (tl.load(words + at, mask=need & (at < end), other=0).to(tl.int32) & 0xFFFF).to(tl.uint32)
    state = tl.where(need, (state << 16) | word, state)
    return state, cursor + tl.sum(taken, 0), bad


@triton.jit
def _decode(states, words, word_start_of, word_end_of, models_of, shift_of, offset_of, freq, cum, lookup, width,
            first_of, count_of, lanes_of, at_of, size_of, lane_start_of, out, flags, STEPS: tl.constexpr,
            BLOCK: tl.constexpr):
    g, first, count, lanes, lane_start, _, index, lane, valid = _group(first_of, count_of, lanes_of, at_of,
                                                                     size_of, lane_start_of, BLOCK)
    cursor = tl.load(word_start_of + g)
    end = tl.load(word_end_of + g)
    state = tl.load(states + lane_start + lane, mask=valid, other=65536).to(tl.uint32)
    bad = lane < 0
    position = index
    live = valid & (position < count)
    m = tl.load(models_of + first + position, mask=live, other=0).to(tl.int32)
    for k in range(0, STEPS):
        # the next step's models, loaded a step ahead: no step waits on its own
        ahead = position + lanes
        live_ahead = valid & (ahead < count)
        m_ahead = tl.load(models_of + first + ahead, mask=live_ahead, other=0).to(tl.int32)
        shift = tl.load(shift_of + m, mask=live, other=0).to(tl.int32)
        offset = tl.load(offset_of + m, mask=live, other=0).to(tl.int32)
        slot = state & 0xFFFF
        high = tl.load(lookup + m * 65536 + slot, mask=live, other=0).to(tl.int32)
        f = tl.load(freq + m * width + high, mask=live, other=1).to(tl.uint32)
        start = tl.load(cum + m * width + high, mask=live, other=0).to(tl.uint32)
        state = tl.where(live, f * (state >> 16) + slot - start, state)
        state, cursor, bad = _renormalize(state, live, words, cursor, end, bad)
        slot = state & 0xFFFF
        up = (16 - shift).to(tl.uint32)
        low = slot >> up
        state = tl.where(live, ((state >> 16) << up) + slot - (low << up), state)
        if tl.max((live & (state < 65536)).to(tl.int32), 0) > 0:  # only split models' low steps can need a word
            state, cursor, bad = _renormalize(state, live, words, cursor, end, bad)
        tl.store(out + first + position, (((high - offset) << shift) + low.to(tl.int32)).to(tl.int16), mask=live)
        position, live, m = ahead, live_ahead, m_ahead
    bad = bad | (valid & (state != 65536))
    tl.store(flags + g, ((tl.max(bad.to(tl.int32), 0) + (cursor != end).to(tl.int32)) > 0).to(tl.int8))


def _steps(layout: rans.Layout) -> int:
    return triton.next_power_of_2(max(layout.steps, 1))


def encode(symbols: torch.Tensor, models_of: torch.Tensor, models: rans.Models, counts: list[int],
           pieces: bool = False) -> list[bytes] | list[tuple]:
    """`rans.encode`, on the kernels."""
    layout = rans.Layout(tuple(counts))
    if not layout.counts or not sum(layout.counts):
        return [(b"",) if pieces else b"" for _ in layout.counts]
    device = symbols.device
    models = models.to(device)
    total_lanes = sum(layout.lanes)
    steps = _steps(layout)
    words = torch.empty(2 * steps * total_lanes, dtype=torch.int16, device=device)
    emitted = torch.zeros(2 * steps * total_lanes, dtype=torch.int8, device=device)
    written = torch.empty(total_lanes, dtype=torch.int32, device=device)
    states = torch.empty(total_lanes, dtype=torch.int64, device=device)
    _encode[(sum(layout.groups),)](symbols.contiguous(), models_of.contiguous(), models.shift, models.offset,
                                   models.freq, models.cum, models.freq.shape[1], *layout.group_table(device),
                                   words, emitted, written, states, STEPS=steps, BLOCK=rans.GROUP, num_warps=1)
    return rans._pack(layout, states, words, emitted.bool(), written, pieces)


def decode(codes: list[bytes], models_of: torch.Tensor, models: rans.Models, counts: list[int],
           failed: torch.Tensor | None = None) -> torch.Tensor:
    """`rans.decode`, on the kernels, the symbols as int16 (the reference's int64 would be one more pass). With
    `failed` (an int8 scalar on the device), the verdict on the codes is OR-ed into it instead of read at once: the
    host goes on while the device decodes, and the caller checks it before it uses the symbols' cache (the kernel
    reads no word outside the codes and writes no symbol outside its chunk, whatever the codes)."""
    layout = rans.Layout(tuple(counts))
    device = models_of.device
    total = sum(layout.counts)
    if not total:
        rans.check_empty(codes, layout)
        return torch.zeros(0, dtype=torch.int16, device=device)
    models = models.to(device)
    states, words, word_starts, word_ends = rans.unpack(layout, codes, device)
    out = torch.zeros(total, dtype=torch.int16, device=device)
    flags = torch.zeros(sum(layout.groups), dtype=torch.int8, device=device)
    _decode[(sum(layout.groups),)](states, words if words.numel() else torch.zeros(1, dtype=torch.int16, device=device),
                                   word_starts, word_ends, models_of.contiguous(), models.shift, models.offset,
                                   models.freq, models.cum, models.lookup, models.freq.shape[1],
                                   *layout.group_table(device), out, flags, STEPS=_steps(layout), BLOCK=rans.GROUP,
                                   num_warps=1)
    if failed is not None:
        failed.bitwise_or_(flags.max())
    elif bool(flags.any()):
        raise ValueError(rans.NOT_A_CODE)
    return out
