
import grpc
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from common import framing, wire
from common.kvstate import prefill
from common.profile import ProfileError, parse_profile
from common.proto import kvwire_pb2 as pb
from common.quant.base import QuantError
from common.plan import kv_codec

IDS = list(range(200, 260))


@pytest.fixture(scope="module")
def llama_frames(tiny_llama):
    kv = prefill(tiny_llama.model, IDS)
    return kv, list(wire.encode(kv, parse_profile("raw"), tiny_llama.fingerprint))


def assert_wire_error(code, frames, fingerprint, limits=None, match=None, sliding_windows=None):
    with pytest.raises(wire.WireError, match=match) as info:
        wire.decode(frames, fingerprint, limits or wire.Limits(), sliding_windows)
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


def test_chunks_compressed_in_parallel_are_the_bytes_of_one_thread(smollm2):
    """A tier's chunks are compressed by a pool of threads: the frames, in order, must be what one
    thread makes (raw: two chunks per layer here)."""
    kv = prefill(smollm2.model, list(range(1000, 1900)))
    for spec in ("raw", "int4"):
        one, four = (wire.Encoder(smollm2.fingerprint, "t", zstd_threads=n) for n in (1, 4))
        frames = [[f.SerializeToString() for f in encoder.chunks(kv, parse_profile(spec))] for encoder in (one, four)]
        assert frames[0] == frames[1], spec
        assert one.payload_bytes == four.payload_bytes and one.num_chunks == four.num_chunks >= smollm2.fingerprint.num_layers
        if spec == "raw":
            assert one.num_chunks > smollm2.fingerprint.num_layers


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
    frame.chunk.crc32c = wire.checksum(payload)
    return frame


@pytest.mark.parametrize("profile", ["raw", "fp16", "svd:r8+int8"])
def test_corrupted_or_truncated_compressed_chunk_is_never_decoded(profile, tiny_llama, monkeypatch):
    monkeypatch.setattr(wire, "MIN_ZSTD_SAVING", 0.0)  # zstd wherever it is shorter
    kv = prefill(tiny_llama.model, IDS)
    frames = list(wire.encode(kv, parse_profile(profile), tiny_llama.fingerprint))
    chunk = frames[1].chunk
    assert len(chunk.payload) < chunk.raw_size  # compressed
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


def test_packed_codes_are_stored_and_raw_floats_compressed(smollm2):
    """zstd saves a few percent of packed codes (3% here), under MIN_ZSTD_SAVING: their chunks travel
    stored, a payload of exactly raw_size bytes; bf16 (21%) keeps zstd. Either way they decode alike."""
    kv = prefill(smollm2.model, list(range(1000, 1900)))
    for spec, stored in (("int4:g32", True), ("int8", True), ("bf16", False)):
        frames = list(wire.encode(kv, parse_profile(spec), smollm2.fingerprint))
        chunks = [f.chunk for f in frames if f.WhichOneof("kind") == "chunk"]
        assert all((len(c.payload) == c.raw_size) == stored for c in chunks), spec
        zstd = [zstandard.ZstdCompressor(level=3).compress(wire.chunk_raw(c.payload, c.raw_size)) for c in chunks]
        saving = 1 - sum(map(len, zstd)) / sum(c.raw_size for c in chunks)
        assert (saving < wire.MIN_ZSTD_SAVING) == stored, (spec, saving)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(wire, "MIN_ZSTD_SAVING", 0.0)  # zstd wherever it is shorter
            compressed = list(wire.encode(kv, parse_profile(spec), smollm2.fingerprint))
        assert sum(map(wire.wire_bytes, compressed)) < sum(map(wire.wire_bytes, frames)) or not stored
        back, reference = wire.decode(frames, smollm2.fingerprint), wire.decode(compressed, smollm2.fingerprint)
        assert all(torch.equal(a, b) for a, b in zip(back.keys + back.values, reference.keys + reference.values))


def test_a_zstd_payload_is_always_shorter_than_its_raw_bytes(tiny_llama, monkeypatch):
    """A payload of raw_size bytes is read as stored, so zstd output that is no shorter is stored instead."""
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()
    assert wire._compress_or_store(3, noise) == noise
    assert len(wire._compress_or_store(3, bytes(4096))) < 4096
    monkeypatch.setattr(wire, "MIN_ZSTD_SAVING", 0.0)
    kv = prefill(tiny_llama.model, IDS)
    for frame in wire.encode(kv, parse_profile("int4:g32"), tiny_llama.fingerprint):
        if frame.WhichOneof("kind") == "chunk":
            assert len(frame.chunk.payload) <= frame.chunk.raw_size


