"""Interleaved rANS with static models: the entropy coder that runs where the cache is (`pca:...:e:a`).

The range coder of `common.quant.pca_entropy` codes one index after another on the CPU. This
coder codes many streams ("lanes") at once, so that a GPU can run them side by side, and its
integer arithmetic makes the same bytes on any device: a stream written on the GPU decodes on
the CPU, and the reverse.

Models. Each of the stage's tables (a Laplace model of one scale, `pca_entropy.probabilities`) is
quantized to integer frequencies summing to 2^PROB_BITS, each symbol at least 1. A table of a
large scale would need tens of thousands of symbols; it is split instead: an index q is coded as
its high part h = q >> r under the quantized model of h, then its r low bits uniformly (they are
nearly uniform once the scale is many times 2^r). r is the least shift that leaves at most
MAX_HIGH magnitudes.

Lanes. A chunk's N symbols (its indices in row-major order) go to lanes = ceil(N / LANE) lanes:
lane l codes symbols l, l + lanes, l + 2 lanes, ... Each lane is an rANS coder with a 32-bit
state in [2^16, 2^32) and 16-bit renormalization; each symbol is a high step and a low step, each
of which reads at most one word. The encoder runs the lanes backwards from the state 2^16; the
decoder runs them forwards and must end each lane at 2^16 (a check that catches most corrupted
codes).

Format of one chunk's code, little endian:

    u32 state of each lane, lane order
    u16 words in the order the decoder reads them: by symbol step k, then high step before low step,
        then lane

so the decoder of step k finds the words of the lanes that need one at the cursor, in lane order
(a prefix sum over the lanes that renormalize). Nothing else travels: N and each symbol's model
come from the stage and the chunk's shape, as for the range coder.

Cost: 32 bits per lane (0.016 bits per symbol at LANE 2048) and the frequency rounding; `kvwire
bench coders` measures it against the range coder (within 3% of the tables' rate on SmolLM2). The
reference here is plain torch and runs on any device; `common.quant.rans_triton` holds the GPU
kernels, tested against it bit for bit.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

PROB_BITS = 16
TOTAL = 1 << PROB_BITS
LOW = 1 << 16  # the state's lower bound; a renormalization moves 16 bits
WORD = 0xFFFF
LANE = 2048  # symbols per lane
MAX_HIGH = 127  # most magnitudes of a split model's high part


@dataclass(frozen=True)
class Models:
    """The quantized models, as tensors (on one device): model m codes index q as its high part
    (q >> shift[m]) + offset[m] under freq[m] / cum[m], then its low `shift[m]` bits uniformly."""

    shift: torch.Tensor  # (M,) int64
    offset: torch.Tensor  # (M,) int64: -(the least high part)
    size: torch.Tensor  # (M,) int64: symbols of the high part
    freq: torch.Tensor  # (M, A) int64, 0 past size
    cum: torch.Tensor  # (M, A) int64
    lookup: torch.Tensor  # (M, TOTAL) int16: the symbol whose slots hold each slot

    @classmethod
    def build(cls, tables: list[tuple[np.ndarray, int]]) -> Models:
        """From each model's probabilities of the indices -K .. K (float64, summing to about 1) and K."""
        shifts, offsets, sizes, freqs = [], [], [], []
        for probabilities, top in tables:
            shift = max(0, math.ceil(math.log2((top + 1) / (MAX_HIGH + 1)))) if top > MAX_HIGH else 0
            low, high = (-top) >> shift, top >> shift
            groups = (np.arange(-top, top + 1) >> shift) - low
            merged = np.bincount(groups, weights=probabilities, minlength=high - low + 1)
            freqs.append(quantize(merged))
            shifts.append(shift)
            offsets.append(-low)
            sizes.append(high - low + 1)
        width = max(sizes)
        freq = np.zeros((len(freqs), width), dtype=np.int64)
        for m, f in enumerate(freqs):
            freq[m, :f.size] = f
        cum = np.cumsum(freq, axis=1) - freq
        lookup = np.stack([np.repeat(np.arange(f.size, dtype=np.int16), f) for f in freqs])
        return cls(*(torch.from_numpy(np.asarray(a)) for a in (shifts, offsets, sizes, freq, cum, lookup)))

    def to(self, device: torch.device) -> Models:
        return Models(*(t.to(device) for t in (self.shift, self.offset, self.size, self.freq, self.cum, self.lookup)))


def quantize(probabilities: np.ndarray) -> np.ndarray:
    """Integer frequencies, each at least 1, summing to TOTAL, in proportion to `probabilities`; the
    rounding's remainder goes to the most probable symbol. float64 products and floors only, so
    that every node builds the same."""
    scaled = np.floor(probabilities / probabilities.sum() * (TOTAL - probabilities.size)).astype(np.int64) + 1
    scaled[int(np.argmax(probabilities))] += TOTAL - int(scaled.sum())
    return scaled


