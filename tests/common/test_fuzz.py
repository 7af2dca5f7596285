"""Fuzz the frame decoder and header validator: only clean acceptance or a WireError, never a crash."""

import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import fuzz, wire
from common.kvstate import prefill
from common.profile import ProfileError, parse_profile
from common.proto import kvwire_pb2 as pb
from common.quant.base import MAX_GROUP


@pytest.fixture(scope="module")
def cache(tiny_llama):
    return prefill(tiny_llama.model, list(range(300, 340)))


@pytest.fixture(scope="module")
def seeds(tiny_llama, cache):
    return fuzz.seed_transfers(cache, tiny_llama.fingerprint)


def test_mutated_and_grammar_transfers_never_crash(seeds, cache, tiny_llama):
    report = fuzz.run(tiny_llama.fingerprint, seeds, structured=1000, random_bytes=300, seed=1, grammar=700, kv=cache)
    assert report.crashes == [] and report.unknown == report.internal == report.failures == 0
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
    frames[1].chunk.crc32c = wire.checksum(claim)
    report = fuzz.FuzzReport()
    fuzz.feed(frames, tiny_llama.fingerprint, report)
    assert report.crashes == [] and report.rejected == {"DATA_LOSS": 1}


def test_unknown_and_internal_outcomes_are_failures():
    report = fuzz.FuzzReport()
    for outcome in ("OK", "INVALID_ARGUMENT", "UNKNOWN", "INTERNAL", "INTERNAL"):
        report.record(outcome)
    assert (report.accepted, report.unknown, report.internal, report.failures) == (1, 1, 2, 3)
    assert "UNKNOWN 1, INTERNAL 2" in report.summary()


def test_a_crash_is_recorded_with_its_status_and_place(seeds, tiny_llama, monkeypatch):
    """An exception the Assembler lets through is a crash; its outcome is the status the handlers would give."""
    def broken(*args):
        raise KeyError("boom")

    monkeypatch.setattr(wire.Assembler, "_add_trailer", broken)
    report = fuzz.FuzzReport()
    fuzz.feed(seeds[0], tiny_llama.fingerprint, report)
    assert report.rejected == {"INTERNAL": 1} and report.failures == 2
    assert report.crashes[0].startswith("KeyError: 'boom' (at ") and "test_fuzz.py" in report.crashes[0]


def groups_of(profile: str) -> list[int]:
    return [int(g) for g in re.findall(r":g(\d{1,40})(?!\d)", profile)]  # garbage may carry 5000 digits


def test_profiles_are_drawn_from_the_whole_grammar():
    """Extremes included: groups past the cap, bits 0 and 9, huge ranks, overrides, selections, garbage."""
    rng = random.Random(0)
    profiles = [fuzz.random_profile(rng) for _ in range(3000)]
    groups = [g for p in profiles for g in groups_of(p)]
    assert min(groups) == 0 and MAX_GROUP in groups and max(groups) >= 2**27
    assert any("int0" in p for p in profiles) and any("int9" in p for p in profiles)
    assert any(int(r) > 2**32 for p in profiles for r in re.findall(r"svd:r(\d{1,40})(?!\d)", p))
    assert sum("@" in p for p in profiles) > 300 and sum(":0." in p or "t:" in p for p in profiles) > 100
    parsed = []
    for profile in profiles:
        try:
            parsed.append(parse_profile(profile))
        except ProfileError:
            pass
    assert 300 < len(parsed) < 2700  # both sides of the grammar are well represented
    assert any(p.selection for p in parsed) and any(p.overrides for p in parsed) and any(p.rank for p in parsed)
    assert any(p.pca for p in parsed) and any(p.importance for p in parsed) and any(p.protect for p in parsed)
    assert any(p.rotation == 2**32 - 1 for p in parsed) and any(p.prerope for p in parsed)


def test_grammar_transfers_reach_the_decoders_with_large_groups(cache, tiny_llama):
    """Accepted grammar transfers carry random payloads through decoders with groups up to the cap;
    past the cap they are refused with INVALID_ARGUMENT, from the header."""
    rng = random.Random(2)
    accepted_groups, refused_groups = [], []
    for _ in range(4000):  # until both kinds are seen (a few hundred draws, usually)
        if (accepted_groups and max(accepted_groups) == MAX_GROUP and sum(g > 256 for g in accepted_groups) >= 3
                and len(refused_groups) > 20):
            break
        frames = fuzz.grammar_transfer(cache, tiny_llama.fingerprint, rng)
        outcome, crash = fuzz.assemble(frames, tiny_llama.fingerprint)
        assert crash is None
        profiles = [f.header.profile or "" for f in frames[:1]] + [f.segment.profile for f in frames
                                                                   if f.WhichOneof("kind") == "segment"]
        groups = [g for p in profiles for g in groups_of(p)]
        if outcome == "OK":
            accepted_groups += groups
        elif outcome == "INVALID_ARGUMENT" and groups and max(groups) > MAX_GROUP:
            refused_groups += groups
    assert max(accepted_groups) == MAX_GROUP and sum(g > 256 for g in accepted_groups) >= 3
    assert len(refused_groups) > 20