def test_a_stored_chunk_cut_short_is_refused(tiny_llama):
    kv = prefill(tiny_llama.model, IDS)
    frames = list(wire.encode(kv, parse_profile("int4:g32"), tiny_llama.fingerprint))
    chunk = frames[1].chunk
    assert len(chunk.payload) == chunk.raw_size  # stored
    for payload in (chunk.payload[:-1], chunk.payload + b"\0"):
        assert_wire_error(grpc.StatusCode.DATA_LOSS, [frames[0], with_payload(frames[1], payload)] + frames[2:],
                          tiny_llama.fingerprint, match="decompress")


@pytest.mark.parametrize("profile", ["fp16", "int8", "int4:g32", "int3", "int2", "int1", "nf4", "svd:r8", "svd:r8+int8",
                                     "int2+int8@0-1", "int4:g4096", "int1:g4096", "nf4:g4096", "svd:r4096+int8:g4096"])
def test_compressed_round_trip_matches_codec(profile, tiny_llama):
    """The wire adds framing and zstd only: decoding frames equals decoding the codec payload directly."""
    kv = prefill(tiny_llama.model, IDS)
    frames = list(wire.encode(kv, parse_profile(profile), tiny_llama.fingerprint))
    back = wire.decode(frames, tiny_llama.fingerprint)
    codecs = [kv_codec(parse_profile(profile), i) for i in range(kv.num_layers)]
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


def test_a_group_past_the_cap_is_refused_from_the_header(llama_frames, tiny_llama):
    """int4:g268435456 used to reach the decoder, which tried to allocate 206 GB: now the header is refused."""
    _, frames = llama_frames
    for profile in ("int4:g268435456", "nf4:g4194304", "svd:r4294967296", "int2+int8:g100000@1"):
        header = pb.Frame.FromString(frames[0].SerializeToString())
        header.header.profile = profile
        assert_wire_error(grpc.StatusCode.INVALID_ARGUMENT, [header], tiny_llama.fingerprint, match="at most 4096")


def with_positions(frame: pb.Frame, layer: int, positions: torch.Tensor) -> pb.Frame:
    """A copy of a header or segment frame whose `layer` keeps `positions`, (kv_heads, kept)."""
    frame = pb.Frame.FromString(frame.SerializeToString())
    header = getattr(frame, frame.WhichOneof("kind"))
    header.layers[layer].kept_tokens = positions.shape[1]
    header.layers[layer].positions = wire.encode_positions(positions)
    return frame


def heads(fingerprint, positions) -> torch.Tensor:
    return torch.as_tensor(positions).expand(fingerprint.kv_heads, -1)


def test_kept_positions_must_increase_strictly(llama_frames, tiny_llama):
    _, frames = llama_frames
    fp = tiny_llama.fingerprint
    repeated = with_positions(frames[0], 1, heads(fp, [0, 5, 5, 9]))
    assert_wire_error(grpc.StatusCode.INVALID_ARGUMENT, [repeated], fp, match="increase strictly")
    selected = with_positions(frames[0], 1, heads(fp, [0, 5, 6, 9]))  # a selection: any increasing subset
    assert wire.Assembler(fp, wire.Limits()).add(selected) is None


def test_dense_positions_are_taken_whole_and_still_bounded(llama_frames, tiny_llama):
    """A run of consecutive positions, the same for every head (a cache without selection), skips the sums and
    the per-head checks (wire.dense_start); its bounds are still checked, and anything else takes the long way."""
    kv, frames = llama_frames
    fp = tiny_llama.fingerprint
    assert wire.dense_start(wire.position_deltas(frames[0].header.layers[0].positions, fp.kv_heads, kv.seq_len)) == 0
    assert torch.equal(wire.decode(frames, fp).positions[0], torch.arange(kv.seq_len).expand(fp.kv_heads, -1))
    late = with_positions(frames[0], 1, heads(fp, range(1, kv.seq_len + 1)))  # the run ends at seq_len
    assert_wire_error(grpc.StatusCode.INVALID_ARGUMENT, [late], fp, match="beyond")
    staggered = torch.stack([torch.arange(h, h + 4) for h in range(fp.kv_heads)])  # each head its own run
    assert wire.dense_start(np.diff(staggered.numpy(), axis=1, prepend=0).astype("<u4")) is None
    assert wire.Assembler(fp, wire.Limits()).add(with_positions(frames[0], 1, staggered)) is None


