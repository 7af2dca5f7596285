import zlib

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common import wire
from common.kvstate import prefill
from common.profile import parse_profile
from common.proto import kvwire_pb2 as pb

IDS = list(range(200, 260))


@pytest.fixture(scope="module")
def llama_frames(tiny_llama):
    kv = prefill(tiny_llama.model, IDS)
    return kv, list(wire.encode(kv, parse_profile("raw"), tiny_llama.fingerprint))


def assert_wire_error(code, frames, fingerprint, limits=wire.Limits(), match=None):
    with pytest.raises(wire.WireError, match=match) as info:
        wire.decode(frames, fingerprint, limits)
    assert info.value.code == code


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma3"])
def test_raw_round_trip_is_bit_exact(model, request):
    loaded = request.getfixturevalue(model)
    kv = prefill(loaded.model, IDS)
    frames = list(wire.encode(kv, parse_profile("raw"), loaded.fingerprint))
    assert frames[0].WhichOneof("kind") == "header" and frames[-1].WhichOneof("kind") == "trailer"
    back = wire.decode(frames, loaded.fingerprint)
    assert back.seq_len == kv.seq_len
    for a, b in zip(kv.keys + kv.values + kv.positions, back.keys + back.values + back.positions):
        assert torch.equal(a, b)


def test_chunks_are_at_most_one_mebibyte(smollm2):
    kv = prefill(smollm2.model, list(range(1000, 1900)))  # 900 tokens: 5.5 MB of fp32 K/V per 30 layers
    frames = list(wire.encode(kv, parse_profile("raw"), smollm2.fingerprint))
    chunks = [f.chunk for f in frames if f.WhichOneof("kind") == "chunk"]
    assert len(chunks) > smollm2.fingerprint.num_layers  # some layers needed more than one chunk
    assert max(len(c.payload) for c in chunks) <= wire.MAX_CHUNK_BYTES
    assert max(c.raw_size for c in chunks) <= wire.MAX_CHUNK_BYTES


def test_corrupted_chunk_is_data_loss(llama_frames, tiny_llama):
    _, frames = llama_frames
    bad = [pb.Frame.FromString(f.SerializeToString()) for f in frames]
    payload = bytearray(bad[3].chunk.payload)
    payload[len(payload) // 2] ^= 0x40
    bad[3].chunk.payload = bytes(payload)
    assert_wire_error(grpc.StatusCode.DATA_LOSS, bad, tiny_llama.fingerprint, match="checksum")


def test_truncated_stream_is_data_loss(llama_frames, tiny_llama):
    _, frames = llama_frames
    assert_wire_error(grpc.StatusCode.DATA_LOSS, frames[:-2], tiny_llama.fingerprint, match="before the trailer")


def test_dropped_chunk_is_data_loss(llama_frames, tiny_llama):
    _, frames = llama_frames
    bad = frames[:2] + frames[3:]  # the whole of layer 1 is missing
    assert_wire_error(grpc.StatusCode.DATA_LOSS, bad, tiny_llama.fingerprint, match="trailer counts")


def test_out_of_order_chunk_is_rejected(llama_frames, tiny_llama):
    _, frames = llama_frames
    second = pb.Frame.FromString(frames[1].SerializeToString())
    second.chunk.token_start += 1
    bad = [frames[0], second] + frames[2:]
    assert_wire_error(grpc.StatusCode.INVALID_ARGUMENT, bad, tiny_llama.fingerprint, match="does not continue")


def test_header_with_wrong_dimensions_is_rejected(llama_frames, tiny_llama):
    _, frames = llama_frames
    header = pb.Frame.FromString(frames[0].SerializeToString())
    del header.header.layers[-1]
    assert_wire_error(grpc.StatusCode.INVALID_ARGUMENT, [header] + frames[1:], tiny_llama.fingerprint, match="layers")


def test_mismatched_fingerprint_is_failed_precondition(llama_frames, tiny_gemma3):
    _, frames = llama_frames
    assert_wire_error(grpc.StatusCode.FAILED_PRECONDITION, frames, tiny_gemma3.fingerprint, match="fingerprint")


def test_limits_are_checked_before_allocation(llama_frames, tiny_llama):
    _, frames = llama_frames
    assert_wire_error(grpc.StatusCode.RESOURCE_EXHAUSTED, frames, tiny_llama.fingerprint,
                      wire.Limits(max_tokens=len(IDS) - 1), match="seq_len")
    header_only = frames[:1]  # the cache-size check fires on the header alone
    assert_wire_error(grpc.StatusCode.RESOURCE_EXHAUSTED, header_only, tiny_llama.fingerprint,
                      wire.Limits(max_transfer_bytes=10_000), match="exceeds")


def test_frames_before_header_and_after_trailer(llama_frames, tiny_llama):
    _, frames = llama_frames
    assert_wire_error(grpc.StatusCode.INVALID_ARGUMENT, frames[1:], tiny_llama.fingerprint, match="before the header")
    assert_wire_error(grpc.StatusCode.INVALID_ARGUMENT, frames + frames[-1:], tiny_llama.fingerprint, match="after the trailer")


def test_bad_profile_name_in_header(llama_frames, tiny_llama):
    _, frames = llama_frames
    header = pb.Frame.FromString(frames[0].SerializeToString())
    header.header.profile = "int17"
    assert_wire_error(grpc.StatusCode.INVALID_ARGUMENT, [header] + frames[1:], tiny_llama.fingerprint, match="int17")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 50_000), min_size=0, max_size=40, unique=True), min_size=1, max_size=3)
       .filter(lambda rows: len({len(r) for r in rows}) == 1))
