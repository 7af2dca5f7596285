import pytest

from channel.evaluation.deadlines import replay, replay_span, shifted
from common.link import Trace


def test_shifted_trace():
    trace = Trace([0.0, 1.0, 2.0], [10.0, 20.0, 30.0])
    assert shifted(trace, 1.5) == Trace([0.0, 0.5], [20.0, 30.0])
    assert shifted(trace, 0.0) == trace


def point(nbytes, fidelity):
    return {"bytes": nbytes, "fidelity_f1": fidelity, "prefill_s": 0.1, "select_s": 0.0, "encode_s": 0.0,
            "assemble_s": 0.0, "inject_s": 0.0, "first_token_s": 0.0, "seq_len": 100, "text_bytes": 500,
            "text_prefill_s": 0.3}


POINTS = {("s", "fp16"): point(2_000_000, 1.0), ("s", "int4:g32"): point(200_000, 0.6)}
TABLE = {"version": 1, "prefill_s_per_token": 0.003, "profiles": {
    "fp16": {"fidelity": 1.0, "bytes_per_token": 20_000, "encode_s_per_token": 0, "receiver_s_per_token": 0,
            "first_token_s": 0},
    "int4:g32": {"fidelity": 0.6, "bytes_per_token": 2_000, "encode_s_per_token": 0, "receiver_s_per_token": 0,
              "first_token_s": 0}}}


def test_auto_switches_to_the_smaller_profile_when_the_link_drops():
    points, table = POINTS, TABLE
    fast_then_slow = Trace([0.0, 100.0], [160e6, 4e6])  # fp16 takes 0.2 s, then 4 s
    rows = replay(points, ["s"], ["fp16", "int4:g32"], table, fast_then_slow, 0.0, [1.0], transfers=100, gap_s=2.0)
    by = {r["profile"]: r for r in rows}
    assert by["fp16"]["hit_rate"] == pytest.approx(0.5, abs=0.02)  # only while the link is fast
    assert by["int4:g32"]["hit_rate"] == 1.0
    assert by["auto"]["hit_rate"] >= 0.9  # a few late transfers while the EWMA catches up with the drop
    assert by["auto"]["mean_quality"] > by["int4:g32"]["mean_quality"]
    assert by["auto-segments"]["hit_rate"] >= 0.9 and by["auto-segments"]["mean_quality"] > 0.6


def test_segments_fall_back_to_text_when_no_cache_fits():
    slow = Trace.constant(1e6)  # int4:g32 takes 1.6 s; text (500 bytes, then 0.3 s of receiver prefill) fits 1 s
    rows = replay(POINTS, ["s"], ["fp16", "int4:g32"], TABLE, slow, 0.0, [1.0], transfers=50, enter_at_random=False)
    by = {r["profile"]: r for r in rows}
    assert by["int4:g32"]["hit_rate"] == 0 and by["auto"]["hit_rate"] == 0
    # Misses only where the estimate is unknown or stale (first transfer, a probe every 30 s): 4 of 50.
    assert by["auto-segments"]["hit_rate"] == pytest.approx(0.92)
    assert by["auto-segments"]["mean_quality"] == by["auto-segments"]["hit_rate"]  # text is the full-prompt answer


def test_the_replay_never_reads_past_the_end_of_its_trace():
    short = Trace.markov(duration_s=600.0)  # 400 transfers about 2 s apart start until about 800 s
    with pytest.raises(ValueError, match="ends at 600 s"):
        replay(POINTS, ["s"], ["fp16"], TABLE, short, 0.0, [1.0])
    long_enough = Trace.markov(duration_s=replay_span([1.0]))
    assert long_enough.times[:1200] == short.times and long_enough.rates[:1200] == short.rates  # same walk, longer
    assert {r["transfers"] for r in replay(POINTS, ["s"], ["fp16"], TABLE, long_enough, 0.0, [1.0])} == {400}