@pytest.fixture(scope="module")
def gemma_cache(tiny_gemma3):
    kv = prefill(tiny_gemma3.model, IDS)  # 60 tokens: its sliding layers keep the last 15
    return kv, list(wire.encode(kv, parse_profile("raw"), tiny_gemma3.fingerprint)), wire.sliding_windows(tiny_gemma3.config)


def test_sliding_windows_are_what_prefill_keeps(tiny_gemma3, tiny_llama, gemma_cache):
    kv, _, windows = gemma_cache
    assert set(windows) == tiny_gemma3.sliding_layers == {0, 1, 3}
    assert {layer: kv.kept_tokens(layer) for layer in windows} == windows == {0: 15, 1: 15, 3: 15}
    assert wire.sliding_windows(tiny_llama.config) == {}


@pytest.mark.parametrize("tokens", [10, 15, 60], ids=lambda n: f"{n}-tokens")
def test_sliding_layers_as_prefilled_are_accepted(tiny_gemma3, gemma_cache, tokens):
    windows = gemma_cache[2]
    kv = prefill(tiny_gemma3.model, IDS[:tokens])
    back = wire.decode(wire.encode(kv, parse_profile("int8"), tiny_gemma3.fingerprint), tiny_gemma3.fingerprint,
                       sliding_windows=windows)
    assert all(torch.equal(a, b) for a, b in zip(back.positions, kv.positions))


def test_a_sliding_layer_must_carry_exactly_the_tail(tiny_gemma3, gemma_cache):
    """Positions seq_len - w .. seq_len - 1 (w = what its cache keeps), no more, no fewer, nowhere else."""
    _, frames, windows = gemma_cache
    fp = tiny_gemma3.fingerprint

    def refused(layer, positions, match):
        header = with_positions(frames[0], layer, heads(fp, positions))
        assert_wire_error(grpc.StatusCode.INVALID_ARGUMENT, [header] + frames[1:], fp, match=match,
                          sliding_windows=windows)

    refused(0, torch.arange(60), r"sliding-window layer of 15 tokens: it keeps positions \[45, 60\)")
    refused(3, torch.arange(50, 60), r"keeps positions \[45, 60\) of \[0, 60\), not 10 tokens")
    refused(1, torch.arange(15), r"positions must be \[45, 60\)")
    refused(0, torch.cat([torch.arange(44, 45), torch.arange(46, 60)]), r"positions must be \[45, 60\)")
    selected = with_positions(frames[0], 2, heads(fp, torch.arange(0, 60, 2)))  # a full layer may be selected
    assert wire.Assembler(fp, wire.Limits(), sliding_windows=windows).add(selected) is None


