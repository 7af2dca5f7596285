"""Fuzzing the receiver's input path: what a client sees for malformed, hostile or extreme transfers.

Three kinds of input:
- mutated valid transfers (bytes flipped, frames dropped or repeated, fields set to extremes,
  profiles replaced by ones drawn from the grammar);
- grammar transfers: a profile drawn from the grammar, extreme options included (groups up to
  2^28, bits 0..9, huge ranks, per-layer overrides, selection stages, garbled text), with chunks
  whose random payloads have exactly the size that profile implies, so that they reach the decoders;
- frames of arbitrary bytes.

Each input's outcome is what a client would get: "OK", or a status name. In process, the frames
go through `wire.Assembler` as the receiver's handlers use it, and an exception gets the status
the handlers give it (`wire.status_for`). Failures are UNKNOWN and INTERNAL statuses, and crashes:
exceptions the Assembler lets through instead of a WireError (the handlers would still map them,
but each is a check missing from the wire format). A `send` callable replaces the in-process path
with real RPCs (see `kvwire bench fuzz --grpc`).
"""

from __future__ import annotations

import itertools
import random
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import zstandard
from google.protobuf.message import DecodeError

from common import wire
from common.kvstate import KVState
from common.plan import DTYPES, kv_codec
from common.profile import parse_profile
from common.profile.registry import STAGES
from common.profile.stage import Option, Stage, options_of
from common.profile.stages.pca import PCA
from common.profile.stages.precision import NF4, Cast, Int, Raw
from common.profile.stages.selection import Selection
from common.profile.stages.svd import SVD
from common.profile.stages.tier import Tier
from common.proto import kvwire_pb2 as pb
from common.select import METHODS

FUZZ_LIMITS = wire.Limits(max_frame_bytes=1 << 20, max_transfer_bytes=8 << 20, max_tokens=4096)
FAILURE_STATUSES = ("UNKNOWN", "INTERNAL")
PRECISIONS = (Raw, Cast, Int, NF4)
MAX_RANDOM_PAYLOAD = 1 << 18  # a grammar transfer's chunk bigger than this gets a short payload instead
Send = Callable[[list[pb.Frame]], str]  # frames -> "OK" or the status name a client got


@dataclass
class FuzzReport:
    inputs: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)  # status name -> inputs
    crashes: list[str] = field(default_factory=list)  # exceptions the Assembler let through, with where
    slowest_s: float = 0.0

    @property
    def unknown(self) -> int:
        return self.rejected["UNKNOWN"]

    @property
    def internal(self) -> int:
        return self.rejected["INTERNAL"]

    @property
    def failures(self) -> int:
        return len(self.crashes) + self.unknown + self.internal

    def record(self, outcome: str, crash: str | None = None, seconds: float = 0.0) -> None:
        self.inputs += 1
        if outcome == "OK":
            self.accepted += 1
        else:
            self.rejected[outcome] += 1
        if crash is not None:
            self.crashes.append(crash)
        self.slowest_s = max(self.slowest_s, seconds)

    def summary(self) -> str:
        return (f"{self.inputs:,} inputs: {self.accepted:,} accepted, rejected {dict(sorted(self.rejected.items()))}; "
                f"crashes {len(self.crashes)}, UNKNOWN {self.unknown}, INTERNAL {self.internal}; "
                f"slowest input {self.slowest_s:.3f} s")


def is_segmented(frames: list[pb.Frame]) -> bool:
    """Which handler a client would call: TransferSegments for a segmented first header, else Transfer."""
    return bool(frames) and frames[0].WhichOneof("kind") == "header" and frames[0].header.segmented


