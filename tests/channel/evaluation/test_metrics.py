import math

import pytest
import torch

from channel.evaluation.harness import kl_divergence
from channel.evaluation.metrics import (
    best_em,
    best_f1,
    exact_match,
    f1,
    mean_ci95,
    normalize,
)


def test_normalization_follows_squad():
    assert normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize("An apple, a pear and THE plum.") == "apple pear and plum"


def test_f1_by_hand():
    # prediction tokens: [normans, were, in, normandy]; reference: [in, normandy]
    assert f1("The Normans were in Normandy", "in Normandy") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert f1("France", "france.") == 1.0
    assert f1("Paris", "London") == 0.0
    assert f1("", "") == 1.0 and f1("", "x") == 0.0
    # repeated tokens count once per match: pred [a1 a1 b], ref [a1 b b] -> common 2
    assert f1("x x y", "x y y") == pytest.approx(2 / 3)


def test_best_over_gold_answers():
    assert best_f1("10th century", ["10th and 11th centuries", "10th century"]) == 1.0
    assert best_em("the 10th century", ["10th century"]) == 1.0
    assert exact_match("10th century", "10th centuries") == 0.0
    assert best_f1("anything", []) == 0.0


def test_mean_ci95_by_hand():
    mean, half = mean_ci95([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert half == pytest.approx(1.96 * math.sqrt(1.6666666 / 4), rel=1e-6)
    assert math.isnan(mean_ci95([5.0])[1]) and math.isnan(mean_ci95([])[0])


def test_kl_divergence_by_hand():
    p = torch.log(torch.tensor([0.5, 0.5]))
    q = torch.log(torch.tensor([0.9, 0.1]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p, q) == pytest.approx(expected, rel=1e-5)
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-7)
