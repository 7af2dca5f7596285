import pytest

from common.planner import plan

TABLE = {
    "version": 1, "model": "m", "samples": 10, "prefill_s_per_token": 0.0,
    "profiles": {
        "fp16": {"fidelity": 1.0, "bytes_per_token": 20_000, "encode_s_per_token": 0.0, "receiver_s_per_token": 0.0,
                 "first_token_s": 0.1},
        "int8": {"fidelity": 0.97, "bytes_per_token": 12_000, "encode_s_per_token": 0.0, "receiver_s_per_token": 0.0,
                 "first_token_s": 0.1},
        "int4": {"fidelity": 0.7, "bytes_per_token": 7_000, "encode_s_per_token": 0.0, "receiver_s_per_token": 0.0,
                 "first_token_s": 0.1},
        "q2c": {"fidelity": 0.5, "bytes_per_token": 3_000, "encode_s_per_token": 0.0, "receiver_s_per_token": 0.0,
                "first_token_s": 0.1},
    },
}


@pytest.mark.parametrize("bandwidth,deadline,expected", [
    (1e9, 1.0, "fp16"),  # 1,000 tokens of fp16 = 160 Mbit: 0.16 s at 1 Gbit/s
    (100e6, 1.2, "int8"),  # fp16 needs 1.7 s, int8 1.06 s
    (100e6, 0.7, "int4"),  # int8 1.06 s too slow; int4 0.66 s fits
    (10e6, 3.0, "q2c"),  # only q2c (2.5 s) fits
])
def test_planner_picks_the_best_profile_that_fits(bandwidth, deadline, expected):
    chosen = plan(TABLE, 1_000, bandwidth, deadline)
    assert chosen.profile == expected, chosen.reason
    assert chosen.expected_seconds <= deadline


def test_quality_floor_and_fallback():
    assert plan(TABLE, 1_000, 100e6, 0.7, quality_floor=0.9).profile == "q2c"  # nothing fits: fastest
    assert "no profile meets" in plan(TABLE, 1_000, 1e6, 0.1).reason
    assert plan(TABLE, 1_000, 1e9, 10, allowed=["int4", "q2c"]).profile == "int4"
    with pytest.raises(ValueError):
        plan(TABLE, 0, 1e6, 1)