def assemble(frames: list[pb.Frame], fingerprint: pb.Fingerprint,
             sliding_windows: Mapping[int, int] | None = None) -> tuple[str, str | None]:
    """One input in process, as the receiver's handlers assemble it (each frame serialized, as gRPC delivers it)
    -> (outcome, crash or None)."""
    segmented = is_segmented(frames)
    assembler = wire.Assembler(fingerprint, FUZZ_LIMITS, segmented, sliding_windows)
    try:
        for frame in frames:
            assembler.add_message(frame.SerializeToString())
            assembler.take_segments()
        if segmented and not assembler.done:
            raise wire.WireError(wire.grpc.StatusCode.DATA_LOSS, "stream ended before the trailer")
        if not segmented:
            assembler.result()
        return "OK", None
    except wire.WireError as exc:
        return exc.code.name, None
    except Exception as exc:  # noqa: BLE001 - any other exception is exactly what fuzzing looks for
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return wire.status_for(exc)[0].name, f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"


def feed(frames: list[pb.Frame], fingerprint: pb.Fingerprint, report: FuzzReport, send: Send | None = None,
         sliding_windows: Mapping[int, int] | None = None) -> None:
    """Record one input's outcome: in process, or through `send`."""
    start = time.perf_counter()
    outcome, crash = assemble(frames, fingerprint, sliding_windows) if send is None else (send(frames), None)
    report.record(outcome, crash, time.perf_counter() - start)


def seed_transfers(kv: KVState, fingerprint: pb.Fingerprint) -> list[list[pb.Frame]]:
    """Valid transfers to mutate: whole caches under several profiles, and a segmented one."""
    seeds = [list(wire.encode(kv, parse_profile(p), fingerprint))
             for p in ("raw", "int4:g32", "nf4", "svd:r4+int8", "int2+int8@0")]
    encoder = wire.Encoder(fingerprint)
    third = kv.seq_len // 3
    seeds.append([encoder.header(kv.seq_len), *encoder.kv_segment(kv, 0, third, parse_profile("int8")),
                  encoder.text_segment(list(range(100, 100 + third)), third),
                  *encoder.kv_segment(kv, 2 * third, kv.seq_len, parse_profile("raw")), encoder.trailer()])
    return seeds


def parse_frames(blobs: list[bytes]) -> list[pb.Frame] | None:
    """What gRPC does with each message: protobuf parsing (a parse failure never reaches kvwire)."""
    try:
        return [pb.Frame.FromString(blob) for blob in blobs]
    except DecodeError:
        return None


# --- profiles drawn from the grammar's registry (common/profile/), extremes included -------------------------

def random_number(rng: random.Random) -> int:
    """A group size, rank or count: small ones (1..256), the edges of the caps (4096), anything in
    1..2^28 (log-uniform), or an extreme: 0, around 2^32, 2^64, 40 digits."""
    draw = rng.random()
    if draw < 0.4:
        return int(2 ** rng.uniform(0, 8))
    if draw < 0.55:
        return rng.choice([4095, 4096, 4097, 8192])
    if draw < 0.9:
        return int(2 ** rng.uniform(0, 28))
    return rng.choice([0, 2**31, 2**32 - 1, 2**32, 2**64, 10**40])


def garbage(rng: random.Random) -> str:
    """Text the grammar does not expect: punctuation, digits of other scripts, long runs."""
    alphabet = "abcdefgkrstvxz0123456789:+@-=.,_ \t\u0663\u00e9\u2212\U0001f600"
    return rng.choice(["", "x" * rng.choice([1, 300, 3000]), "9" * rng.choice([20, 5000])] +
                      ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12)))])


def random_value(rng: random.Random, option: Option) -> str:
    """A value for a field of a stage: inside its bounds mostly, on or past them, or an extreme."""
    if option.kind is str and option.letter:  # a hash
        return rng.choice(["0123456789abcdef", "f" * 15, "g" * 16, rng.randbytes(8).hex()])
    low = 0 if option.low is None else option.low
    high = 2 ** 16 if option.high is None else option.high
    draw = rng.random()
    if draw < 0.6:
        value = rng.uniform(low, high) if option.kind is float else rng.randint(int(low), int(high))
    elif draw < 0.9:  # the edges, and just past the top
        value = rng.choice([max(low - 1, 0), low, high, high, high + 1])
    else:
        return str(random_number(rng)) if option.kind is int else rng.choice(["nan", "inf", "1e3", "0.0", "8.5"])
    return f"{value:.3g}" if option.kind is float else str(int(value))


