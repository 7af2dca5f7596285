"""The segment planner on synthetic tables, and the estimator it plans with."""

import pytest

from common.profile import ProfileError
from sender.adaptive import TEXT, SegmentPlanner, segment_bounds
from sender.bandwidth import BandwidthEstimator

TABLE = {"version": 1, "prefill_s_per_token": 0.002, "profiles": {
    "fp16": {"fidelity": 1.0, "encode_s_per_token": 0.0, "receiver_s_per_token": 0.0, "first_token_s": 0.05},
    "int8:g32": {"fidelity": 0.97, "encode_s_per_token": 0.0, "receiver_s_per_token": 0.0, "first_token_s": 0.05},
    "int4:g32": {"fidelity": 0.77, "encode_s_per_token": 0.0, "receiver_s_per_token": 0.0, "first_token_s": 0.05},
    "q2c:0.5+int4:g32": {"fidelity": 0.9, "encode_s_per_token": 0.0, "receiver_s_per_token": 0.0,
                         "first_token_s": 0.05}}}
SIZES = {"fp16": 10_000_000, "int8:g32": 5_000_000, "int4:g32": 2_500_000}  # bytes of one 512-token segment


def test_the_ladder_is_the_precision_only_profiles():
    assert SegmentPlanner(TABLE).ladder == ["fp16", "int8:g32", "int4:g32"]
    with pytest.raises(ProfileError, match="no selection"):
        SegmentPlanner(TABLE, ["q2c:0.5+int4:g32"])
    row = TABLE["profiles"]["int4:g32"]
    table = {**TABLE, "profiles": {**TABLE["profiles"], "pca:b1+protect:s4": row, "int4:g32+prerope": row,
                                   "int4:g32+rot": row, "int4:g32+text:q": row}}
    assert SegmentPlanner(table).ladder == ["fp16", "int8:g32", "int4:g32", "int4:g32+rot"]  # rot needs no model
    for name in ("pca:b1+protect:s4", "int4:g32+prerope", "int4:g32+text:q"):
        with pytest.raises(ProfileError, match="need the model"):
            SegmentPlanner(table, [name])
    with pytest.raises(ProfileError, match="not in the calibration table"):
        SegmentPlanner(TABLE, ["int2"])


@pytest.mark.parametrize("bandwidth, budget, expected", [
    (1e9, 1.0, "fp16"),  # everything fits: the best fidelity
    (50e6, 1.0, "int8:g32"),  # fp16 needs 1.6 s, int8 0.8 s
    (25e6, 1.0, "int4:g32"),  # int8 needs 1.6 s, int4 0.8 s
    (10e6, 1.0, TEXT),  # int4 needs 2 s: nothing fits; text is in place after 1.03 s
    (50e6, 0.3, "int4:g32"),  # nothing fits, but int4 (0.4 s) comes sooner than text (1.02 s)
    (1e9, -0.5, "int4:g32"),  # the deadline has passed: the soonest
])
def test_choose(bandwidth, budget, expected):
    choice = SegmentPlanner(TABLE).choose(512, SIZES, 2048, bandwidth, budget)
    assert choice.profile == expected
    if expected == TEXT:
        assert choice.expected_s == pytest.approx(2048 * 8 / bandwidth + 0.002 * 512)
    if choice.expected_s > budget:
        assert "nothing fits" in choice.reason and f"{expected} is expected soonest" in choice.reason


def test_a_faster_receiver_prefill_makes_text_the_fallback():
    choice = SegmentPlanner(TABLE, text_s_per_token=1e-4).choose(512, SIZES, 2048, 50e6, 0.3)
    assert choice.profile == TEXT  # in place after 0.05 s; int4 would take 0.4 s


def test_segment_bounds():
    assert segment_bounds(1100, 512) == [(0, 512), (512, 1024), (1024, 1100)]
    assert segment_bounds(100, 512) == [(0, 100)]
    with pytest.raises(ValueError):
        segment_bounds(100, 0)


def test_cautious_estimate_believes_a_drop_at_once_and_forgets_old_samples():
    estimator = BandwidthEstimator(alpha=0.3, safety=1.0, max_age_s=10.0)
    estimator.update(10_000_000, 0.4, now=0.0)  # 200 Mbit/s
    estimator.update(1_000_000, 0.8, now=1.0)  # 10 Mbit/s
    assert estimator.estimate(now=1.0) == pytest.approx(0.3 * 10e6 + 0.7 * 200e6)
    assert estimator.cautious_estimate(now=1.0) == pytest.approx(10e6)
    assert estimator.cautious_estimate(now=12.0) is None  # stale: plan as if nothing were known


def test_the_probe_is_the_smallest_cache():
    choice = SegmentPlanner(TABLE).probe(SIZES)
    assert choice.profile == "int4:g32" and choice.reason.startswith("probe")
