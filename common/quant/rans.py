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

Groups. A chunk's lanes are cut into groups of GROUP (the last may be smaller), and each group's
words lie together, so that groups decode independently: a GPU runs one warp per group, however
few chunks a call has.

Format of one chunk's code, little endian:

    u32 state of each lane, lane order
    u32 words of each group, group order
    u16 words, group by group; in a group, in the order its decoder reads them: by symbol step k,
        then high step before low step, then lane

so the decoder of step k finds the words of the group's lanes that need one at the group's cursor,
in lane order (a prefix sum over the lanes that renormalize). Nothing else travels: N and each
symbol's model come from the stage and the chunk's shape, as for the range coder.

Cost: 32 bits per lane and 32 per group (0.016 bits per symbol at LANE 2048, GROUP 32) and the
frequency rounding; `kvwire bench coders` measures it against the range coder (within 3% of the
tables' rate on SmolLM2). The reference here is plain torch and runs on any device;
`common.quant.rans_triton` holds the GPU kernels, tested against it bit for bit.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

PROB_BITS = 16
TOTAL = 1 << PROB_BITS
NOT_A_CODE = "not a code of this stage: its lanes do not end where its words do"
LOW = 1 << 16  # the state's lower bound; a renormalization moves 16 bits
WORD = 0xFFFF
LANE = 2048  # symbols per lane
GROUP = 32  # lanes per group (a GPU warp)
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


def groups_of(lanes: int) -> int:
    return -(-lanes // GROUP)


def code_bytes_min(n: int) -> int:
    """The least bytes a code of `n` symbols can have: its lanes' states and its groups' word counts."""
    lanes = lanes_of(n)
    return 4 * (lanes + groups_of(lanes))


def _offsets(sizes: list[int]) -> list[int]:
    return [0, *np.cumsum(sizes)[:-1].tolist()] if sizes else []


@dataclass(frozen=True)
class Layout:
    """Several chunks coded in one call: chunk c holds symbols [starts[c], starts[c] + counts[c]) of
    the flat symbol tensor, lanes [lane_starts[c], lane_starts[c] + lanes[c]) and groups
    [group_starts[c], group_starts[c] + groups[c])."""

    counts: tuple[int, ...]

    @functools.cached_property
    def starts(self) -> list[int]:
        return _offsets(self.counts)

    @functools.cached_property
    def lanes(self) -> list[int]:
        return [lanes_of(n) for n in self.counts]

    @functools.cached_property
    def lane_starts(self) -> list[int]:
        return _offsets(self.lanes)

    @functools.cached_property
    def groups(self) -> list[int]:
        return [groups_of(n) for n in self.lanes]

    @functools.cached_property
    def group_starts(self) -> list[int]:
        return _offsets(self.groups)

    @functools.cached_property
    def _group_arrays(self) -> dict[str, np.ndarray]:
        def per_group(values):
            return np.asarray(values, dtype=np.int64)[chunk]

        chunk = np.repeat(np.arange(len(self.counts), dtype=np.int64), self.groups)
        at = (np.arange(chunk.size) - per_group(self.group_starts)) * GROUP  # its first lane in the chunk
        lanes = per_group(self.lanes)
        return {"first": per_group(self.starts), "count": per_group(self.counts), "lanes": lanes, "at": at,
                "size": np.minimum(GROUP, lanes - at), "lane_start": per_group(self.lane_starts) + at}

    def group_table(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Per group (int64): its chunk's first symbol, symbols and lanes; its first lane in the chunk, its
        lanes, its first lane of all."""
        g = self._group_arrays
        return arrays_to_device([g[k] for k in ("first", "count", "lanes", "at", "size", "lane_start")], device)

    @functools.cached_property
    def _lane_group(self) -> np.ndarray:
        return np.repeat(np.arange(self._group_arrays["size"].size), self._group_arrays["size"])

    def lane_table(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Per lane (int64): its group, its index in its chunk, its chunk's lanes, first symbol and end."""
        g, group = self._group_arrays, self._lane_group
        index = np.arange(group.size) - g["lane_start"][group] + g["at"][group]
        first = g["first"][group]
        return arrays_to_device([group, index, g["lanes"][group], first, first + g["count"][group]], device)

    @property
    def steps(self) -> int:
        return max((-(-n // k) for n, k in zip(self.counts, self.lanes) if n), default=0)


def scratch_index(layout: Layout, steps: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per lane: where its word of step 0's high step goes in an encoder's scratch, and the stride to step k's
    sub-step s (+ (2 k + s) * stride). The scratch's words lie group by group, and in a group by step, sub-step
    (high, low), lane: compacted, it is every chunk's words in the order its decoder reads them."""
    g, group = layout._group_arrays, layout._lane_group
    start = g["lane_start"][group]
    base = start * 2 * steps + np.arange(group.size) - start
    return arrays_to_device([base, g["size"][group]], device)


def encode(symbols: torch.Tensor, models_of: torch.Tensor, models: Models, counts: list[int],
           pieces: bool = False) -> list[bytes] | list[tuple]:
    """Each chunk's code: `symbols` (the chunks' indices, flat, int) under `models_of` (each symbol's
    model, int), on their device (plain torch: the reference of the GPU kernel). `pieces`: each code as the
    tuple of its parts, views of host memory not yet joined (`_pack`)."""
    layout = Layout(tuple(counts))
    if not layout.counts or not sum(layout.counts):
        return [(b"",) if pieces else b"" for _ in layout.counts]
    device = symbols.device
    models = models.to(device)
    symbols, models_of = symbols.long(), models_of.long()
    _, index, lanes, first, ends = layout.lane_table(device)
    total = symbols.numel()
    steps = layout.steps
    state = torch.full_like(index, LOW)
    words = torch.zeros(2 * steps * index.numel(), dtype=torch.int64, device=device)
    emitted = torch.zeros(2 * steps * index.numel(), dtype=torch.bool, device=device)
    base, stride = scratch_index(layout, steps, device)
    written = torch.zeros_like(index)  # per lane: its words
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
            words[base + (2 * k + sub) * stride] = state & WORD
            emitted[base + (2 * k + sub) * stride] = out
            written += out
            state = torch.where(out, state >> 16, state)
            state = torch.where(live, ((state // f) << PROB_BITS) + state % f + c, state)
    return _pack(layout, state, words, emitted, written, pieces)


def _pack(layout: Layout, state: torch.Tensor, words: torch.Tensor, emitted: torch.Tensor,
          written: torch.Tensor, pieces: bool = False) -> list[bytes] | list[tuple]:
    """Each chunk's code from the lanes' final states, the encoder's scratch (`scratch_index`) and each lane's
    count of words: one copy of 2 bytes a word to the host. `pieces`: each code as its three parts (the lanes'
    states, the groups' word counts, the words), views of that host memory, for the caller to copy once
    (framing.chunk_frame); else joined."""
    device = written.device
    per_group = torch.zeros(sum(layout.groups), dtype=torch.int64, device=device).index_add_(
        0, arrays_to_device([layout._lane_group], device)[0], written.long())
    stream = words[emitted]
    if stream.dtype != torch.int16:
        stream = stream.to(torch.int32).view(torch.int16)[0::2]  # the low 16 bits (little endian)
    stream = memoryview(to_host(stream).numpy()).cast("B")
    per_group = to_host(per_group).numpy()
    group_words = memoryview(per_group.astype("<u4")).cast("B")
    states = memoryview(to_host(state.to(torch.int64)).numpy().astype("<u4")).cast("B")
    out, at = [], 0
    for c, n in enumerate(layout.counts):
        lanes, groups = slice(4 * layout.lane_starts[c], 4 * (layout.lane_starts[c] + layout.lanes[c])), \
            slice(4 * layout.group_starts[c], 4 * (layout.group_starts[c] + layout.groups[c]))
        size = int(per_group[layout.group_starts[c]:layout.group_starts[c] + layout.groups[c]].sum())
        parts = (states[lanes], group_words[groups], stream[2 * at:2 * (at + size)]) if n else (b"",)
        out.append(parts if pieces else b"".join(parts))
        at += size
    return out


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the host, contiguous. From a GPU through page-locked memory: a copy into pageable memory ran
    at about 1.5 GB/s on an H100 (the code of a 32K-token cache took a second), a pinned one at the bus's speed."""
    tensor = tensor.contiguous()
    if tensor.device.type != "cuda":
        return tensor.cpu()
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    out.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return out


def arrays_to_device(arrays: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Int64 `arrays` on `device`, in one copy: to a GPU, a copy from pageable memory would wait for the work
    queued before it, one wait per array."""
    whole = to_device(arrays, np.int64, device)
    return tuple(whole.split([len(a) for a in arrays]))


def to_device(parts: list[np.ndarray], dtype: np.dtype, device: torch.device) -> torch.Tensor:
    """The arrays `parts` end to end, as one tensor of `dtype` on `device`; gathered in page-locked memory on
    the way to a GPU (one copy on the host, one fast copy to the device)."""
    host = torch.empty(sum(len(p) for p in parts), dtype=torch.from_numpy(np.empty(0, dtype)).dtype,
                       pin_memory=device.type == "cuda")
    np.concatenate(parts, out=host.numpy())
    return host.to(device, non_blocking=True)


def decode(codes: list[bytes], models_of: torch.Tensor, models: Models, counts: list[int],
           failed: torch.Tensor | None = None) -> torch.Tensor:
    """The chunks' symbols (flat, int64, on `models_of`'s device) from their codes (ValueError if
    a code is not one this coder writes for those models, at once: `failed` is the kernels' (rans_triton))."""
    layout = Layout(tuple(counts))
    device = models_of.device
    total = sum(layout.counts)
    if not total:
        check_empty(codes, layout)
        return torch.zeros(0, dtype=torch.int64, device=device)
    models = models.to(device)
    models_of = models_of.long()
    states, words, word_starts, word_ends = unpack(layout, codes, device)
    group, index, lanes, first, ends = layout.lane_table(device)
    cursor = word_starts.clone()  # per group: its next word
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
        state, cursor, overrun = _renormalize(state, live, group, cursor, word_ends, words, overrun)
        slot = state & (TOTAL - 1)
        low = slot >> (PROB_BITS - shift)
        state = torch.where(live, (state >> PROB_BITS << (PROB_BITS - shift)) + slot - (low << (PROB_BITS - shift)), state)
        state, cursor, overrun = _renormalize(state, live, group, cursor, word_ends, words, overrun)
        value = ((high - models.offset[m]) << shift) + low
        out[at[live]] = value[live]
    if bool(overrun) or not bool((cursor == word_ends).all()) or not bool((state == LOW).all()):
        raise ValueError(NOT_A_CODE)
    return out


def _renormalize(state, live, group, cursor, word_ends, words, overrun):
    """Each live lane whose state fell below 2^16 reads its group's next word, lanes in order."""
    need = live & (state < LOW)
    if not bool(need.any()):
        return state, cursor, overrun
    taken = torch.cumsum(need.long(), 0)
    before = torch.zeros_like(cursor).index_add_(0, group, need.long())  # per group: how many read now
    base = torch.cumsum(before, 0) - before  # words read now by earlier groups' lanes
    rank = taken - 1 - base[group]  # this lane's rank among its group's readers
    at = cursor[group] + rank
    overrun = overrun | (need & (at >= word_ends[group])).any()
    word = words[at.clamp(max=max(words.numel() - 1, 0))].long() & WORD if words.numel() else torch.zeros_like(state)
    state = torch.where(need, (state << 16) | word, state)
    return state, cursor + before, overrun


def check_empty(codes: list[bytes], layout: Layout) -> None:
    """A chunk of no symbols has an empty code."""
    if any(code and not n for code, n in zip(codes, layout.counts)):
        raise ValueError("a code of bytes for no symbols")


def unpack(layout: Layout, codes: list[bytes], device: torch.device) -> tuple[torch.Tensor, ...]:
    """What both decoders start from (ValueError for a code of the wrong shape): every lane's state
    (int64), every group's words back to back (int16, their 16 bits), and where each group's words
    start and end."""
    check_empty(codes, layout)
    states, words, counts = [], [], []
    for code, n, lanes, groups in zip(codes, layout.counts, layout.lanes, layout.groups):
        head = 4 * (lanes + groups)
        if len(code) < head or (len(code) - head) % 2:
            raise ValueError(f"a code of {len(code)} bytes for {n} symbols: {head} bytes of lane states and group "
                             "sizes, then whole words")
        counts.append(np.frombuffer(code, dtype="<u4", offset=4 * lanes, count=groups).astype(np.int64))
        if 2 * int(counts[-1].sum()) != len(code) - head:
            raise ValueError(f"a code whose groups count {int(counts[-1].sum())} words, and that holds "
                             f"{(len(code) - head) // 2}")
        states.append(np.frombuffer(code, dtype="<u4", count=lanes))
        words.append(np.frombuffer(code, dtype="<i2", offset=head))
    if any((lanes < LOW).any() for lanes in states):  # on the host: the device's work goes on meanwhile
        raise ValueError("not a code of this stage: a lane's state is below 2^16")
    counts = np.concatenate(counts)
    ends = np.cumsum(counts)
    return (to_device(states, np.int64, device), to_device(words, np.int16, device),
            *arrays_to_device([ends - counts, ends], device))