def test_positions_round_trip(rows):
    positions = torch.tensor([sorted(r) for r in rows], dtype=torch.int64).reshape(len(rows), -1)
    blob = wire.encode_positions(positions)
    assert torch.equal(wire.decode_positions(blob, *positions.shape), positions)


def with_payload(frame: pb.Frame, payload: bytes) -> pb.Frame:
    """A chunk whose payload was altered and whose checksum was recomputed to match (the CRC missed it)."""
    frame = pb.Frame.FromString(frame.SerializeToString())
    frame.chunk.payload = payload
    frame.chunk.crc32 = zlib.crc32(payload)
    return frame


@pytest.mark.parametrize("profile", ["int4:g32", "nf4", "svd:r8+int8"])
def test_corrupted_or_truncated_compressed_chunk_is_never_decoded(profile, tiny_llama):
    kv = prefill(tiny_llama.model, IDS)
    frames = list(wire.encode(kv, parse_profile(profile), tiny_llama.fingerprint))
    chunk = frames[1].chunk
    truncated = with_payload(frames[1], chunk.payload[: len(chunk.payload) // 2])
    assert_wire_error(grpc.StatusCode.DATA_LOSS, [frames[0], truncated] + frames[2:], tiny_llama.fingerprint,
                      match="decompress|holds")
    garbled = bytearray(chunk.payload)
    garbled[4:12] = b"\xff" * 8  # inside the zstd frame header
    garbled_frame = with_payload(frames[1], bytes(garbled))
    assert_wire_error(grpc.StatusCode.DATA_LOSS, [frames[0], garbled_frame] + frames[2:], tiny_llama.fingerprint)
    short = pb.Frame.FromString(frames[1].SerializeToString())
    short.chunk.raw_size -= 1
    assert_wire_error(grpc.StatusCode.INVALID_ARGUMENT, [frames[0], short] + frames[2:], tiny_llama.fingerprint,
                      match="profile needs")


@pytest.mark.parametrize("profile", ["fp16", "int8", "int4:g32", "int3", "int2", "int1", "nf4", "svd:r8", "svd:r8+int8",
                                     "int2+int8@0-1"])
def test_compressed_round_trip_matches_codec(profile, tiny_llama):
    """The wire adds framing and zstd only: decoding frames equals decoding the codec payload directly."""
    kv = prefill(tiny_llama.model, IDS)
    frames = list(wire.encode(kv, parse_profile(profile), tiny_llama.fingerprint))
    back = wire.decode(frames, tiny_llama.fingerprint)
    codecs = [parse_profile(profile).codec(i) for i in range(kv.num_layers)]
    for layer, codec in enumerate(codecs):
        k, v = codec.decode(codec.encode(kv.keys[layer], kv.values[layer]), tuple(kv.keys[layer].shape), torch.float32)
        assert torch.equal(back.keys[layer], k) and torch.equal(back.values[layer], v)
    payload = sum(len(f.chunk.payload) for f in frames if f.WhichOneof("kind") == "chunk")
    assert sum(map(wire.wire_bytes, frames)) > payload  # framing is counted too


def segmented_frames(kv, fingerprint, plan):
    """plan: [(start, end, profile or None for text)] -> the frames of a segmented transfer."""
    encoder = wire.Encoder(fingerprint)
    frames = [encoder.header(kv.seq_len)]
    for start, end, profile in plan:
        frames += [encoder.text_segment(IDS[start:end], start)] if profile is None else list(
            encoder.kv_segment(kv, start, end, parse_profile(profile)))
    return frames + [encoder.trailer()]


def assemble_segments(frames, fingerprint):
    assembler = wire.Assembler(fingerprint, wire.Limits(), segmented=True)
    for frame in frames:
        assembler.add(frame)
    return assembler, assembler.take_segments()


def test_segments_round_trip(llama_frames, tiny_llama):
    kv, _ = llama_frames
    frames = segmented_frames(kv, tiny_llama.fingerprint, [(0, 20, "raw"), (20, 35, None), (35, 60, "int4:g32")])
    assembler, segments = assemble_segments(frames, tiny_llama.fingerprint)
    assert assembler.done and [(s.start, s.end) for s in segments] == [(0, 20), (20, 35), (35, 60)]
    assert segments[1].kv is None and segments[1].token_ids == IDS[20:35]
    assert torch.equal(segments[0].kv.keys[1], kv.keys[1][:, :, :20])
    assert torch.equal(segments[2].kv.positions[0], kv.positions[0][:, 35:])
    close = wire.decode(wire.encode(kv.token_range(35, 60), parse_profile("int4:g32"), tiny_llama.fingerprint), tiny_llama.fingerprint)
    assert torch.equal(segments[2].kv.values[0], close.values[0])  # same codec as a whole-cache transfer


def test_bad_segments_are_refused(llama_frames, tiny_llama):
    kv, whole = llama_frames
    fp = tiny_llama.fingerprint

    def refused(frames, code, match):
        with pytest.raises(wire.WireError, match=match) as info:
            assemble_segments(frames, fp)
        assert info.value.code == code

    good = segmented_frames(kv, fp, [(0, 30, "raw"), (30, 60, None)])
    gap = segmented_frames(kv, fp, [(0, 30, "raw"), (31, 60, None)])
    refused(gap, grpc.StatusCode.INVALID_ARGUMENT, "does not continue at token 30")
    short = segmented_frames(kv, fp, [(0, 30, "raw")])
    refused(short, grpc.StatusCode.DATA_LOSS, r"cover tokens \[0, 30\) of 60")
    early = good[:2] + good[-2:]  # the text segment before the raw one's chunks
    refused(early, grpc.StatusCode.INVALID_ARGUMENT, "before the chunks of the previous one")
    selected = pb.Frame()
    selected.CopyFrom(good[1])
    selected.segment.profile = "q2c:0.5+int8"
    refused(good[:1] + [selected], grpc.StatusCode.INVALID_ARGUMENT, "precision stages only")
    text = pb.Frame()
    text.CopyFrom(good[-2])
    del text.segment.token_ids[-1]
    refused(good[:-2] + [text], grpc.StatusCode.INVALID_ARGUMENT, "carries 29 token ids")
    refused(whole, grpc.StatusCode.INVALID_ARGUMENT, "TransferSegments needs a segmented header")
    assert_wire_error(grpc.StatusCode.INVALID_ARGUMENT, good, fp, match="goes through TransferSegments")
    with pytest.raises(ValueError, match="precision stages only"):
        list(wire.Encoder(fp).kv_segment(kv, 0, 30, parse_profile("snapkv:0.5")))
