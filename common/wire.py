"""Framing: KVState <-> a stream of Header, Chunk and Trailer frames.

Every chunk carries zlib.crc32 of its payload as sent. The receiver validates the
header against the model and the configured limits before allocating anything,
then checks each chunk's range, checksum and decompressed size.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import torch
import zstandard

from common.kvstate import KVState
from common.profile import DTYPES, Profile, ProfileError, parse_profile
from common.proto import kvwire_pb2 as pb

MAX_CHUNK_BYTES = 1 << 20  # payload cap per chunk, before and after zstd
GRPC_MESSAGE_PREFIX = 5  # gRPC length-prefixed message: 1 flag byte + 4 length bytes


class WireError(Exception):
    """Bad input on the wire, with the gRPC status it maps to."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = 8 << 20
    max_transfer_bytes: int = 1 << 30
    max_tokens: int = 32768

    def to_proto(self) -> pb.Limits:
        return pb.Limits(max_frame_bytes=self.max_frame_bytes, max_transfer_bytes=self.max_transfer_bytes,
                         max_tokens=self.max_tokens)


def wire_bytes(frame: pb.Frame) -> int:
    """Bytes this frame occupies in the gRPC stream."""
    return frame.ByteSize() + GRPC_MESSAGE_PREFIX


def encode_positions(positions: torch.Tensor) -> bytes:
    """(kv_heads, kept) int positions, sorted per head -> zstd(uint32 deltas)."""
    array = positions.to(torch.int64).numpy()
    deltas = np.diff(array, axis=1, prepend=0).astype("<u4")
    return zstandard.ZstdCompressor(level=3).compress(deltas.tobytes())


def bounded_decompress(blob: bytes, size: int) -> bytes:
    """zstd-decompress a frame that must declare exactly `size` bytes (checked before any allocation)."""
    declared = zstandard.frame_content_size(blob)
    if declared != size:
        raise ValueError(f"compressed frame declares {declared} bytes, expected {size}")
    raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=size)
    if len(raw) != size:
        raise ValueError(f"compressed frame holds {len(raw)} bytes, expected {size}")
    return raw


def decode_positions(blob: bytes, heads: int, kept: int) -> torch.Tensor:
    raw = bounded_decompress(blob, 4 * heads * kept) if kept else b""
    deltas = np.frombuffer(raw, dtype="<u4").reshape(heads, kept).astype(np.int64)
    return torch.from_numpy(np.cumsum(deltas, axis=1))