def lanes_of(n: int) -> int:
    return -(-n // LANE) if n else 0


def code_bytes_min(n: int) -> int:
    """The least bytes a code of `n` symbols can have: its lanes' states."""
    return 4 * lanes_of(n)


@dataclass(frozen=True)
class Layout:
    """Several chunks coded in one call: chunk c holds symbols [starts[c], starts[c] + counts[c]) of
    the flat symbol tensor, and lanes [lane_starts[c], lane_starts[c] + lanes[c])."""

    counts: tuple[int, ...]

    @functools.cached_property
    def starts(self) -> list[int]:
        return [0, *np.cumsum(self.counts)[:-1].tolist()] if self.counts else []

    @functools.cached_property
    def lanes(self) -> list[int]:
        return [lanes_of(n) for n in self.counts]

    @functools.cached_property
    def lane_starts(self) -> list[int]:
        return [0, *np.cumsum(self.lanes)[:-1].tolist()] if self.counts else []

    def lane_table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per lane: its chunk, its index in the chunk, its chunk's lane count and first symbol (int64)."""
        chunk = torch.repeat_interleave(torch.arange(len(self.counts)), torch.tensor(self.lanes, dtype=torch.int64))
        lanes = torch.tensor(self.lanes, dtype=torch.int64)[chunk]
        index = torch.arange(chunk.numel()) - torch.tensor(self.lane_starts, dtype=torch.int64)[chunk]
        first = torch.tensor(self.starts, dtype=torch.int64)[chunk]
        return tuple(t.to(device) for t in (chunk, index, lanes, first))

    @property
    def steps(self) -> int:
        return max((-(-n // k) for n, k in zip(self.counts, self.lanes) if n), default=0)


def scratch_index(layout: Layout, steps: int, device: torch.device) -> torch.Tensor:
    """Per lane: where its words of step 0's high step go in an encoder's scratch, whose words lie chunk by
    chunk, and in a chunk by step, sub-step (high, low), lane; + (2 k + sub) * its chunk's lanes for the others.
    Compacted, the scratch is every chunk's words in the order its decoder reads them."""
    chunk, index, lanes, _ = layout.lane_table(device)
    lane_starts = torch.tensor(layout.lane_starts, dtype=torch.int64, device=device)
    return lane_starts[chunk] * 2 * steps + index


def encode(symbols: torch.Tensor, models_of: torch.Tensor, models: Models, counts: list[int]) -> list[bytes]:
    """Each chunk's code: `symbols` (the chunks' indices, flat, int) under `models_of` (each symbol's
    model, int), on their device (plain torch: the reference of the GPU kernel)."""
    layout = Layout(tuple(counts))
    if not layout.counts or not sum(layout.counts):
        return [b"" for _ in layout.counts]
    device = symbols.device
    models = models.to(device)
    symbols, models_of = symbols.long(), models_of.long()
    chunk, index, lanes, first = layout.lane_table(device)
    total = symbols.numel()
    steps = layout.steps
    state = torch.full_like(index, LOW)
    words = torch.zeros(2 * steps * index.numel(), dtype=torch.int64, device=device)
    emitted = torch.zeros(2 * steps * index.numel(), dtype=torch.bool, device=device)
    base = scratch_index(layout, steps, device)
    written = torch.zeros_like(index)  # per lane: its words
    ends = first + torch.tensor(layout.counts, dtype=torch.int64, device=device)[chunk]
    for k in range(steps - 1, -1, -1):
        position = first + index + k * lanes
        live = position < ends
        at = position.clamp(max=total - 1)
        m = models_of[at]
        shift = models.shift[m]
        high = (symbols[at] >> shift) + models.offset[m]
        low = symbols[at] - ((symbols[at] >> shift) << shift)
        # the low step first (the decoder reads the high step first)
        for sub, (f, c) in ((1, (torch.bitwise_left_shift(torch.ones_like(shift), PROB_BITS - shift),
                                 torch.bitwise_left_shift(low, PROB_BITS - shift))),
                            (0, (models.freq[m, high], models.cum[m, high]))):
            out = live & (state >= (f << 16))
            words[base + (2 * k + sub) * lanes] = state & WORD
            emitted[base + (2 * k + sub) * lanes] = out
            written += out
            state = torch.where(out, state >> 16, state)
            state = torch.where(live, ((state // f) << PROB_BITS) + state % f + c, state)
    return _pack(layout, state, words, emitted, written)


def _pack(layout: Layout, state: torch.Tensor, words: torch.Tensor, emitted: torch.Tensor,
          written: torch.Tensor) -> list[bytes]:
    """Each chunk's code from the lanes' final states, the encoder's scratch (`scratch_index`) and each lane's
    count of words: one copy of 2 bytes a word to the host."""
    per_chunk = torch.zeros(len(layout.counts), dtype=torch.int64, device=written.device).index_add_(
        0, layout.lane_table(written.device)[0], written.long()).tolist()
    stream = words[emitted]
    if stream.dtype != torch.int16:
        stream = stream.to(torch.int32).view(torch.int16)[0::2]  # the low 16 bits (little endian)
    stream = stream.cpu().numpy().tobytes()
    states = state.to(torch.int64).cpu().numpy().astype("<u4").tobytes()
    out, at = [], 0
    for c, n in enumerate(layout.counts):
        lo, hi = 4 * layout.lane_starts[c], 4 * (layout.lane_starts[c] + layout.lanes[c])
        out.append(states[lo:hi] + stream[2 * at:2 * (at + per_chunk[c])] if n else b"")
        at += per_chunk[c]
    return out


def decode(codes: list[bytes], models_of: torch.Tensor, models: Models, counts: list[int]) -> torch.Tensor:
    """The chunks' symbols (flat, int64, on `models_of`'s device) from their codes (ValueError if
    a code is not one this coder writes for those models)."""
    layout = Layout(tuple(counts))
    device = models_of.device
    total = sum(layout.counts)
    if not total:
        check_empty(codes, layout)
        return torch.zeros(0, dtype=torch.int64, device=device)
    models = models.to(device)
    models_of = models_of.long()
    states, words, word_starts, word_ends = unpack(layout, codes, device)
    chunk, index, lanes, first = layout.lane_table(device)
    ends = first + torch.tensor(layout.counts, dtype=torch.int64, device=device)[chunk]
    cursor = word_starts.clone()  # per chunk: its next word
    state = states
    out = torch.zeros(total, dtype=torch.int64, device=device)
    overrun = torch.zeros((), dtype=torch.bool, device=device)
    for k in range(layout.steps):
        position = first + index + k * lanes
        live = position < ends
        at = position.clamp(max=total - 1)
        m = models_of[at]
        shift = models.shift[m]
        slot = state & (TOTAL - 1)
        high = models.lookup[m, slot].long()
        state = torch.where(live, models.freq[m, high] * (state >> PROB_BITS) + slot - models.cum[m, high], state)
        state, cursor, overrun = _renormalize(state, live, chunk, cursor, word_ends, words, overrun)
        slot = state & (TOTAL - 1)
        low = slot >> (PROB_BITS - shift)
        state = torch.where(live, (state >> PROB_BITS << (PROB_BITS - shift)) + slot - (low << (PROB_BITS - shift)), state)
        state, cursor, overrun = _renormalize(state, live, chunk, cursor, word_ends, words, overrun)
        value = ((high - models.offset[m]) << shift) + low
        out[at[live]] = value[live]
    if bool(overrun) or not bool((cursor == word_ends).all()) or not bool((state == LOW).all()):
        raise ValueError("not a code of this stage: its lanes do not end where its words do")
    return out


def _renormalize(state, live, chunk, cursor, word_ends, words, overrun):
    """Each live lane whose state fell below 2^16 reads its chunk's next word, lanes in order."""
    need = live & (state < LOW)
    if not bool(need.any()):
        return state, cursor, overrun
    taken = torch.cumsum(need.long(), 0)
    before = torch.zeros_like(cursor).index_add_(0, chunk, need.long())  # per chunk: how many read now
    base = torch.cumsum(before, 0) - before  # words read now by earlier chunks' lanes
    rank = taken - 1 - base[chunk]  # this lane's rank among its chunk's readers
    at = cursor[chunk] + rank
    overrun = overrun | (need & (at >= word_ends[chunk])).any()
    word = words[at.clamp(max=max(words.numel() - 1, 0))].long() & WORD if words.numel() else torch.zeros_like(state)
    state = torch.where(need, (state << 16) | word, state)
    return state, cursor + before, overrun


def check_empty(codes: list[bytes], layout: Layout) -> None:
    """A chunk of no symbols has an empty code."""
    if any(code and not n for code, n in zip(codes, layout.counts)):
        raise ValueError("a code of bytes for no symbols")


def unpack(layout: Layout, codes: list[bytes], device: torch.device) -> tuple[torch.Tensor, ...]:
    """What both decoders start from (ValueError for a code of the wrong shape): every lane's state
    (int64), every chunk's words back to back (int16, their 16 bits), and where each chunk's words
    start and end."""
    check_empty(codes, layout)
    states, words, starts, at = [], [], [], 0
    for code, n, lanes in zip(codes, layout.counts, layout.lanes):
        head = 4 * lanes
        if len(code) < head or (len(code) - head) % 2:
            raise ValueError(f"a code of {len(code)} bytes for {n} symbols: {head} bytes of lane states, then whole words")
        states.append(np.frombuffer(code, dtype="<u4", count=lanes))
        words.append(np.frombuffer(code, dtype="<i2", offset=head))
        starts.append(at)
        at += words[-1].size
    state = torch.from_numpy(np.concatenate(states).astype(np.int64)).to(device)
    if not bool((state >= LOW).all()):
        raise ValueError("not a code of this stage: a lane's state is below 2^16")
    return (state, torch.from_numpy(np.concatenate(words)).to(device),
            torch.tensor(starts, dtype=torch.int64, device=device),
            torch.tensor([*starts[1:], at], dtype=torch.int64, device=device))
