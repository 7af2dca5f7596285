import pytest

from common.channel import Trace
from common.evaluation.deadlines import replay, shifted


def test_shifted_trace():
    trace = Trace([0.0, 1.0, 2.0], [10.0, 20.0, 30.0])
    assert shifted(trace, 1.5) == Trace([0.0, 0.5], [20.0, 30.0])
    assert shifted(trace, 0.0) == trace


def point(nbytes, fidelity):
    return {"bytes": nbytes, "fidelity_f1": fidelity, "prefill_s": 0.1, "select_s": 0.0, "encode_s": 0.0,
            "assemble_s": 0.0, "inject_s": 0.0, "first_token_s": 0.0, "seq_len": 100}


def test_auto_switches_to_the_smaller_profile_when_the_link_drops():
    points = {("s", "big"): point(2_000_000, 1.0), ("s", "small"): point(200_000, 0.6)}
    table = {"version": 1, "prefill_s_per_token": 0.001, "profiles": {
        "big": {"fidelity": 1.0, "bytes_per_token": 20_000, "encode_s_per_token": 0, "receiver_s_per_token": 0,
                "first_token_s": 0},
        "small": {"fidelity": 0.6, "bytes_per_token": 2_000, "encode_s_per_token": 0, "receiver_s_per_token": 0,
                  "first_token_s": 0}}}
    fast_then_slow = Trace([0.0, 100.0], [160e6, 4e6])  # big takes 0.2 s, then 4 s
    rows = replay(points, ["s"], ["big", "small"], table, fast_then_slow, 0.0, [1.0], transfers=100, gap_s=2.0)
    by = {r["profile"]: r for r in rows}
    assert by["big"]["hit_rate"] == pytest.approx(0.5, abs=0.02)  # only while the link is fast
    assert by["small"]["hit_rate"] == 1.0
    assert by["auto"]["hit_rate"] >= 0.9  # a few late transfers while the EWMA catches up with the drop
    assert by["auto"]["mean_quality"] > by["small"]["mean_quality"]