def encode(
    kv: KVState, profile: str | Profile, fingerprint: pb.Fingerprint, transfer_id: str | None = None,
    zstd_level: int = 3,
) -> Iterator[pb.Frame]:
    """Yield the frames of one transfer: Header, Chunks (layer by layer), Trailer."""
    profile = parse_profile(profile)
    profile.check_layers(kv.num_layers)
    batch = kv.keys[0].shape[0]
    for layer, positions in enumerate(kv.positions):
        if (positions.diff(dim=1) <= 0).any():
            raise ValueError(f"layer {layer}: kept positions must be strictly increasing per head")
    yield pb.Frame(header=pb.Header(
        transfer_id=transfer_id or uuid.uuid4().hex, fingerprint=fingerprint, profile=str(profile),
        seq_len=kv.seq_len, batch=batch,
        layers=[pb.LayerHeader(kept_tokens=kv.kept_tokens(i), positions=encode_positions(p))
                for i, p in enumerate(kv.positions)],
    ))
    compressor = zstandard.ZstdCompressor(level=zstd_level)
    num_chunks = payload_bytes = 0
    for layer, (keys, values) in enumerate(zip(kv.keys, kv.values)):
        codec = profile.codec(layer)
        _, heads, kept, head_dim = keys.shape
        # Every codec's payload is at most the model-dtype size of its tokens.
        step = max(1, (MAX_CHUNK_BYTES - 4096) // (2 * batch * heads * head_dim * kv.dtype.itemsize))
        for start in range(0, kept, step):
            end = min(start + step, kept)
            raw = codec.encode(keys[:, :, start:end], values[:, :, start:end]).cpu().numpy().tobytes()
            payload = compressor.compress(raw)
            if len(payload) > MAX_CHUNK_BYTES:
                raise ValueError(f"layer {layer}: a chunk of {len(payload)} bytes exceeds {MAX_CHUNK_BYTES}")
            num_chunks += 1
            payload_bytes += len(payload)
            yield pb.Frame(chunk=pb.Chunk(layer=layer, token_start=start, token_end=end, raw_size=len(raw),
                                          crc32=zlib.crc32(payload), payload=payload))
    yield pb.Frame(trailer=pb.Trailer(num_chunks=num_chunks, payload_bytes=payload_bytes))


class Assembler:
    """Receiver side: validates frames one at a time and builds the KVState."""

    def __init__(self, fingerprint: pb.Fingerprint, limits: Limits):
        self.fingerprint = fingerprint
        self.limits = limits
        self.header: pb.Header | None = None
        self.done = False
        self.bytes_received = 0
        self._num_chunks = 0
        self._payload_bytes = 0

    def add(self, frame: pb.Frame) -> None:
        size = wire_bytes(frame)
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
        getattr(self, f"_add_{kind}")(getattr(frame, kind))

    def _add_header(self, header: pb.Header) -> None:
        fp = self.fingerprint
        if header.fingerprint != fp:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"model fingerprint mismatch: receiver runs {fp.architecture} ({fp.weights_sha256[:12]}), "
                            f"sender has {header.fingerprint.architecture} ({header.fingerprint.weights_sha256[:12]})")
        try:
            self.profile = parse_profile(header.profile)
            self.profile.check_layers(fp.num_layers)
        except ProfileError as exc:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if len(header.layers) != fp.num_layers:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"header has {len(header.layers)} layers, model has {fp.num_layers}")
        if header.batch != 1:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"batch must be 1, got {header.batch}")
        if not 0 < header.seq_len <= self.limits.max_tokens:
            raise WireError(grpc.StatusCode.RESOURCE_EXHAUSTED if header.seq_len else grpc.StatusCode.INVALID_ARGUMENT,
                            f"seq_len {header.seq_len} outside 1..{self.limits.max_tokens}")
        self.dtype = DTYPES[fp.dtype]
        self.positions = []
        for i, layer in enumerate(header.layers):
            if layer.kept_tokens > header.seq_len:
                raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"layer {i} keeps {layer.kept_tokens} tokens of {header.seq_len}")
            try:
                positions = decode_positions(layer.positions, fp.kv_heads, layer.kept_tokens)
            except (ValueError, zstandard.ZstdError) as exc:
                raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"layer {i}: bad positions: {exc}") from None
            if layer.kept_tokens and (positions[:, -1] >= header.seq_len).any():
                raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"layer {i}: a position lies beyond seq_len {header.seq_len}")
            self.positions.append(positions)
        self.codecs = [self.profile.codec(i) for i in range(fp.num_layers)]
        expected = sum(codec.payload_size((1, fp.kv_heads, layer.kept_tokens, fp.head_dim), self.dtype)
                       for codec, layer in zip(self.codecs, header.layers))
        if expected > self.limits.max_transfer_bytes:
            raise WireError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"cache of {expected} bytes exceeds the limit of {self.limits.max_transfer_bytes}")
        # What the decoded cache will occupy in the model's dtype.
        self.expected_bytes = sum(2 * fp.kv_heads * layer.kept_tokens * fp.head_dim * self.dtype.itemsize
                                  for layer in header.layers)
        self.header = header
        self._filled = [0] * fp.num_layers
        self._keys = [[] for _ in header.layers]
        self._values = [[] for _ in header.layers]

    def _add_chunk(self, chunk: pb.Chunk) -> None:
        fp = self.fingerprint
        if chunk.layer >= fp.num_layers:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"chunk for layer {chunk.layer}; the model has {fp.num_layers}")
        kept = self.header.layers[chunk.layer].kept_tokens
        if chunk.token_start != self._filled[chunk.layer] or not chunk.token_start < chunk.token_end <= kept:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"layer {chunk.layer}: chunk [{chunk.token_start}, {chunk.token_end}) does not continue at "
                            f"token {self._filled[chunk.layer]} of {kept}")
        if zlib.crc32(chunk.payload) != chunk.crc32:
            raise WireError(grpc.StatusCode.DATA_LOSS, f"layer {chunk.layer} tokens [{chunk.token_start}, {chunk.token_end}): checksum mismatch")
        shape = (1, fp.kv_heads, chunk.token_end - chunk.token_start, fp.head_dim)
        codec = self.codecs[chunk.layer]
        expected = codec.payload_size(shape, self.dtype)
        if chunk.raw_size != expected:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"layer {chunk.layer}: chunk declares {chunk.raw_size} bytes, profile needs {expected}")
        try:
            raw = bounded_decompress(chunk.payload, expected)
        except (zstandard.ZstdError, ValueError) as exc:
            raise WireError(grpc.StatusCode.DATA_LOSS, f"layer {chunk.layer}: payload does not decompress: {exc}") from None
        keys, values = codec.decode(torch.frombuffer(bytearray(raw), dtype=torch.uint8), shape, self.dtype)
        self._keys[chunk.layer].append(keys)
        self._values[chunk.layer].append(values)
        self._filled[chunk.layer] = chunk.token_end
        self._num_chunks += 1
        self._payload_bytes += len(chunk.payload)

    def _add_trailer(self, trailer: pb.Trailer) -> None:
        if (trailer.num_chunks, trailer.payload_bytes) != (self._num_chunks, self._payload_bytes):
            raise WireError(grpc.StatusCode.DATA_LOSS,
                            f"trailer counts {trailer.num_chunks} chunks / {trailer.payload_bytes} bytes, "
                            f"received {self._num_chunks} / {self._payload_bytes}")
        missing = [i for i, layer in enumerate(self.header.layers) if self._filled[i] != layer.kept_tokens]
        if missing:
            raise WireError(grpc.StatusCode.DATA_LOSS, f"layers {missing} are incomplete")
        self.done = True

    def result(self) -> KVState:
        if not self.done:
            raise WireError(grpc.StatusCode.DATA_LOSS,
                            "stream ended before the trailer: transfer incomplete, nothing injected")
        empty = torch.empty(1, self.fingerprint.kv_heads, 0, self.fingerprint.head_dim, dtype=self.dtype)
        return KVState(
            keys=[torch.cat(parts, dim=2) if parts else empty for parts in self._keys],
            values=[torch.cat(parts, dim=2) if parts else empty for parts in self._values],
            positions=self.positions,
            seq_len=self.header.seq_len,
        )


def decode(frames: Iterable[pb.Frame], fingerprint: pb.Fingerprint, limits: Limits = Limits()) -> KVState:
    assembler = Assembler(fingerprint, limits)
    for frame in frames:
        assembler.add(frame)
    return assembler.result()