def test_segments_of_a_sliding_window_model(tiny_gemma3, gemma_cache):
    """Each segment's sliding layers carry the part of the sequence's tail inside the segment."""
    kv, _, windows = gemma_cache
    fp = tiny_gemma3.fingerprint
    frames = segmented_frames(kv, fp, [(0, 30, "raw"), (30, 50, "int8"), (50, 60, "raw")])
    assembler = wire.Assembler(fp, wire.Limits(), segmented=True, sliding_windows=windows)
    for frame in frames:
        assembler.add(frame)
    segments = assembler.take_segments()
    assert assembler.done and [s.kv.kept_tokens(0) for s in segments] == [0, 5, 10]
    assert [s.kv.kept_tokens(2) for s in segments] == [30, 20, 10]
    second = frames.index(next(f for f in frames if f.WhichOneof("kind") == "segment" and f.segment.token_start == 30))
    for layer, positions, match in [(0, torch.arange(30, 50), "sliding-window layer"),
                                    (2, torch.arange(30, 49), "segments carry no selection")]:
        bad = frames[:second] + [with_positions(frames[second], layer, heads(fp, positions))] + frames[second + 1:]
        with pytest.raises(wire.WireError, match=match) as info:
            assembler = wire.Assembler(fp, wire.Limits(), segmented=True, sliding_windows=windows)
            for frame in bad:
                assembler.add(frame)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_segment_keeps_every_token_of_its_range(llama_frames, tiny_llama):
    kv, _ = llama_frames
    fp = tiny_llama.fingerprint
    good = segmented_frames(kv, fp, [(0, 30, "raw"), (30, 60, None)])
    for positions, match in [(torch.arange(29), "keeps 29 tokens of its segment"),
                             (torch.arange(1, 31), "beyond its segment"),
                             (torch.tensor([0, *range(29)]), "increase strictly")]:
        bad = [good[0], with_positions(good[1], 2, heads(fp, positions))]
        with pytest.raises(wire.WireError, match=match) as info:
            assemble_segments(bad, fp)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("exc,code", [
    (wire.WireError(grpc.StatusCode.DATA_LOSS, "checksum"), grpc.StatusCode.DATA_LOSS),
    (zstandard.ZstdError("corrupt"), grpc.StatusCode.DATA_LOSS),
    (MemoryError("receiver busy"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 206158430208 bytes"),
     grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ValueError("layers hold different numbers of tokens"), grpc.StatusCode.INVALID_ARGUMENT),
    (ProfileError("int17"), grpc.StatusCode.INVALID_ARGUMENT),
    (QuantError("payload"), grpc.StatusCode.INVALID_ARGUMENT),
    (RuntimeError("shape mismatch"), grpc.StatusCode.INTERNAL),
    (KeyError("layer"), grpc.StatusCode.INTERNAL),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.name)
def test_every_exception_has_a_specific_status(exc, code):
    got, message = wire.status_for(exc)
    assert got == code and got != grpc.StatusCode.UNKNOWN
    assert str(exc).strip("'") in message
    if code == grpc.StatusCode.INTERNAL:
        assert type(exc).__name__ in message


def test_a_text_head_makes_a_segmented_transfer_that_transfer_also_takes(llama_frames, tiny_llama):
    kv, _ = llama_frames
    fp = tiny_llama.fingerprint
    frames = list(wire.encode(kv, parse_profile("int4+text:h"), fp, head_ids=IDS[:9]))
    assert frames[0].header.segmented and not frames[0].header.profile
    assert list(frames[1].segment.token_ids) == IDS[:9] and frames[2].segment.profile == "int4:g32"
    assert (frames[2].segment.token_start, frames[2].segment.token_end) == (9, 60)
    assembler = wire.Assembler(fp, wire.Limits(), segmented=None)  # the Transfer call: either kind
    for frame in frames:
        assembler.add(frame)
    head, rest = assembler.take_segments()
    assert assembler.done and head.token_ids == IDS[:9] and rest.kv.seq_len == 60
    close = wire.decode(wire.encode(kv.token_range(9, 60), parse_profile("int4"), fp), fp)
    assert torch.equal(rest.kv.keys[0], close.keys[0])
    with pytest.raises(wire.WireError, match="goes through TransferSegments"):
        wire.Assembler(fp, wire.Limits()).add(frames[0])  # a caller that asked for a whole cache


@pytest.mark.parametrize("head", [None, [], IDS])
def test_a_text_head_needs_some_but_not_all_of_the_tokens(llama_frames, tiny_llama, head):
    kv, _ = llama_frames
    with pytest.raises(ProfileError, match="text:h needs the template's head"):
        list(wire.encode(kv, parse_profile("int4+text"), tiny_llama.fingerprint, head_ids=head))


@pytest.mark.parametrize("profile", ["int4:g32", "int8+protect:s4:r3", "nf4+int2@0-0"])
def test_a_tiers_chunks_decoded_together_are_the_chunks_decoded_one_at_a_time(profile, tiny_llama, monkeypatch):
    """On a GPU the int and nf4 chunks of a tier wait for its last one and decode together
    (KVCodec.decode_chunks; its kernel path is checked bit for bit in test_kernels): the cache is the
    one that decoding each chunk as it arrives gives, with several chunks a tier and several tiers a layer."""
    from common.quant.kv import KVCodec
    from common.quant.transform import LayerCodec

    kv = prefill(tiny_llama.model, IDS)
    monkeypatch.setattr(wire, "chunk_tokens", lambda *args: 7)
    frames = list(wire.encode(kv, parse_profile(profile), tiny_llama.fingerprint))
    one_at_a_time = wire.decode(frames, tiny_llama.fingerprint)
    calls = []
    monkeypatch.setattr(LayerCodec, "decodes_chunks", lambda self, device, dtype: not self.transformed)
    original = KVCodec.decode_chunks
    monkeypatch.setattr(KVCodec, "decode_chunks", lambda self, payloads, tokens, *args: calls.append(tokens)
                        or original(self, payloads, tokens, *args))
    together = wire.decode(frames, tiny_llama.fingerprint)
    assert calls and max(len(tokens) for tokens in calls) > 1
    for layer in range(kv.num_layers):
        assert torch.equal(together.keys[layer], one_at_a_time.keys[layer])
        assert torch.equal(together.values[layer], one_at_a_time.values[layer])


def test_chunks_are_sized_by_their_payload(smollm2):
    """Frames are sized for throughput: a chunk holds as many tokens as fill MAX_CHUNK_BYTES of its payload, so
    int4's chunks hold more tokens than raw's (each layer's 900 tokens in one chunk), and none passes the cap."""
    kv = prefill(smollm2.model, list(range(1000, 1900)))
    chunks = {spec: [f.chunk for f in wire.encode(kv, parse_profile(spec), smollm2.fingerprint)
                     if f.WhichOneof("kind") == "chunk"] for spec in ("raw", "int4")}
    assert len(chunks["int4"]) == smollm2.fingerprint.num_layers < len(chunks["raw"])
    for spec, sent in chunks.items():
        assert max(max(len(c.payload), c.raw_size) for c in sent) <= wire.MAX_CHUNK_BYTES, spec


@pytest.mark.parametrize("fields", [dict(), dict(layer=3, token_start=0, token_end=255, raw_size=1 << 20, crc32c=2**32 - 1),
                                    dict(layer=0, token_start=127, token_end=128, raw_size=0, crc32c=1)])
@pytest.mark.parametrize("payload", [0, 1, 127, 128, 16383, 16384, 1 << 20])
def test_a_chunks_wire_bytes_are_its_serialized_size(fields, payload):
    """wire_bytes counts a chunk from its fields, not by serializing it: the same number."""
    frame = wire.pb.Frame(chunk=wire.pb.Chunk(payload=bytes(payload), **fields))
    assert wire.wire_bytes(frame) == len(frame.SerializeToString()) + wire.GRPC_MESSAGE_PREFIX


@pytest.mark.parametrize("spec", ["raw", "int4", "int2:g32"])
def test_a_serialized_encoder_sends_the_bytes_of_the_pb_one(tiny_llama, spec):
    """Encoder(serialized=True), the sender's: each frame serializes to the bytes of the pb.Frame one, and the
    frames decode (in process: wire.decode parses them) to the same cache."""
    kv = prefill(tiny_llama.model, list(range(100, 400)))
    profile = parse_profile(spec)
    frames = list(wire.encode(kv, profile, tiny_llama.fingerprint, "t"))
    serialized = list(wire.encode(kv, profile, tiny_llama.fingerprint, "t", serialized=True))
    assert any(isinstance(f, bytes) for f in serialized)
    assert [framing.serialize(f) for f in serialized] == [f.SerializeToString() for f in frames]
    back, back_serialized = (wire.decode(f, tiny_llama.fingerprint) for f in (frames, serialized))
    assert all(torch.equal(a, b) for a, b in zip(back.keys + back.values,
                                                 back_serialized.keys + back_serialized.values))


def test_layer_headers_refuse_positions_that_do_not_increase_within_a_run_and_name_the_layer():
    """Checked for every layer at once: a layer's positions must increase per head within each of its runs; an
    importance tier's run may start below where the one before it ended (coded modulo 2^32)."""
    tiered = parse_profile("q2c:1+int4+tier:0.1:int8")  # runs [0, 10) and [10, 100) of 100 kept tokens
    restart = torch.cat([torch.arange(90, 100), torch.arange(90)]).expand(2, -1)
    headers = wire.layer_headers([torch.arange(100).expand(2, -1), restart], tiered)
    assert [h.kept_tokens for h in headers] == [100, 100]
    assert torch.equal(wire.decode_positions(headers[1].positions, 2, 100), restart)
    with pytest.raises(ValueError, match="layer 1: kept positions must be strictly increasing per head"):
        wire.layer_headers([torch.arange(100).expand(2, -1), restart])  # one run
    flat = torch.arange(100).repeat(2, 1)
    flat[1, 50] = flat[1, 49]
    with pytest.raises(ValueError, match="layer 0: kept positions"):
        wire.layer_headers([flat, torch.arange(100).expand(2, -1)], tiered)
