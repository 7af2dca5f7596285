"""A chunk frame's bytes (common.framing): written as protobuf serializes them, read as protobuf parses them."""

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from common import framing, wire
from common.proto import kvwire_pb2 as pb


@pytest.mark.parametrize("fields", [dict(), dict(layer=3, token_start=0, token_end=255, raw_size=1 << 20,
                                                 crc32c=2**32 - 1),
                                    dict(layer=0, token_start=127, token_end=128, raw_size=0, crc32c=1)])
@pytest.mark.parametrize("sizes", [(), (0,), (1,), (100, 27), (64, 0, 64), (16000, 383, 1), (1 << 20,)])
def test_a_chunk_serialized_from_its_parts_is_protobufs_own_serialization(fields, sizes):
    """framing.chunk_frame writes a chunk frame from its payload's parts (views of host memory, joined once): the same
    bytes as pb.Frame's SerializeToString, which parse back to the same frame, and which wire_bytes counts alike."""
    rng = np.random.default_rng(len(sizes))
    parts = tuple(memoryview(rng.integers(0, 256, n, dtype=np.uint8)).cast("B") for n in sizes)
    payload = b"".join(parts)
    frame = pb.Frame(chunk=pb.Chunk(payload=payload, **fields))
    serialized = framing.chunk_frame(pb.Chunk(**fields), parts)
    assert serialized == frame.SerializeToString()
    assert pb.Frame.FromString(serialized) == frame and framing.serialize(serialized) is serialized
    assert wire.wire_bytes(serialized) == wire.wire_bytes(frame)
    assert wire.checksum(*parts) == wire.checksum(payload)


def _varint(n: int, padding: int = 0) -> bytes:
    """n as a varint, with `padding` redundant bytes (a longer encoding of the same number, which parsers accept)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if not n and not padding:
            return bytes(out + bytes([byte]))
        out.append(byte | 0x80)
        if not n:
            padding -= 1


def _fields(kinds: list[int]):
    return st.lists(st.tuples(st.integers(0, 9), st.sampled_from(kinds), st.integers(0, 2**64 - 1),
                              st.binary(max_size=40), st.integers(0, 2)), max_size=20)


@st.composite
def _messages(draw):
    """Frames as bytes: chunk-like field sequences (payload last or not, any field, wire type and repeats, redundant
    varints), wrapped as Frame.chunk with the right or a wrong length, then maybe cut, extended or a byte changed."""
    body = bytearray()
    for number, kind, value, blob, padding in draw(_fields([0, 1, 2, 5]) | _fields([0, 1, 2, 5, 3, 4, 7])):
        body += _varint(number << 3 | kind, padding)
        body += {0: _varint(value % 2**64, padding), 1: value.to_bytes(8, "little"),
                 5: (value % 2**32).to_bytes(4, "little"), 2: _varint(len(blob), padding) + blob}.get(kind, b"")
    if draw(st.sampled_from([True, True, False])):
        payload = draw(st.binary(max_size=300))
        body += _varint(6 << 3 | 2, draw(st.integers(0, 1))) + _varint(len(payload)) + payload
    message = bytearray(draw(st.sampled_from([b"\x12", b"\x12", b"\x12", b"\x92\x00", b"\x0a", b"\x1a"])))
    message += _varint(max(0, len(body) + draw(st.sampled_from([0, 0, 0, 0, 0, -1, 1, 5])))) + body
    change = draw(st.sampled_from(["none", "none", "none", "cut", "extend", "flip"]))
    if change == "cut" and message:
        del message[draw(st.integers(0, len(message) - 1)):]
    elif change == "extend":
        message += draw(st.binary(min_size=1, max_size=8))
    elif change == "flip" and message:
        message[draw(st.integers(0, len(message) - 1))] ^= draw(st.integers(1, 255))
    return bytes(message)


def _as_parsed(parse, message: bytes):
    try:
        frame, payload = parse(message)
    except DecodeError:
        return "DecodeError"
    if payload is not None:
        frame.chunk.payload = bytes(payload)
    return frame, frame.SerializeToString(deterministic=True)


@settings(max_examples=3000, deadline=None)
@given(_messages())
def test_a_received_frame_means_what_protobuf_parses_whatever_its_bytes(message):
    """framing.received leaves a chunk's payload in the message (a view): for any bytes at all, the frame with that
    payload put back is protobuf's parse of the whole message, and a message protobuf refuses it refuses too."""
    assert _as_parsed(framing.received, message) == _as_parsed(lambda m: (pb.Frame.FromString(m), None), message)


@pytest.mark.parametrize("sizes", [(), (0,), (1,), (100, 27), (1 << 20,)])
def test_a_chunk_frame_is_received_without_a_copy_of_its_payload(sizes):
    """The frames chunk_frame writes are the ones received splits: the payload is a view of the message."""
    parts = tuple(bytes([i % 251]) * n for i, n in enumerate(sizes))
    message = framing.chunk_frame(pb.Chunk(layer=1, token_start=2, token_end=30, raw_size=9, crc32c=2**32 - 1), parts)
    frame, payload = framing.received(message)
    if sum(sizes):
        assert payload.obj is message and bytes(payload) == b"".join(parts) and not frame.chunk.payload
    frame.chunk.payload = b"".join(parts)
    assert frame == pb.Frame.FromString(message)
