"""Fuzz the frame decoder and header validator: only clean acceptance or a WireError, never a crash."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import fuzz, wire
from common.kvstate import prefill
from common.proto import kvwire_pb2 as pb


@pytest.fixture(scope="module")
def seeds(tiny_llama):
    kv = prefill(tiny_llama.model, list(range(300, 340)))
    return fuzz.seed_transfers(kv, tiny_llama.fingerprint)


def test_mutated_transfers_never_crash(seeds, tiny_llama):
    report = fuzz.run(tiny_llama.fingerprint, seeds, structured=1500, random_bytes=500, seed=1)
    assert report.crashes == []
    assert report.inputs == 2000
    assert report.accepted > 0 and sum(report.rejected.values()) > 1000
    segmented = fuzz.FuzzReport()
    fuzz.feed(seeds[-1], tiny_llama.fingerprint, segmented)
    assert segmented.accepted == 1  # the segmented seed is a valid transfer
    assert {"DATA_LOSS", "INVALID_ARGUMENT"} <= set(report.rejected)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5))
def test_arbitrary_bytes_as_frames(tiny_llama, blobs):
    frames = fuzz.parse_frames(blobs)
    if frames is None:
        return
    report = fuzz.FuzzReport()
    fuzz.feed(frames, tiny_llama.fingerprint, report)
    assert report.crashes == []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq_len=st.integers(0, 2**32 - 1), kept=st.integers(0, 2**32 - 1), layers=st.integers(0, 8),
       batch=st.integers(0, 4), profile=st.text(max_size=40))
def test_header_validator_checks_before_allocating(tiny_llama, seq_len, kept, layers, batch, profile):
    """Huge declared sizes are refused from the header alone: nothing is allocated for them."""
    header = pb.Header(transfer_id="t", fingerprint=tiny_llama.fingerprint, profile=profile, seq_len=seq_len,
                       batch=batch, layers=[pb.LayerHeader(kept_tokens=kept) for _ in range(layers)])
    assembler = wire.Assembler(tiny_llama.fingerprint, fuzz.FUZZ_LIMITS)
    try:
        assembler.add(pb.Frame(header=header))
    except wire.WireError:
        return
    expected = sum(2 * tiny_llama.fingerprint.kv_heads * l.kept_tokens * tiny_llama.fingerprint.head_dim * 4
                   for l in header.layers)
    assert expected <= fuzz.FUZZ_LIMITS.max_transfer_bytes


def test_zstd_frame_declaring_a_huge_size_is_refused_before_allocating(seeds, tiny_llama):
    """Found by fuzzing: a payload whose zstd header claims gigabytes used to raise MemoryError."""
    import zstandard

    huge = zstandard.ZstdCompressor().compress(b"\0" * 64)
    huge = bytearray(huge)
    frames = [pb.Frame.FromString(f.SerializeToString()) for f in seeds[0]]
    # Rewrite the frame header to declare a content size of 2**40 bytes.
    claim = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 64)
    params = zstandard.get_frame_parameters(bytes(huge))
    assert params.content_size == 64
    with pytest.raises(ValueError, match="declares"):
        wire.bounded_decompress(claim, 64)  # no size declared at all: refused too
    frames[1].chunk.payload = claim
    frames[1].chunk.crc32 = wire.zlib.crc32(claim)
    report = fuzz.FuzzReport()
    fuzz.feed(frames, tiny_llama.fingerprint, report)
    assert report.crashes == [] and report.rejected == {"DATA_LOSS": 1}
