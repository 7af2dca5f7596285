"""A chunk frame's bytes, both ways, without protobuf's copies of its payload: the sender writes them from the
payload's parts in one copy (`chunk_frame`), the receiver reads them with the payload left in gRPC's message
(`received`). Each is what protobuf's own serialization gives, or means: tested on arbitrary bytes."""

from __future__ import annotations

from common.proto import kvwire_pb2 as pb


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


FRAME_CHUNK_TAG, CHUNK_PAYLOAD_TAG = b"\x12", b"\x32"  # Frame.chunk (field 2) and Chunk.payload (6), length-delimited


def chunk_frame(chunk: pb.Chunk, parts: tuple) -> bytes:
    """`pb.Frame(chunk=chunk)` with the bytes-like `parts` end to end as its payload, serialized: the bytes
    SerializeToString gives (the payload is the chunk's last field), in one copy of the parts. A pb.Frame copies a
    payload three times on its way out (joined, set into the field, serialized)."""
    size = sum(map(len, parts))
    head = chunk.SerializeToString()
    payload_head = CHUNK_PAYLOAD_TAG + _varint(size) if size else b""
    return b"".join((FRAME_CHUNK_TAG, _varint(len(head) + len(payload_head) + size), head, payload_head, *parts))


MAX_HEAD_FIELDS = 16  # a chunk's fields before its payload (chunk_frame writes 5): more, and it is parsed whole


def _varint_at(data: bytes, at: int) -> tuple[int, int]:
    """The varint at data[at] and the index after it; IndexError where it runs past the data or 10 bytes."""
    value = shift = 0
    for i in range(at, at + 10):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    raise IndexError("varint of more than 10 bytes")


def _chunk_layout(message: bytes) -> tuple[int, int, int] | None:
    """Where a serialized frame laid out as chunk_frame writes it keeps its parts: (where the chunk's fields begin,
    where its payload field begins, where the payload begins); None for any other layout. That layout is one chunk
    field spanning the message, whose last field, ending at the message's end, is its payload."""
    if message[:1] != FRAME_CHUNK_TAG:
        return None
    try:
        length, start = _varint_at(message, 1)
        if start + length != len(message):
            return None
        at = start
        for _ in range(MAX_HEAD_FIELDS + 1):
            field_start = at
            field, at = _varint_at(message, at)
            kind = field & 7
            if kind == 0:
                _, at = _varint_at(message, at)
            elif kind in (1, 5):  # 64 and 32 bits
                at += 8 if kind == 1 else 4
            elif kind == 2:
                size, body = _varint_at(message, at)
                if field == CHUNK_PAYLOAD_TAG[0] and body + size == len(message):
                    return start, field_start, body
                at = body + size
            else:  # groups: never written
                return None
            if at >= len(message):
                return None
    except IndexError:
        return None
    return None


def received(message: bytes) -> tuple[pb.Frame, memoryview | None]:
    """A frame as gRPC delivers it (serialized) -> (the frame, its chunk's payload as a view of `message`, or None).

    A chunk frame laid out as chunk_frame writes it is parsed without its payload (protobuf parses the fields before
    it) and the payload stays in the message: no copy of it (protobuf's parse and each read of the field would each
    copy it). It means what parsing it whole would: a frame of one chunk field, whose last field is its payload. Any
    other message is parsed whole (payload None), and one that is not a frame raises protobuf's DecodeError."""
    layout = _chunk_layout(message)
    if layout is None:
        return pb.Frame.FromString(message), None
    start, payload_field, payload = layout
    view = memoryview(message)
    return pb.Frame(chunk=pb.Chunk.FromString(view[start:payload_field])), view[payload:]


def serialize(frame: pb.Frame | bytes) -> bytes:
    """A frame as gRPC sends it: a pb.Frame serialized, or a frame serialized already (`Encoder(serialized=True)`)
    as it is."""
    return frame if isinstance(frame, bytes) else frame.SerializeToString()
