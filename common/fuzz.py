"""Fuzzing the receiver's input path: frames built from arbitrary bytes and from mutated valid transfers.

Each input goes through `wire.Assembler` exactly as the receiver's Transfer handler uses it.
The only acceptable outcomes are a finished KVState or a `WireError` with a status code;
anything else (another exception, a hang, an allocation beyond the limits) is a crash.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from common import wire
from common.proto import kvwire_pb2 as pb

FUZZ_LIMITS = wire.Limits(max_frame_bytes=1 << 20, max_transfer_bytes=8 << 20, max_tokens=4096)


@dataclass
class FuzzReport:
    inputs: int = 0
    accepted: int = 0
    rejected: dict = None
    crashes: list = None

    def __post_init__(self):
        self.rejected = self.rejected or {}
        self.crashes = self.crashes or []


def feed(frames: list[pb.Frame], fingerprint: pb.Fingerprint, report: FuzzReport) -> None:
    report.inputs += 1
    # The receiver's two handlers: Transfer (whole cache) and TransferSegments.
    segmented = bool(frames) and frames[0].WhichOneof("kind") == "header" and frames[0].header.segmented
    assembler = wire.Assembler(fingerprint, FUZZ_LIMITS, segmented)
    try:
        for frame in frames:
            assembler.add(frame)
            assembler.take_segments()
        if segmented and not assembler.done:
            raise wire.WireError(wire.grpc.StatusCode.DATA_LOSS, "stream ended before the trailer")
        if not segmented:
            assembler.result()
        report.accepted += 1
    except wire.WireError as exc:
        report.rejected[exc.code.name] = report.rejected.get(exc.code.name, 0) + 1
    except Exception as exc:  # noqa: BLE001 - any other exception is exactly what fuzzing looks for
        report.crashes.append(f"{type(exc).__name__}: {exc}")


def seed_transfers(kv, fingerprint: pb.Fingerprint) -> list[list[pb.Frame]]:
    """Valid transfers to mutate: whole caches under several profiles, and a segmented one."""
    seeds = [list(wire.encode(kv, p, fingerprint)) for p in ("raw", "int4:g32", "nf4", "svd:r4+int8", "int2+int8@0")]
    encoder = wire.Encoder(fingerprint)
    third = kv.seq_len // 3
    seeds.append([encoder.header(kv.seq_len), *encoder.kv_segment(kv, 0, third, "int8"),
                  encoder.text_segment(list(range(100, 100 + third)), third),
                  *encoder.kv_segment(kv, 2 * third, kv.seq_len, "raw"), encoder.trailer()])
    return seeds


def parse_frames(blobs: list[bytes]) -> list[pb.Frame] | None:
    """What gRPC does with each message: protobuf parsing (a parse failure never reaches kvwire)."""
    try:
        return [pb.Frame.FromString(blob) for blob in blobs]
    except DecodeError:
        return None


def mutate(frames: list[pb.Frame], rng: random.Random) -> list[pb.Frame]:
    """One structural or byte-level mutation of a valid transfer."""
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
        frame.chunk.crc32 = rng.choice([frame.chunk.crc32, wire.zlib.crc32(bytes(payload))])
    elif choice == 6 and kind == "header":
        frame.header.seq_len = rng.choice([0, 1, 2**32 - 1, rng.randrange(1 << 20)])
    elif choice == 7 and kind == "header" and frame.header.layers:
        layer = frame.header.layers[rng.randrange(len(frame.header.layers))]
        layer.kept_tokens = rng.choice([0, 2**32 - 1, rng.randrange(1 << 16)])
        layer.positions = rng.randbytes(rng.randrange(64)) if rng.random() < 0.5 else layer.positions
    elif choice == 8 and kind == "header":
        frame.header.profile = rng.choice(["", "int0", "int4:g0", "svd:r0", "q2c:2", "x" * 300, "int4:g32+int8@0-999",
                                           "nf4", "int2", "svd:r4+int8"])
    elif choice == 9 and kind == "segment":
        segment = frame.segment
        field = rng.randrange(4)
        if field == 0:
            segment.token_start, segment.token_end = rng.randrange(1 << 16), rng.randrange(1 << 16)
        elif field == 1:
            segment.profile = rng.choice(["", "raw", "q2c:0.5+int8", "int3", "bogus"])
        elif field == 2:
            segment.token_ids[:] = [rng.randrange(1 << 32) for _ in range(rng.randrange(8))]
        elif segment.layers:
            segment.layers[rng.randrange(len(segment.layers))].kept_tokens = rng.randrange(1 << 16)
    elif kind == "trailer":
        frame.trailer.num_chunks = rng.randrange(1 << 20)
        frame.trailer.payload_bytes = rng.randrange(1 << 40)
    return frames


def run(fingerprint: pb.Fingerprint, seeds: list[list[pb.Frame]], structured: int, random_bytes: int,
        seed: int = 0) -> FuzzReport:
    """`structured` mutated valid transfers, plus `random_bytes` transfers of arbitrary bytes."""
    rng = random.Random(seed)
    report = FuzzReport()
    for _ in range(structured):
        frames = rng.choice(seeds)
        for _ in range(rng.randint(1, 3)):
            frames = mutate(frames, rng) if frames else frames
        feed(frames, fingerprint, report)
    for _ in range(random_bytes):
        blobs = [rng.randbytes(rng.randrange(200)) for _ in range(rng.randint(1, 4))]
        frames = parse_frames(blobs)
        if frames is not None:
            feed(frames, fingerprint, report)
        else:
            report.inputs += 1  # rejected by protobuf parsing, before kvwire sees it
            report.rejected["PROTOBUF_PARSE"] = report.rejected.get("PROTOBUF_PARSE", 0) + 1
    return report
