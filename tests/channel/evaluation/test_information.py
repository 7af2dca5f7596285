"""The information-plane estimators against data whose mutual information is known."""

from __future__ import annotations

import math

import pytest
import torch

from channel.evaluation.information.allocation import (
    LEVELS,
    bits_per_element,
    plan_spec,
    plans,
)
from channel.evaluation.information.estimators import (
    allocate_bits,
    gaussian_rate_at,
    gaussian_rd,
    infonce_bits,
    pointer_probe_bits,
    softmax_probe_bits,
    spearman,
)
from channel.evaluation.information.features import extract, split_by_article
from channel.evaluation.information.ratedistortion import squared_errors
from channel.evaluation.squad import Sample
from common.kvstate import KVState
from common.models import load_model
from common.profile import parse_profile
from common.plan import precision_for


def _binary(n: int, signal: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=generator)
    x = torch.randn(n, 8, generator=generator)
    x[:, 0] += signal * (2 * y - 1)
    return x, y, torch.arange(n) // 20  # groups of 20 rows, as paragraphs


def test_probe_bound_is_positive_when_the_features_hold_the_label_and_about_zero_when_shuffled():
    x, y, groups = _binary(2000, 2.0, 0)
    test_x, test_y, _ = _binary(2000, 2.0, 1)
    informative = softmax_probe_bits(x, y, groups, test_x, test_y, 2)
    # Two unit Gaussians at -2 and +2: the posterior log-odds are 4x, so I = 1 - E log2(1 + exp(-4(2 + z))).
    z = torch.randn(1_000_000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    true_bits = 1 - float(torch.nn.functional.softplus(-4 * (2 + z)).mean()) / math.log(2)
    assert true_bits - 0.05 < informative < true_bits + 0.03
    shuffled = softmax_probe_bits(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(2))], groups,
                                  test_x, test_y, 2)
    assert abs(shuffled) < 0.03


def test_pointer_probe_finds_the_marked_row_and_gets_nothing_from_random_targets():
    generator = torch.Generator().manual_seed(0)

    def questions(n):
        sets = [torch.randn(16, 4, generator=generator) for _ in range(n)]
        targets = torch.randint(0, 16, (n,), generator=generator)
        for rows, target in zip(sets, targets):
            rows[target, 0] += 3.0
        return sets, targets

    train_sets, train_targets = questions(300)
    test_sets, test_targets = questions(300)
    groups = torch.arange(300) // 3
    assert pointer_probe_bits(train_sets, train_targets, groups, test_sets, test_targets) > 1.5  # of log2 16 = 4
    random_targets = torch.randint(0, 16, (300,), generator=generator)
    assert abs(pointer_probe_bits(train_sets, random_targets, groups, test_sets, test_targets)) < 0.1


def test_infonce_sees_correlated_pairs_and_not_independent_ones():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=generator)
    y = x[:, :3] + 0.3 * torch.randn(400, 3, generator=generator)
    groups = torch.arange(300) // 3
    bound = infonce_bits(x[:300], y[:300], groups, x[300:], y[300:])
    assert 1.0 < bound <= math.log2(100)  # a bilinear critic, 100 test pairs: well under the true 5.4 bits
    independent = torch.randn(400, 3, generator=generator)
    assert abs(infonce_bits(x[:300], independent[:300], groups, x[300:], independent[300:])) < 0.15


def test_reverse_water_filling_matches_the_closed_form_of_a_diagonal_gaussian():
    eigenvalues = torch.tensor([4.0, 1.0, 0.25, 0.01])
    weights = torch.ones(4)
    # Below the smallest variance every component gets the same distortion D: R = mean of log2(l/D)/2.
    d = 0.005
    expected = sum(0.5 * math.log2(float(l) / d) for l in eigenvalues) / 4
    assert gaussian_rate_at(eigenvalues, weights, d) == pytest.approx(expected, rel=1e-6)
    # With water level 0.5 only the first two components are coded: D = (0.5 + 0.5 + 0.25 + 0.01) / 4.
    rate, distortion = gaussian_rd(eigenvalues, weights, 0.5)
    assert distortion == pytest.approx((0.5 + 0.5 + 0.25 + 0.01) / 4)
    assert rate == pytest.approx((0.5 * math.log2(8) + 0.5 * math.log2(2)) / 4)
    assert gaussian_rate_at(eigenvalues, weights, float(eigenvalues.mean())) == 0.0


