"""Framing: KVState <-> a stream of Header, Chunk and Trailer frames.

Every chunk carries the CRC-32C of its payload as sent (`checksum`). The receiver validates the
header against the model and the configured limits before allocating anything,
then checks each chunk's range, checksum and decompressed size.

A chunk's payload is zstd of its raw bytes, or the raw bytes stored as they are: a payload of
exactly `raw_size` bytes is stored, and a zstd payload is always shorter. The sender stores a
tier's chunks where zstd saves less than MIN_ZSTD_SAVING on the tier's first chunk.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import crc32c
import grpc
import numpy as np
import torch
import zstandard
from transformers import DynamicCache

from common.fingerprints import refusal
from common.framing import chunk_frame, received
from common.kvstate import KVState, prefill_on_top
from common.plan import DTYPES, CodecPlan
from common.plan import runs as token_runs
from common.profile import MAX_PROFILE_CHARS, Profile, ProfileError, parse_profile
from common.proto import kvwire_pb2 as pb
from common.quant import rans, rotation
from common.quant.kv import payload_tensor
from common.quant.pca_entropy import code_fitting, payload_bytes, rans_coder, refuse_flagged, uncode_many
from common.quant.transform import CodecContext, LayerCodec, sized_chunks

MAX_CHUNK_BYTES = 1 << 20  # a chunk's payload at most, and its raw size where the host decompresses it
# Tokens per chunk: at most 16 MiB of them in the sender's dtype, what one chunk may decode into. Frames are sized
# for throughput: gRPC carries 1 MiB messages at two to three times the rate of 100 KB ones, so a chunk holds as
# many tokens as fill MAX_CHUNK_BYTES of payload (chunk_tokens), where one bf16 MiB of tokens per chunk made a
# 32K-token pca:b1 cache 4,130 frames of 93 KB.
MAX_CHUNK_SPAN_BYTES = 16 << 20
CHUNK_FILL = 0.75  # a code made in place is sized for this share of MAX_CHUNK_BYTES at its expected rate
RANS_BATCH = 1 << 27  # pca:...:a: symbols the sender codes in one call (its scratch: 6 bytes each)
RANS_DECODE_BATCH = 1 << 24  # and that a receiver without the kernels decodes in one call (about 20 bytes each)
MAX_TRANSFER_ID_CHARS = 128  # the receiver keeps used ids (idempotency): their size must be bounded
MAX_OFFERED_PROFILES = 64  # a Negotiate request's offer list, parsed one profile at a time
# A refusal's message: never the client's unbounded input back (gRPC drops trailers past 16 KiB).
MAX_MESSAGE_CHARS = 1024
GRPC_MESSAGE_PREFIX = 5  # gRPC length-prefixed message: 1 flag byte + 4 length bytes
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVWire"].full_name  # what both nodes name the gRPC service
ZSTD_THREADS = min(4, os.cpu_count() or 1)  # an encoder's default: threads that compress a tier's chunks
# zstd level 3 saves 3% of SmolLM2's int4 and int8 codes, 7-8% of fp16 and int2, 21% of bf16. It
# decompresses at about 1 GB/s on a core, slower than a 10 Gbit/s link delivers: a few percent do not pay.
MIN_ZSTD_SAVING = 0.1


def checksum(*parts) -> int:
    """A chunk's checksum: CRC-32C of its payload, the bytes-like `parts` end to end (not joined). The CPU computes
    it in hardware (15 GB/s on the development machine, where zlib.crc32 runs at 3.5), outside the interpreter lock."""
    crc = 0
    for part in parts:
        crc = crc32c.crc32c(part, crc)
    return crc


def max_chunk_tokens(heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """The most tokens one chunk may hold (MAX_CHUNK_SPAN_BYTES of them in `dtype`)."""
    return max(1, MAX_CHUNK_SPAN_BYTES // (2 * heads * head_dim * dtype.itemsize))


def chunk_tokens(codec: LayerCodec, heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Tokens of one chunk of a tier coded by `codec`: as many as fill MAX_CHUNK_BYTES of payload (a code made in
    place at its expected rate, with a margin; otherwise the raw payload, which the receiver decompresses on the
    host), at most max_chunk_tokens."""
    cap = max_chunk_tokens(heads, head_dim, dtype)
    if codec.coded_in_place:
        per = codec.codec.expected_token_bytes
        return max(1, min(cap, int(CHUNK_FILL * MAX_CHUNK_BYTES / per))) if per else cap
    size = lambda n: codec.payload_size((1, heads, n, head_dim), dtype)  # noqa: E731
    n = max(1, min(cap, MAX_CHUNK_BYTES * cap // max(1, size(cap))))
    while n > 1 and size(n) > MAX_CHUNK_BYTES:
        n -= max(1, n // 64)
    return n


@functools.cache
def _compressing(pid: int, threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """The threads that compress a tier's chunks in parallel (zstd releases the GIL), one pool per
    process (`pid`: a forked child gets its own). The frames are the same bytes as in series."""
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="kvwire-zstd")


@functools.cache
def _compressor(thread: int, level: int) -> zstandard.ZstdCompressor:
    """A zstd compressor of one thread: a compressor is not thread-safe."""
    return zstandard.ZstdCompressor(level=level)


def _compress(level: int, raw: bytes) -> bytes:
    return _compressor(threading.get_ident(), level).compress(raw)


def _compress_or_store(level: int, raw: bytes) -> bytes:
    """zstd of `raw`, or `raw` itself where zstd is no shorter: a zstd payload is always shorter than its raw bytes."""
    packed = _compress(level, raw)
    return packed if len(packed) < len(raw) else raw


class WireError(Exception):
    """Bad input on the wire, with the gRPC status it maps to."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text`, cut to at most `limit` characters (saying how long it was) where it is longer."""
    if len(text) <= limit:
        return text
    note = f"... ({len(text)} characters)"
    return text[:max(0, limit - len(note))] + note


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure: MemoryError, CUDA OOM, or torch's CPU allocator refusing."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in ("out of memory", "can't allocate memory"))


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The specific gRPC status (and message, at most MAX_MESSAGE_CHARS) a handler answers an exception
    with: never UNKNOWN.

    WireError carries its own; a payload that does not decompress is DATA_LOSS; an allocation
    failure RESOURCE_EXHAUSTED; a ValueError (ProfileError, QuantError, the checks of KVState and
    prefill) INVALID_ARGUMENT; anything else is a bug of ours, INTERNAL.
    """
    code, message = _status_for(exc)
    return code, clip(message)


def _status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, WireError):
        return exc.code, str(exc)
    if isinstance(exc, zstandard.ZstdError):
        return grpc.StatusCode.DATA_LOSS, f"payload does not decompress: {exc}"
    if out_of_memory(exc):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) if isinstance(exc, MemoryError) else f"out of memory: {exc}"
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}): {exc}"


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = 8 << 20
    max_transfer_bytes: int = 1 << 30
    max_tokens: int = 32768

    def to_proto(self) -> pb.Limits:
        return pb.Limits(max_frame_bytes=self.max_frame_bytes, max_transfer_bytes=self.max_transfer_bytes,
                         max_tokens=self.max_tokens)


def _varint_bytes(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _field_bytes(n: int) -> int:
    """A uint field of number < 16 holding `n`, serialized (proto3 leaves a zero out)."""
    return 1 + _varint_bytes(n) if n else 0


def wire_bytes(frame: pb.Frame | bytes) -> int:
    """Bytes this frame (a pb.Frame, or one serialized) occupies in the gRPC stream. A chunk's from its fields:
    ByteSize serializes the message, a copy of its payload (about 250 us per MiB on an H100's host)."""
    if isinstance(frame, bytes):
        return len(frame) + GRPC_MESSAGE_PREFIX
    if frame.WhichOneof("kind") != "chunk":
        return frame.ByteSize() + GRPC_MESSAGE_PREFIX
    chunk = frame.chunk
    payload = len(chunk.payload)
    inner = (sum(map(_field_bytes, (chunk.layer, chunk.token_start, chunk.token_end, chunk.raw_size, chunk.crc32c)))
             + (1 + _varint_bytes(payload) + payload if payload else 0))
    return 1 + _varint_bytes(inner) + inner + GRPC_MESSAGE_PREFIX


def _deltas(positions: torch.Tensor) -> torch.Tensor:
    """(kv_heads, kept) positions -> their int32 deltas along each head, the first from 0, where they are (a
    position is below 2^31: a delta fits)."""
    positions = positions.to(torch.int64)
    return torch.diff(positions, dim=1, prepend=positions.new_zeros(positions.shape[0], 1)).to(torch.int32)


def _encoded_deltas(deltas: list[torch.Tensor]) -> list[bytes]:
    """Each layer's deltas as zstd(uint32, modulo 2^32): brought to the host in one copy."""
    host = rans.to_host(torch.cat([d.flatten() for d in deltas])).numpy().view("<u4") if deltas else None
    compressor, out, at = zstandard.ZstdCompressor(level=3), [], 0
    for d in deltas:
        out.append(compressor.compress(host[at:at + d.numel()].tobytes()))
        at += d.numel()
    return out


def encode_positions(positions: torch.Tensor) -> bytes:
    """(kv_heads, kept) int positions -> zstd(uint32 deltas, modulo 2^32: a run of importance tiers
    starts lower than the previous one ended)."""
    return _encoded_deltas([_deltas(positions)])[0]


def bounded_decompress(blob: bytes, size: int) -> bytes:
    """zstd-decompress a frame that must declare exactly `size` bytes (checked before any allocation)."""
    declared = zstandard.frame_content_size(blob)
    if declared != size:
        raise ValueError(f"compressed frame declares {declared} bytes, expected {size}")
    raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=size)
    if len(raw) != size:
        raise ValueError(f"compressed frame holds {len(raw)} bytes, expected {size}")
    return raw


def chunk_raw(payload: bytes, size: int) -> bytes:
    """A chunk's raw bytes from its payload: stored (exactly `size` bytes), or zstd (bounded_decompress)."""
    return payload if len(payload) == size else bounded_decompress(payload, size)


def position_deltas(blob: bytes, heads: int, kept: int) -> np.ndarray:
    """encode_positions' (kv_heads, kept) uint32 deltas, from a blob that must hold exactly that many."""
    raw = bounded_decompress(blob, 4 * heads * kept) if kept else b""
    return np.frombuffer(raw, dtype="<u4").reshape(heads, kept)


def dense_start(deltas: np.ndarray) -> int | None:
    """The first position where every head keeps the same run of consecutive positions, else None: the
    cache of a prefill without selection, which the receiver takes without summing or checking its deltas."""
    if not deltas.size or (deltas[:, 0] != deltas[0, 0]).any() or (deltas[:, 1:] != 1).any():
        return None
    return int(deltas[0, 0])


def summed_positions(deltas: np.ndarray) -> torch.Tensor:
    """Positions (kv_heads, kept) int64 from their uint32 deltas (modulo 2^32, as encode_positions wrote them)."""
    return torch.from_numpy(np.cumsum(deltas.astype(np.int64), axis=1) % (1 << 32))


def decode_positions(blob: bytes, heads: int, kept: int) -> torch.Tensor:
    return summed_positions(position_deltas(blob, heads, kept))


def sliding_windows(config) -> dict[int, int]:
    """layer -> how many tokens its sliding-window cache keeps, for a model `config`; other layers are absent.

    A sender sends such a layer as its cache holds it after prefill: transformers' sliding layer
    keeps the last sliding_window - 1 tokens (tests/common/test_wire.py checks this against a prefill).
    """
    layers = DynamicCache(config=config).layers
    return {i: layer.sliding_window - 1 for i, layer in enumerate(layers) if layer.is_sliding}


def _falls(deltas: torch.Tensor, profile: Profile | None) -> torch.Tensor:
    """Whether a layer's positions fail to increase within one of its runs, as a boolean where they are."""
    runs = token_runs(profile, deltas.shape[1])
    return torch.stack([(deltas[:, a + 1:b] <= 0).any() for a, b in runs]
                       + [torch.zeros((), dtype=torch.bool, device=deltas.device)]).any()


def layer_headers(positions: list[torch.Tensor], profile: Profile | None = None) -> list[pb.LayerHeader]:
    """positions: per layer, (kv_heads, kept) original positions of the kept tokens, strictly increasing
    per head within each of the profile's runs (see common.plan.runs). Checked and coded where they are, with
    one wait for the device and one copy to the host for every layer (a check, a copy to pageable memory and
    numpy's diff per layer were about 25 ms of profile_wire's encode at 32K tokens on an H100)."""
    deltas = [_deltas(p) for p in positions]
    falls = torch.stack([_falls(d, profile) for d in deltas]).tolist() if deltas else []
    if any(falls):
        raise ValueError(f"layer {falls.index(True)}: kept positions must be strictly increasing per head")
    return [pb.LayerHeader(kept_tokens=p.shape[1], positions=blob)
            for p, blob in zip(positions, _encoded_deltas(deltas))]


def prefill_positions(config, seq_len: int, device: torch.device | None = None) -> list[torch.Tensor]:
    """What each layer's cache holds right after a prefill of `seq_len` tokens, known before it runs:
    every position, or for a sliding-window layer the last ones its window keeps."""
    text = config.get_text_config()
    heads = text.num_key_value_heads
    windows = sliding_windows(config)
    return [torch.arange(max(0, seq_len - windows.get(layer, seq_len)), seq_len, device=device).expand(heads, -1)
            for layer in range(text.num_hidden_layers)]


def header_profile(profile: Profile, context: CodecContext | None) -> str:
    """The profile as a header carries it: canonical, with group sizes and the basis hash filled in.
    A receiver parses at most MAX_PROFILE_CHARS of it, so the sender refuses a longer one itself."""
    text = str(profile.bind(context))
    if len(text) > MAX_PROFILE_CHARS:
        raise ProfileError(f"profile of {len(text)} characters in its canonical form (group sizes and basis hash "
                           f"filled in); a receiver parses at most {MAX_PROFILE_CHARS}")
    return text


class Encoder:
    """Sender side: the frames of one transfer, counting what its trailer declares. `serialized`: its chunks come
    serialized (`chunk_frame`, bytes), for a gRPC stream (`serialize`); else every frame is a pb.Frame."""

    def __init__(self, fingerprint: pb.Fingerprint, transfer_id: str | None = None, zstd_level: int = 3,
                 context: CodecContext | None = None, zstd_threads: int = ZSTD_THREADS, serialized: bool = False):
        self.fingerprint = fingerprint
        self.context = context  # the model's RoPE and basis, for the stages that need them
        self.transfer_id = transfer_id or uuid.uuid4().hex
        self.zstd_level, self.zstd_threads = zstd_level, zstd_threads
        self.serialized = serialized
        self.num_chunks = self.payload_bytes = 0

    def header(self, seq_len: int, positions: list[torch.Tensor] | None = None,
               profile: Profile | None = None) -> pb.Frame:
        """The header of a whole-cache transfer (each layer's kept positions, and the profile), or of a
        segmented one (neither)."""
        return pb.Frame(header=pb.Header(
            transfer_id=self.transfer_id, fingerprint=self.fingerprint,
            profile=header_profile(profile, self.context) if profile else "",
            seq_len=seq_len, batch=1, layers=layer_headers(positions, profile) if positions is not None else [],
            segmented=positions is None))

    def chunks(self, kv: KVState, profile: Profile) -> Iterator[pb.Frame]:
        """The payload of `kv` under `profile`, layer by layer, in chunks of at most MAX_CHUNK_BYTES."""
        plan = CodecPlan.build(profile, self.context, kv.num_layers)
        if all(len(tiers) == 1 and tiers[0][2].coded_in_place
               for tiers in (plan.tiers(i, k.shape[2]) for i, k in enumerate(kv.keys))):
            yield from self._coded_in_place(kv, plan)
            return
        for layer, (keys, values, positions) in enumerate(zip(kv.keys, kv.values, kv.positions)):
            yield from self.layer_chunks(layer, keys, values, positions, plan,
                                         kv.importance[layer] if kv.importance else None)

    def _coded_in_place(self, kv: KVState, plan: CodecPlan) -> Iterator[pb.Frame]:
        """pca:...:a on every layer's tokens: each layer's indices where the cache is, then the rANS codes of
        several layers' chunks in one call (up to RANS_BATCH symbols: the coder's lanes run side by side). The
        next batch's indices are queued on the device before this batch's frames are built on the host."""
        flag = torch.zeros(1, dtype=torch.int32, device=kv.keys[0].device)  # a non-finite input, checked per batch
        batches = self._index_batches(kv, plan, flag)
        batch = next(batches, None)
        while batch is not None:
            coded = code_fitting([part[1:] for part in batch], MAX_CHUNK_BYTES, pieces=True)  # waits for the device
            refuse_flagged(flag)
            current, batch = batch, next(batches, None)
            for (i, _, raw, n, _), (step, payloads) in zip(current, coded):
                yield from self.chunk_frames(i, 0, sized_chunks(raw, n, step, payloads))

    @staticmethod
    def _index_batches(kv: KVState, plan: CodecPlan, flag: torch.Tensor) -> Iterator[list]:
        """Batches of (layer, pca codec, raw indices, tokens, chunk tokens), up to RANS_BATCH symbols each, their
        indices queued where the cache is (nothing waits for the device here)."""
        _, heads, _, head_dim = kv.keys[0].shape
        batch = []
        for layer, (keys, values, positions) in enumerate(zip(kv.keys, kv.values, kv.positions)):
            codec = plan.codecs[layer]
            raw = codec.encode(keys, values, positions,
                               codec.classes(kv.importance[layer] if kv.importance else None, positions), flag)
            batch.append((layer, codec.codec, raw, keys.shape[2], chunk_tokens(codec, heads, head_dim, kv.dtype)))
            if sum(c.coded.numel() * n for _, c, _, n, _ in batch) >= RANS_BATCH or layer == kv.num_layers - 1:
                yield batch
                batch = []

    def chunk_frames(self, layer: int, first: int,
                     sized: Iterable[tuple[int, int, bytes | tuple]]) -> Iterator[pb.Frame | bytes]:
        """The chunks of `layer` from token `first` on, each (tokens, raw size, payload): a payload is bytes, or a
        tuple of bytes-like parts end to end (a rANS code's, copied once, into the frame)."""
        start = first
        for tokens, raw_size, payload in sized:
            parts = (payload,) if isinstance(payload, bytes) else payload
            size = payload_bytes(payload)
            if size > MAX_CHUNK_BYTES:
                raise ValueError(f"layer {layer}: a chunk of {size} bytes exceeds {MAX_CHUNK_BYTES}")
            self.num_chunks += 1
            self.payload_bytes += size
            chunk = pb.Chunk(layer=layer, token_start=start, token_end=start + tokens, raw_size=raw_size,
                             crc32c=checksum(*parts))
            if self.serialized:
                yield chunk_frame(chunk, parts)
            else:
                frame = pb.Frame(chunk=chunk)  # copied before its payload: the payload is set in place, once
                frame.chunk.payload = b"".join(parts)  # one bytes part is itself, not a copy
                yield frame
            start += tokens

    def layer_chunks(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                     plan: CodecPlan, importance: torch.Tensor | None = None) -> Iterator[pb.Frame]:
        """One layer's keys and values (1, kv_heads, kept, head_dim) at `positions` (kv_heads, kept),
        encoded where they are (CPU or GPU); only the packed bytes come to the host. `importance`: the
        layer's share of the question's attention per position, for a pca:...:e:iG stage."""
        _, heads, kept, head_dim = keys.shape
        for first, last, codec in plan.tiers(layer, kept):  # a chunk never spans two tiers
            tier = slice(first, last)
            step = chunk_tokens(codec, heads, head_dim, keys.dtype)
            if codec.coded_in_place:  # pca:...:a: coded where the cache is, no zstd over the code
                sized = codec.code_chunks(keys[:, :, tier], values[:, :, tier], positions[:, tier], step, importance,
                                          MAX_CHUNK_BYTES, pieces=True)
            else:
                raws = list(codec.encode_chunks(keys[:, :, tier], values[:, :, tier], positions[:, tier], step,
                                                importance))
                pool = _compressing(os.getpid(), self.zstd_threads)
                codes = (pool.map(codec.codec.compress, raws) if codec.entropy_coded
                         else self._zstd_or_stored(raws, pool))
                sized = zip((min(step, last - start) for start in range(first, last, step)), map(len, raws), codes)
            yield from self.chunk_frames(layer, first, sized)

    def _zstd_or_stored(self, raws: list[bytes], pool: concurrent.futures.Executor) -> Iterator[bytes]:
        """A tier's payloads: zstd of each chunk's raw bytes, or all of them stored where zstd saves less
        than MIN_ZSTD_SAVING of the first chunk (codes of one codec compress alike)."""
        if not raws:
            return
        first = _compress(self.zstd_level, raws[0])
        if len(first) >= len(raws[0]) * (1 - MIN_ZSTD_SAVING):
            yield from raws
            return
        yield first
        yield from pool.map(functools.partial(_compress_or_store, self.zstd_level), raws[1:])

    def kv_segment(self, kv: KVState, start: int, end: int, profile: Profile) -> Iterator[pb.Frame]:
        """Tokens [start, end) of `kv` as a segment at `profile` (precision stages only)."""
        part = kv.token_range(start, end)
        yield self.segment(start, end, part.positions, profile)
        yield from self.chunks(part, profile)

    def segment(self, start: int, end: int, positions: list[torch.Tensor], profile: Profile) -> pb.Frame:
        """The declaration of a cache segment of tokens [start, end) whose layers keep `positions`."""
        if profile.selection is not None:
            raise ProfileError(f"segments carry precision stages only, not a selection: {profile}")
        return pb.Frame(segment=pb.Segment(token_start=start, token_end=end, profile=header_profile(profile, self.context),
                                           layers=layer_headers(positions)))

    def opening(self, profile: Profile, seq_len: int, positions: list[torch.Tensor],
                head_ids: list[int] | None = None) -> list[pb.Frame]:
        """The frames before the first chunk of a cache of `seq_len` tokens whose layers keep `positions`
        (a layer-pipelined sender knows them before its prefill runs: see prefill_positions).

        Whole: the header. Under text:h: a segmented header, `head_ids` (the template's head) as a text
        segment, and the declaration of the cache segment after it. Either way the chunks then carry
        each layer's tokens at positions from cache_start() on, coded under `profile.as_cache`.
        """
        start = cache_start(profile, seq_len, head_ids)
        if not start:
            return [self.header(seq_len, positions, profile)]
        cached = [p[:, span(p, start, seq_len)] for p in positions]
        return [self.header(seq_len), self.text_segment(list(head_ids), 0),
                self.segment(start, seq_len, cached, profile.as_cache)]

    def text_segment(self, token_ids: list[int], start: int) -> pb.Frame:
        """Tokens [start, start + len(token_ids)) as text, for the receiver to prefill."""
        return pb.Frame(segment=pb.Segment(token_start=start, token_end=start + len(token_ids), token_ids=token_ids))

    def trailer(self) -> pb.Frame:
        return pb.Frame(trailer=pb.Trailer(num_chunks=self.num_chunks, payload_bytes=self.payload_bytes))


def encode(
    kv: KVState, profile: Profile, fingerprint: pb.Fingerprint, transfer_id: str | None = None,
    zstd_level: int = 3, context: CodecContext | None = None, head_ids: list[int] | None = None,
    serialized: bool = False,
) -> Iterator[pb.Frame | bytes]:
    """Yield the frames of one transfer: Header, Chunks (layer by layer), Trailer.

    A profile with a text head (text:h) makes it a segmented transfer: `head_ids`, the first tokens,
    as a text segment the receiver prefills, then the rest of `kv` as a cache segment.
    `serialized`: the chunks serialized already, for a gRPC stream (Encoder).
    """
    profile.check_layers(kv.num_layers)
    if kv.keys[0].shape[0] != 1:
        raise ValueError(f"transfers carry batch 1, got {kv.keys[0].shape[0]}")
    encoder = Encoder(fingerprint, transfer_id, zstd_level, context, serialized=serialized)
    yield from encoder.opening(profile, kv.seq_len, kv.positions, head_ids)
    start = cache_start(profile, kv.seq_len, head_ids)
    yield from encoder.chunks(kv.token_range(start, kv.seq_len) if start else kv, profile.as_cache)
    yield encoder.trailer()


def cache_start(profile: Profile, seq_len: int, head_ids: list[int] | None) -> int:
    """The first token of a `seq_len`-token transfer that travels as cache: after the template's head
    (`head_ids`) under text:h, else 0."""
    if not profile.text_head:
        return 0
    if not 0 < len(head_ids or ()) < seq_len:
        raise ProfileError(f"{profile}: text:h needs the template's head, some but not all of the "
                           f"{seq_len} tokens, and got {len(head_ids or ())}")
    return len(head_ids)


def span(positions: torch.Tensor, start: int, end: int) -> slice:
    """Which of a layer's kept tokens lie at positions [start, end): positions (kv_heads, kept), shared
    by the heads and increasing (as a prefill leaves them)."""
    lo, hi = torch.searchsorted(positions[0].contiguous(), torch.tensor([start, end], device=positions.device)).tolist()
    return slice(lo, hi)


@dataclass
class Segment:
    """Tokens [start, end) of the sequence as received: a cache (`kv`) or text (`token_ids`)."""

    start: int
    end: int
    profile: str  # canonical profile, or "text"
    kv: KVState | None = None
    token_ids: list[int] | None = None


@dataclass
class _Pending:
    """A cache segment whose chunks are still arriving."""

    start: int
    end: int
    tiers: list[list[tuple[int, int, LayerCodec]]]  # per layer: (first, last, codec) of its kept tokens
    positions: list[torch.Tensor]  # per layer, (kv_heads, kept), on the assembler's device
    kept: list[int]
    filled: list[int]
    keys: list[list[torch.Tensor]]
    values: list[list[torch.Tensor]]
    held: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)  # per layer: a tier's chunks (tokens, payload) to decode at once
    # pca:...:a tiers complete and not yet decoded, where the coder is the torch reference: decoded together
    due: list[tuple[int, tuple[int, int, LayerCodec], list[tuple[int, bytes]]]] = field(default_factory=list)
    # per decoded call of the kernels: its layers and the device's verdict on their codes, read when complete
    verdicts: list[tuple[list[int], torch.Tensor]] = field(default_factory=list)


class Assembler:
    """Receiver side: validates frames one at a time and builds the cache, segment by segment.

    A whole-cache transfer is one segment, [0, seq_len), declared by its header. A segmented
    transfer declares each segment in a Segment frame. Completed segments are collected by
    `take_segments()`, in order. `segmented`: True or False to require one kind, None to take
    the kind the header declares.

    `sliding_windows` (see `sliding_windows()`) names the model's sliding-window layers: each must
    carry exactly the last tokens of the sequence its cache keeps. Without it, every layer of a
    segment must keep all of its segment's tokens.
    """

    def __init__(self, fingerprint: pb.Fingerprint, limits: Limits, segmented: bool | None = False,
                 sliding_windows: Mapping[int, int] | None = None, device: torch.device | str = "cpu",
                 context: CodecContext | None = None):
        self.fingerprint = fingerprint  # the receiver's: its weights, and the dtype it decodes into
        self.context = context  # its model's RoPE and PCA basis, for the stages that need them
        self.device = torch.device(device)  # where chunks are decoded and the cache is assembled
        self.limits = limits
        self.segmented = segmented
        self.sliding_windows = dict(sliding_windows or {})
        self.header: pb.Header | None = None
        self.done = False
        self.bytes_received = 0
        self.segments: list[Segment] = []  # completed, not yet taken
        self._pending: _Pending | None = None
        self._covered = 0  # tokens [0, covered) are in completed segments
        self._whole: KVState | None = None
        self._num_chunks = 0
        self._payload_bytes = 0

    def add(self, frame: pb.Frame, size: int | None = None, payload: memoryview | None = None) -> None:
        """`size`: the frame's wire_bytes, where the caller has it; `payload`: a chunk's payload where it came apart
        from its frame (`received`), and then `size` too."""
        size = wire_bytes(frame) if size is None else size
        self.bytes_received += size
        if size > self.limits.max_frame_bytes:
            raise WireError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"frame of {size} bytes exceeds the limit of {self.limits.max_frame_bytes}")
        if self.bytes_received > self.limits.max_transfer_bytes:
            raise WireError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"transfer exceeds the limit of {self.limits.max_transfer_bytes} bytes")
        if self.done:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "frame after the trailer")
        kind = frame.WhichOneof("kind")
        if kind is None:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "empty frame")
        if (kind == "header") != (self.header is None):
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                            "a second header" if kind == "header" else f"{kind} frame before the header")
        if kind == "chunk":
            self._add_chunk(frame.chunk, frame.chunk.payload if payload is None else payload)
        else:
            getattr(self, f"_add_{kind}")(getattr(frame, kind))

    def add_message(self, message: bytes) -> None:
        """A frame as gRPC delivers it, serialized (`received`: a chunk's payload is not copied)."""
        frame, payload = received(message)
        self.add(frame, wire_bytes(message), payload)

    def take_segments(self) -> list[Segment]:
        taken, self.segments = self.segments, []
        return taken

    def _add_header(self, header: pb.Header) -> None:
        fp = self.fingerprint
        reason = refusal(header.fingerprint, fp, None)
        if reason:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION, reason)
        if self.segmented is None:
            self.segmented = header.segmented
        if header.segmented != self.segmented:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "a segmented transfer goes through TransferSegments"
                            if header.segmented else "TransferSegments needs a segmented header")
        if len(header.transfer_id) > MAX_TRANSFER_ID_CHARS:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"transfer id of {len(header.transfer_id)} characters; "
                            f"at most {MAX_TRANSFER_ID_CHARS}")
        if header.batch != 1:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"batch must be 1, got {header.batch}")
        if not 0 < header.seq_len <= self.limits.max_tokens:
            raise WireError(grpc.StatusCode.RESOURCE_EXHAUSTED if header.seq_len else grpc.StatusCode.INVALID_ARGUMENT,
                            f"seq_len {header.seq_len} outside 1..{self.limits.max_tokens}")
        self.dtype = DTYPES[fp.dtype]
        self.header = header
        if header.segmented:
            if header.profile or header.layers:
                raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "a segmented header names no profile and no layers")
            # The most the assembled cache can occupy: every token, in the model's dtype.
            self.expected_bytes = 2 * fp.num_layers * fp.kv_heads * header.seq_len * fp.head_dim * self.dtype.itemsize
            return
        self._begin(header.profile, header.layers, 0, header.seq_len)
        self.expected_bytes = sum(2 * fp.kv_heads * kept * fp.head_dim * self.dtype.itemsize for kept in self._pending.kept)
        self._complete_if_filled()

    def _add_segment(self, segment: pb.Segment) -> None:
        if not self.segmented:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "segment frame in a transfer that is not segmented")
        if self._pending is not None:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"segment at token {segment.token_start} before the chunks of the previous one are complete")
        start, end = segment.token_start, segment.token_end
        if start != self._covered or not start < end <= self.header.seq_len:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"segment [{start}, {end}) does not continue at token "
                            f"{self._covered} of {self.header.seq_len}")
        if segment.profile:
            if segment.token_ids:
                raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"segment [{start}, {end}) has a profile and text")
            self._begin(segment.profile, segment.layers, start, end)
            if self._profile.selection is not None:
                raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "segments carry precision stages only, not a selection")
            self._complete_if_filled()
            return
        if segment.layers or len(segment.token_ids) != end - start:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"text segment [{start}, {end}) carries {len(segment.token_ids)} token ids and no layers")
        self.segments.append(Segment(start, end, "text", token_ids=list(segment.token_ids)))
        self._covered = end

    def _begin(self, profile_text: str, layers, start: int, end: int) -> None:
        """Validate a segment's profile and layers before allocating anything for it."""
        fp = self.fingerprint
        try:
            self._profile = parse_profile(profile_text)
            self._profile.check_layers(fp.num_layers)
        except ProfileError as exc:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        reason = refusal(self.header.fingerprint, fp, self._profile)  # raw between different dtypes
        if reason:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION, reason)
        if len(layers) != fp.num_layers:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"header has {len(layers)} layers, model has {fp.num_layers}")
        kept = [layer.kept_tokens for layer in layers]
        for i, count in enumerate(kept):
            self._check_kept(i, count, start, end)
        if self._profile.rotation is not None and not rotation.supports(fp.head_dim):
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION, f"{self._profile}: a Hadamard rotation needs a "
                            f"power-of-two head_dim, and this model's is {fp.head_dim}")
        try:
            plan = CodecPlan.build(self._profile, self.context, fp.num_layers, bind=False)
            tiers = [plan.tiers(i, n) for i, n in enumerate(kept)]
        except ProfileError as exc:  # a basis or RoPE this receiver lacks
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        expected = sum(codec.payload_size((1, fp.kv_heads, last - first, fp.head_dim), self.dtype)
                       for layer in tiers for first, last, codec in layer)
        if expected > self.limits.max_transfer_bytes:
            raise WireError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"cache of {expected} bytes exceeds the limit of {self.limits.max_transfer_bytes}")
        # checked on the host, then on the device once, not a copy per chunk
        positions = [self._positions(i, layer, start, end).to(self.device) for i, layer in enumerate(layers)]
        self._pending = _Pending(start, end, tiers, positions, kept, [0] * fp.num_layers,
                                 [[] for _ in kept], [[] for _ in kept])

    def _required_positions(self, layer: int, start: int, end: int) -> range | None:
        """The positions `layer` must keep of tokens [start, end); None where a selection chooses them.

        A sliding-window layer keeps the last `window` tokens of the sequence, whatever the profile.
        A segment's other layers keep every token of it: segments carry no selection.
        """
        window = self.sliding_windows.get(layer)
        if window is not None:
            return range(max(start, self.header.seq_len - window), end)
        return range(start, end) if self.segmented else None

    def _check_kept(self, layer: int, kept: int, start: int, end: int) -> None:
        """A layer's kept-token count against its range, from the header numbers alone."""
        if kept > end - start:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"layer {layer} keeps {kept} tokens of {end - start}")
        required = self._required_positions(layer, start, end)
        if required is None or kept == len(required):
            return
        if layer in self.sliding_windows:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"layer {layer} is a sliding-window layer of {self.sliding_windows[layer]} tokens: it keeps "
                            f"positions [{required.start}, {required.stop}) of [{start}, {end}), not {kept} tokens")
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"layer {layer} keeps {kept} tokens of its segment "
                        f"[{start}, {end}); segments carry no selection, so every token")

    def _positions(self, i: int, layer: pb.LayerHeader, start: int, end: int) -> torch.Tensor:
        """A layer's kept positions, (kv_heads, kept): strictly increasing per head, inside [start, end),
        and exactly the required ones where the layer has no choice."""
        heads, kept = self.fingerprint.kv_heads, layer.kept_tokens
        try:
            deltas = position_deltas(layer.positions, heads, kept)
        except (ValueError, zstandard.ZstdError) as exc:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"layer {i}: bad positions: {exc}") from None
        first = dense_start(deltas)
        if first is not None:  # increasing by construction: only its bounds to check (the sums and per-head checks
            # of a 32K-token layer took about 4 ms of an H100 host's time)
            positions = torch.arange(first, first + kept, device=self.device).expand(heads, kept)
        else:
            positions = summed_positions(deltas)
        if not kept:
            return positions
        runs = token_runs(self._profile, layer.kept_tokens)
        # strictly increasing within each run; across runs (tiers), no position twice (one run: implied)
        if first is None and (any((positions[:, a + 1:b] <= positions[:, a:b - 1]).any() for a, b in runs)
                              or (len(runs) > 1 and (positions.sort(dim=1).values.diff(dim=1) == 0).any())):
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"layer {i}: kept positions must increase strictly per head"
                            + (" within each tier" if len(runs) > 1 else ""))
        lowest, highest = ((first, first + kept - 1) if first is not None
                           else (int(positions.min()), int(positions.max())))
        if highest >= end:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"layer {i}: a position lies beyond "
                            + (f"its segment [{start}, {end})" if self.segmented else f"seq_len {end}"))
        if lowest < start:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"layer {i}: a position lies before its segment [{start}, {end})")
        required = self._required_positions(i, start, end)
        if required is not None and (first != required.start if first is not None else not torch.equal(
                positions, torch.arange(required.start, required.stop).expand_as(positions))):
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"layer {i}: positions must be [{required.start}, {required.stop}), every one of them")
        return positions

    def _add_chunk(self, chunk: pb.Chunk, payload: bytes | memoryview) -> None:
        fp = self.fingerprint
        pending = self._pending
        if pending is None:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"layer {chunk.layer}: chunk [{chunk.token_start}, "
                            f"{chunk.token_end}) does not continue any segment")
        if chunk.layer >= fp.num_layers:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"chunk for layer {chunk.layer}; the model has {fp.num_layers}")
        kept = pending.kept[chunk.layer]
        if chunk.token_start != pending.filled[chunk.layer] or not chunk.token_start < chunk.token_end <= kept:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"layer {chunk.layer}: chunk [{chunk.token_start}, {chunk.token_end}) does not continue at "
                            f"token {pending.filled[chunk.layer]} of {kept}")
        # A chunk holds at most 16 MiB of the sender's tokens in its dtype, and a raw payload that the host
        # decompresses is at most MAX_CHUNK_BYTES: a larger range would make a few bytes decode into many (rANS,
        # a range coder or zstd of zeros), refused before that.
        sent_dtype = DTYPES.get(self.header.fingerprint.dtype, self.dtype)
        cap = max_chunk_tokens(fp.kv_heads, fp.head_dim, sent_dtype)
        if chunk.token_end - chunk.token_start > cap:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"layer {chunk.layer}: chunk of "
                            f"{chunk.token_end - chunk.token_start} tokens; at most {cap} "
                            f"({MAX_CHUNK_SPAN_BYTES / 2**20:g} MiB of {str(sent_dtype).removeprefix('torch.')})")
        if len(payload) > MAX_CHUNK_BYTES:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"layer {chunk.layer}: chunk payload of "
                            f"{len(payload)} bytes; at most {MAX_CHUNK_BYTES}")
        if checksum(payload) != chunk.crc32c:
            raise WireError(grpc.StatusCode.DATA_LOSS, f"layer {chunk.layer} tokens [{chunk.token_start}, {chunk.token_end}): checksum mismatch")
        shape = (1, fp.kv_heads, chunk.token_end - chunk.token_start, fp.head_dim)
        tier = next((t for t in pending.tiers[chunk.layer] if t[0] <= chunk.token_start < t[1]), None)
        if tier is None or chunk.token_end > tier[1]:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"layer {chunk.layer}: chunk [{chunk.token_start}, "
                            f"{chunk.token_end}) spans tokens coded two ways ({self._profile})")
        codec = tier[2]
        expected = codec.payload_size(shape, self.dtype)
        if chunk.raw_size != expected:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"layer {chunk.layer}: chunk declares {chunk.raw_size} bytes, profile needs {expected}")
        if expected > MAX_CHUNK_BYTES and not codec.coded_in_place:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"layer {chunk.layer}: chunk of {expected} raw bytes; "
                            f"at most {MAX_CHUNK_BYTES}")
        if any(layer == chunk.layer for layer, _, _ in pending.due):
            self._decode_due()  # a layer's tiers are placed in their order
        if codec.coded_in_place:
            # pca:...:a: a tier's chunks wait (as their codes) until its last arrives, then decode in one call on
            # this node's device, and its keys and values are synthesized at once. The torch reference coder (a
            # CPU) steps through all its lanes at once, so there complete tiers wait to decode several layers
            # in one call (up to RANS_DECODE_BATCH symbols, or the segment's end): one call costs about what one does.
            held = self._hold(chunk, tier, payload)
            if held is not None:
                pending.due.append((chunk.layer, tier, held))
                if (rans_coder(self.device) is not rans or sum(t[2].codec.coded.numel() * (t[1] - t[0])
                                                                for _, t, _ in pending.due) >= RANS_DECODE_BATCH):
                    self._decode_due()
        else:
            try:
                raw = (codec.codec.decompress(payload, expected) if codec.entropy_coded
                       else chunk_raw(payload, expected))
            except (zstandard.ZstdError, ValueError) as exc:
                raise WireError(grpc.StatusCode.DATA_LOSS, f"layer {chunk.layer}: payload does not decompress: {exc}") from None
            if codec.decodes_chunks(self.device, self.dtype):
                # int and nf4 codes on a GPU: a tier's chunks decode together when its last arrives, one copy
                # and one launch per tensor (a copy and two launches per chunk held int4 to 1.4 GB/s)
                held = self._hold(chunk, tier, raw)
                if held is not None:
                    keys, values = codec.codec.decode_chunks([r for _, r in held], [n for n, _ in held], fp.kv_heads,
                                                             fp.head_dim, self.dtype, self.device)
                    pending.keys[chunk.layer].append(keys)
                    pending.values[chunk.layer].append(values)
            else:
                # (a layer can code to nothing: a weighted pca stage may give all its components zero bits)
                positions = pending.positions[chunk.layer][:, chunk.token_start:chunk.token_end]
                keys, values = codec.decode(payload_tensor(raw).to(self.device), shape, positions, self.dtype)
                pending.keys[chunk.layer].append(keys)
                pending.values[chunk.layer].append(values)
        pending.filled[chunk.layer] = chunk.token_end
        self._num_chunks += 1
        self._payload_bytes += len(payload)
        self._complete_if_filled()

    def _hold(self, chunk: pb.Chunk, tier: tuple[int, int, LayerCodec], payload: bytes) -> list[tuple[int, bytes]] | None:
        """Keep a chunk of a tier that decodes at once; the tier's (tokens, payload) when this chunk is its last."""
        self._pending.held.setdefault(chunk.layer, []).append((chunk.token_end - chunk.token_start, payload))
        return self._pending.held.pop(chunk.layer) if chunk.token_end == tier[1] else None

    def _decode_due(self) -> None:
        """The keys and values of the complete pca:...:a tiers waiting in `due`, from their chunks' rANS codes,
        in one call of the coder."""
        pending, fp = self._pending, self.fingerprint
        due, pending.due = pending.due, []
        layers = [layer for layer, _, _ in due]
        failed = torch.zeros((), dtype=torch.int8, device=self.device)
        try:
            raws = uncode_many([(codec.codec, [payload for _, payload in held], [n for n, _ in held])
                                for _, (_, _, codec), held in due], self.device, failed)
        except ValueError as exc:
            raise not_decoded(layers, str(exc)) from None
        pending.verdicts.append((layers, failed))
        for (layer, (first, last, codec), held), tier_raws in zip(due, raws):
            tokens = [n for n, _ in held]
            keys, values = codec.decode(codec.codec.join(tier_raws, tokens), (1, fp.kv_heads, last - first, fp.head_dim),
                                        pending.positions[layer][:, first:last], self.dtype)
            pending.keys[layer].append(keys)
            pending.values[layer].append(values)

    def _complete_if_filled(self) -> None:
        pending = self._pending
        if pending.filled != pending.kept:
            return
        if pending.due:
            self._decode_due()
        if pending.verdicts:  # one wait for the device per segment, not one per layer
            verdicts = torch.stack([failed for _, failed in pending.verdicts]).tolist()
            bad = next((layers for (layers, _), verdict in zip(pending.verdicts, verdicts) if verdict), None)
            if bad is not None:
                raise not_decoded(bad, rans.NOT_A_CODE)
        empty = torch.empty(1, self.fingerprint.kv_heads, 0, self.fingerprint.head_dim, dtype=self.dtype,
                            device=self.device)
        kv = KVState(keys=[torch.cat(parts, dim=2) if parts else empty for parts in pending.keys],
                     values=[torch.cat(parts, dim=2) if parts else empty for parts in pending.values],
                     positions=pending.positions, seq_len=pending.end)
        if self._profile.importance:
            kv = kv.in_position_order()
        self.segments.append(Segment(pending.start, pending.end, str(self._profile), kv=kv))
        self._whole = kv
        self._covered = pending.end
        self._pending = None

    def _add_trailer(self, trailer: pb.Trailer) -> None:
        if (trailer.num_chunks, trailer.payload_bytes) != (self._num_chunks, self._payload_bytes):
            raise WireError(grpc.StatusCode.DATA_LOSS,
                            f"trailer counts {trailer.num_chunks} chunks / {trailer.payload_bytes} bytes, "
                            f"received {self._num_chunks} / {self._payload_bytes}")
        if self._pending is not None:
            missing = [i for i, (f, k) in enumerate(zip(self._pending.filled, self._pending.kept)) if f != k]
            raise WireError(grpc.StatusCode.DATA_LOSS, f"layers {missing} are incomplete")
        if self._covered != self.header.seq_len:
            raise WireError(grpc.StatusCode.DATA_LOSS, f"segments cover tokens [0, {self._covered}) of {self.header.seq_len}")
        self.done = True

    def result(self) -> KVState:
        """The cache of a whole-cache transfer."""
        if not self.done:
            raise WireError(grpc.StatusCode.DATA_LOSS,
                            "stream ended before the trailer: transfer incomplete, nothing injected")
        if self.segmented:
            raise ValueError("a segmented transfer is assembled from take_segments()")
        return self._whole


def not_decoded(layers: list[int], reason: str) -> WireError:
    return WireError(grpc.StatusCode.DATA_LOSS,
                     f"layer {', '.join(map(str, layers))}: payload does not decompress: {reason}")


def place(model, kv: KVState | None, segment: Segment) -> KVState:
    """The cache so far (None: nothing yet) with `segment` after it: a cache segment appended, a text
    segment prefilled on top by `model`."""
    if segment.kv is not None:
        return segment.kv if kv is None else kv.extend(segment.kv)
    return prefill_on_top(model, kv, segment.token_ids)


def decode(frames: Iterable[pb.Frame | bytes], fingerprint: pb.Fingerprint, limits: Limits = Limits(),
           sliding_windows: Mapping[int, int] | None = None, device: torch.device | str = "cpu",
           context: CodecContext | None = None) -> KVState:
    assembler = Assembler(fingerprint, limits, sliding_windows=sliding_windows, device=device, context=context)
    for frame in frames:
        if isinstance(frame, bytes):
            assembler.add_message(frame)
        else:
            assembler.add(frame)
    return assembler.result()