def random_options(rng: random.Random, stage: type[Stage]) -> list[str]:
    """Some of the stage's options (every kind of option the registry describes), in a random order."""
    tokens = []
    for name, option, default in options_of(stage):
        required = default is None and name not in ("layers", "digest", "key_bits", "floor", "symmetric")
        if option.in_name or option.positional or name == "layers" or rng.random() < (0.05 if required else 0.5):
            continue
        if option.words:
            tokens.append(rng.choice(list(option.words)))
        elif option.flag:
            tokens.append(option.flag)
        elif option.assign:
            tokens.append(f"{option.assign}={rng.choice(option.choices) if rng.random() < 0.9 else 'chan'}")
        elif option.letter:
            tokens.append(f"{option.letter}{random_value(rng, option)}")
        elif option.spelled and stage is PCA:
            tokens += rng.choice([["w"], ["w", "e"], ["w", "e", "j"], ["w", "e"], ["w", "e", "j"], ["e"], ["j"]])
    rng.shuffle(tokens)
    return tokens


def random_stage(rng: random.Random, stage: type[Stage] | None = None) -> str:
    """A stage of the registry (any kind unless given) with some of its options; sometimes a near miss."""
    stage = stage or rng.choice(STAGES)
    if stage is Int:
        name = f"int{rng.randrange(10)}"
    elif stage is Selection:
        name = rng.choice([*METHODS, "q2x"])
    else:
        name = rng.choice(stage.names())
    if stage is Selection:
        keep = rng.choice([f"{rng.random():.3g}", "1.0", "1", "0", "1.5", "nan", "inf", "-1", "1e-9",
                           f"{random_number(rng)}t", "0t", "t"])
        known = METHODS[name].grammar_options if name in METHODS else {}
        own = [*(f"{k}{random_number(rng)}" for k, (_, kind) in known.items() if kind is not str),
               *(f"{k}{rng.random():.2f}" for k, (_, kind) in known.items() if kind is not str),
               *(k for k, (_, kind) in known.items() if kind is str)]
        options = [keep, *random_options(rng, stage), *rng.sample(own, min(len(own), rng.choice([0, 1, 2])))]
    elif stage is Tier:
        options = [rng.choice(["0.1", "0.6", "1", "1.5", "nan", "-0.1"])]
        if rng.random() < 0.95:
            options.append(random_stage(rng, rng.choice(PRECISIONS)))
    else:
        options = random_options(rng, stage)
    if rng.random() < 0.05:
        options.append(garbage(rng))
    return ":".join([name, *options])


def random_layers(rng: random.Random, num_layers: int) -> str:
    """A per-layer override's range: @A or @A-B, inside the model, past it, reversed or huge."""
    first = rng.choice([0, rng.randrange(num_layers + 2), random_number(rng)])
    if rng.random() < 0.3:
        return f"@{first}"
    return f"@{first}-{rng.choice([first, first + 1, rng.randrange(num_layers + 2), random_number(rng)])}"


def random_profile(rng: random.Random, num_layers: int = 4) -> str:
    """A profile drawn from the grammar's registry: a selection, svd, a precision, per-layer stages and any
    other stages with any of their options, sometimes garbled."""
    stages = []
    if rng.random() < 0.3:
        stages.append(random_stage(rng, Selection))
    if rng.random() < 0.3:
        stages.append(random_stage(rng, SVD))
    if rng.random() < 0.8:
        stages.append(random_stage(rng, rng.choice([*PRECISIONS, PCA])))
    for _ in range(rng.choice([0, 0, 1, 2])):
        stages.append(random_stage(rng, rng.choice([*PRECISIONS, PCA])) + random_layers(rng, num_layers))
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        stages.append(random_stage(rng))
    if rng.random() < 0.1:
        stages.append(random_stage(rng, Tier))
    rng.shuffle(stages)
    text = "+".join(stages) or "raw"
    if rng.random() < 0.1:
        cut = rng.randrange(len(text) + 1)
        text = text[:cut] + garbage(rng) + text[cut + rng.randrange(3):]
    return text