def test_allocation_spends_no_more_than_the_budget_and_favours_heavy_layers():
    weights = [0.1, 5.0, 0.0, 2.0, 0.3, 9.0]
    costs = [bits_per_element(b) for b in LEVELS]
    budget = len(weights) * bits_per_element(3)
    bits = allocate_bits(weights, list(LEVELS), costs, budget)
    assert sum(bits_per_element(b) for b in bits) <= budget
    assert sum(bits_per_element(b) for b in bits) > budget - (costs[-1] - costs[-2])  # nothing large left unspent
    assert bits[5] >= bits[1] >= bits[3] > bits[2] == LEVELS[0]
    with pytest.raises(ValueError, match="below every layer"):
        allocate_bits(weights, list(LEVELS), costs, 1.0)


def test_plans_are_profiles_that_give_each_layer_its_bits():
    result = plans([1.0, 0.0, 3.0, 2.0, 0.5], [0.2, 0.1, 0.9, 0.3, 0.0], 3, seed=0)
    assert sorted(result["random"]) == sorted(result["ib-ranked"]) == sorted(result["measured"])
    assert result["ib-ranked"][2] == max(result["measured"]) and result["ib-ranked"][1] == min(result["measured"])
    for bits in result.values():
        profile = parse_profile(plan_spec(bits))
        assert [precision_for(profile, layer).quantizer.spec() for layer in range(5)] == [f"int{b}:g32" for b in bits]
    with pytest.raises(ValueError, match="not the same model"):
        plans([1.0, 2.0], [1.0], 3, seed=0)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))  # ties share their mean rank


def test_a_dropped_token_costs_its_distance_to_the_kept_mean():
    keys = torch.arange(12.0).reshape(1, 1, 6, 2)
    positions = torch.arange(6)[None]
    original = KVState([keys], [keys.clone()], [positions], 6)
    kept = torch.tensor([[0, 2, 4]])
    received = KVState([keys[:, :, [0, 2, 4]]], [keys[:, :, [0, 2, 4]]], [kept], 6)
    errors = squared_errors(original, received)
    # kept rows [0,1], [4,5], [8,9]: mean [4,5]; dropped rows [2,3], [6,7], [10,11] miss it by 2, 2, 6 per element
    assert errors["keys"] == errors["values"] == pytest.approx(2 * (4 + 4 + 36))
    assert errors["elements"] == 24


def test_features_mark_the_answer_tokens_and_splits_keep_paragraphs_apart():
    loaded = load_model("tiny-llama")
    contexts = [f"Paragraph {i}: the river Alpha{i} flows past the town of Beta{i} in the north." for i in range(8)]
    samples = [Sample(f"{i}-{j}", context, f"What town, {j}?", (f"Beta{i}",))
               for i, context in enumerate(contexts) for j in range(2)]
    titles = {context: f"article {i // 2}" for i, context in enumerate(contexts)}
    features = extract(loaded, samples, titles)
    assert len(features.questions) == 16 and len(features.paragraphs) == 8
    for question in features.questions:
        paragraph = features.paragraphs[question.paragraph]
        answer = loaded.tokenizer.decode(paragraph.token_ids[question.answer_start:question.answer_end])
        assert answer.strip() == paragraph.article.replace("article", "").strip() or "Beta" in answer
        assert paragraph.features["keys"][0].shape == (len(paragraph.token_ids), loaded.config.num_key_value_heads
                                                       * loaded.config.head_dim)
    held, unit = split_by_article(features, seed=0)
    assert unit == "article"
    held_articles = {features.paragraphs[p].article for p in held}
    assert all((features.paragraphs[p].article in held_articles) == (p in held) for p in range(8))
