import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.select import budgets


@given(count=st.integers(1, 500), layers=st.integers(1, 40), limit=st.integers(1, 600))
def test_pyramid_keeps_the_total_and_bounds(count, layers, limit):
    counts = budgets.pyramid(count, layers, limit)
    assert len(counts) == layers
    assert all(1 <= c <= limit for c in counts)
    assert sum(counts) == min(count, limit) * layers
    assert counts == sorted(counts, reverse=True)


@given(count=st.integers(1, 300), sens=st.lists(st.floats(0, 10), min_size=1, max_size=30), limit=st.integers(1, 400))
def test_adaptive_keeps_the_total_and_bounds(count, sens, limit):
    counts = budgets.adaptive(count, sens, limit)
    assert all(1 <= c <= limit for c in counts)
    assert sum(counts) == min(count, limit) * len(sens)


def test_adaptive_follows_sensitivity():
    counts = budgets.adaptive(100, [0.0, 1.0, 3.0], 1000)
    assert counts[0] < counts[1] < counts[2]
    assert counts[0] >= 50 - 1  # the uniform half: no layer starves
    assert budgets.uniform(10, 3, 5) == [5, 5, 5]


def test_shipped_sensitivities_exist_for_the_embedded_model():
    sens = budgets.shipped_sensitivities("smollm2-135m")
    assert sens is not None and len(sens) == 30
    assert budgets.shipped_sensitivities("no-such-model") is None


@pytest.mark.parametrize("count,limit", [(7, 7), (3, 100)])
def test_pyramid_extremes(count, limit):
    assert sum(budgets.pyramid(count, 5, limit)) == count * 5