# --- grammar transfers -------------------------------------------------------------------------------

def random_chunks(kv: KVState, profile: str, fingerprint: pb.Fingerprint, encoder: wire.Encoder,
                  rng: random.Random) -> list[pb.Frame]:
    """Chunks for every kept token of `kv`, one or two per layer, whose payloads are random bytes of
    exactly the size `profile` implies (when it parses; a short random payload when it does not)."""
    try:
        parsed = parse_profile(profile)
        codecs = [kv_codec(parsed, layer) for layer in range(kv.num_layers)]
    except ValueError:
        codecs = None
    compressor = zstandard.ZstdCompressor()
    frames = []
    for layer in range(kv.num_layers):
        kept = kv.kept_tokens(layer)
        cut = rng.randrange(1, kept) if kept > 1 and rng.random() < 0.5 else kept
        for start, end in ((0, cut), (cut, kept)):
            if start == end:
                continue
            shape = (1, fingerprint.kv_heads, end - start, fingerprint.head_dim)
            size = codecs[layer].payload_size(shape, DTYPES[fingerprint.dtype]) if codecs else rng.randrange(1024)
            if size > MAX_RANDOM_PAYLOAD:
                size = rng.randrange(1024)
            raw = rng.randbytes(size) if rng.random() < 0.8 else bytes(size)
            payload = compressor.compress(raw)
            encoder.num_chunks += 1
            encoder.payload_bytes += len(payload)
            frames.append(pb.Frame(chunk=pb.Chunk(layer=layer, token_start=start, token_end=end, raw_size=len(raw),
                                                  crc32c=wire.checksum(payload), payload=payload)))
    return frames


def grammar_transfer(kv: KVState, fingerprint: pb.Fingerprint, rng: random.Random) -> list[pb.Frame]:
    """A whole-cache or segmented transfer of `kv` under profiles drawn from the grammar."""
    encoder = wire.Encoder(fingerprint)
    if rng.random() < 0.7:
        header = encoder.header(kv.seq_len, kv.positions)
        header.header.profile = random_profile(rng, kv.num_layers)
        chunks = random_chunks(kv, header.header.profile, fingerprint, encoder, rng)
        return [header, *chunks, encoder.trailer()]
    frames = [encoder.header(kv.seq_len)]
    cuts = sorted({0, kv.seq_len, *(rng.randrange(1, kv.seq_len) for _ in range(rng.randrange(3)))})
    for start, end in itertools.pairwise(cuts):
        if rng.random() < 0.2:
            frames.append(encoder.text_segment([rng.randrange(1000) for _ in range(end - start)], start))
            continue
        part = kv.token_range(start, end)
        profile = random_profile(rng, kv.num_layers)
        frames.append(pb.Frame(segment=pb.Segment(token_start=start, token_end=end, profile=profile,
                                                  layers=wire.layer_headers(part.positions))))
        frames += random_chunks(part, profile, fingerprint, encoder, rng)
    return frames + [encoder.trailer()]


# --- mutations of valid transfers ----------------------------------------------------------------------

def mutate(frames: list[pb.Frame], rng: random.Random, kv_heads: int = 1) -> list[pb.Frame]:
    """One structural or byte-level mutation of a valid transfer (of a model with `kv_heads`)."""
    frames = [pb.Frame.FromString(f.SerializeToString()) for f in frames]
    choice = rng.randrange(10)
    index = rng.randrange(len(frames))
    frame = frames[index]
    kind = frame.WhichOneof("kind")
    if choice == 0:  # flip bytes of a serialized frame
        blob = bytearray(frame.SerializeToString())
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        parsed = parse_frames([bytes(blob)])
        if parsed:
            frames[index] = parsed[0]
    elif choice == 1:  # drop, duplicate or swap frames
        if rng.random() < 0.5 and len(frames) > 1:
            del frames[index]
        else:
            frames.insert(index, frames[rng.randrange(len(frames))])
    elif choice == 2 and kind == "chunk":
        frame.chunk.layer = rng.choice([0, 1, 2**31, rng.randrange(64)])
    elif choice == 3 and kind == "chunk":
        frame.chunk.token_start = rng.randrange(1 << 16)
        frame.chunk.token_end = rng.randrange(1 << 16)
    elif choice == 4 and kind == "chunk":
        frame.chunk.raw_size = rng.choice([0, 1, 2**32 - 1, rng.randrange(1 << 22)])
    elif choice == 5 and kind == "chunk":
        payload = bytearray(frame.chunk.payload)
        del payload[rng.randrange(len(payload) + 1):]
        frame.chunk.payload = bytes(payload)
        frame.chunk.crc32c = rng.choice([frame.chunk.crc32c, wire.checksum(bytes(payload))])
    elif choice == 6 and kind == "header":
        frame.header.seq_len = rng.choice([0, 1, 2**32 - 1, rng.randrange(1 << 20)])
    elif choice == 7 and kind in ("header", "segment") and getattr(frame, kind).layers:
        layers = getattr(frame, kind).layers
        mutate_layer(layers[rng.randrange(len(layers))], rng, kv_heads)
    elif choice == 8 and kind == "header":
        frame.header.profile = random_profile(rng)
    elif choice == 9 and kind == "segment":
        segment = frame.segment
        field_ = rng.randrange(3)
        if field_ == 0:
            segment.token_start, segment.token_end = rng.randrange(1 << 16), rng.randrange(1 << 16)
        elif field_ == 1:
            segment.profile = rng.choice(["", random_profile(rng)])
        else:
            segment.token_ids[:] = [rng.randrange(1 << 32) for _ in range(rng.randrange(8))]
    elif kind == "trailer":
        frame.trailer.num_chunks = rng.randrange(1 << 20)
        frame.trailer.payload_bytes = rng.randrange(1 << 40)
    return frames


def mutate_layer(layer: pb.LayerHeader, rng: random.Random, kv_heads: int) -> None:
    """Extreme kept counts, random position bytes, or well-formed positions that break a rule
    (a repeated position, a range shifted before or past the segment)."""
    choice = rng.randrange(3)
    kept = layer.kept_tokens
    if choice == 0:
        layer.kept_tokens = rng.choice([0, 1, 2**32 - 1, rng.randrange(1 << 16)])
    elif choice == 1:
        layer.positions = rng.randbytes(rng.randrange(64))
    elif 0 < kept < 1 << 16:
        positions = (torch.arange(kept) + rng.choice([-1, 0, 1, 1 << 20])).clamp_min(0).expand(kv_heads, kept).clone()
        if kept > 1 and rng.random() < 0.5:
            positions[:, rng.randrange(1, kept)] = positions[:, 0]
        layer.positions = wire.encode_positions(positions)


def run(fingerprint: pb.Fingerprint, seeds: list[list[pb.Frame]], structured: int, random_bytes: int,
        seed: int = 0, *, grammar: int = 0, kv: KVState | None = None, send: Send | None = None,
        sliding_windows: Mapping[int, int] | None = None) -> FuzzReport:
    """`structured` mutated valid transfers, `grammar` grammar transfers of `kv`, then `random_bytes`
    transfers of arbitrary bytes; in process, or through `send`."""
    rng = random.Random(seed)
    report = FuzzReport()
    for _ in range(structured):
        frames = rng.choice(seeds)
        for _ in range(rng.randint(1, 3)):
            frames = mutate(frames, rng, fingerprint.kv_heads) if frames else frames
        feed(frames, fingerprint, report, send, sliding_windows)
    for _ in range(grammar):
        feed(grammar_transfer(kv, fingerprint, rng), fingerprint, report, send, sliding_windows)
    for _ in range(random_bytes):
        frames = parse_frames([rng.randbytes(rng.randrange(200)) for _ in range(rng.randint(1, 4))])
        if frames is None:
            report.record("PROTOBUF_PARSE")  # refused by gRPC's protobuf parsing, before kvwire sees it
        else:
            feed(frames, fingerprint, report, send, sliding_windows)
    return report
