"""Mutual-information lower bounds, the Gaussian rate-distortion bound, and bit allocation.

Every bound is in bits and measured on held-out data: a probe q(y|x) trained on one split gives
I(X; Y) >= H(Y) - CE_q on another, where H(Y) is itself the held-out cross-entropy of the
training split's label frequencies (so both sides are estimated the same way and a useless probe
gives about 0, or a little below).
"""

from __future__ import annotations

import math

import torch

LOG2 = math.log(2)


WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # the grid an inner split of the training data chooses from


def whiten(train: torch.Tensor, others: list[torch.Tensor], components: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Project onto the training split's top principal components, scaled to unit variance.

    Few features keep the probes from fitting the training articles' noise (a few hundred
    questions against hundreds of dimensions)."""
    mean = train.mean(0)
    eigenvalues, vectors = torch.linalg.eigh(torch.cov((train - mean).T))
    top = eigenvalues.argsort(descending=True)[:components]
    basis = vectors[:, top] / eigenvalues[top].clamp_min(1e-8).sqrt()
    return (train - mean) @ basis, [(x - mean) @ basis for x in others]


def _minimize(parameters: list[torch.Tensor], loss_fn, iterations: int) -> None:
    optimizer = torch.optim.LBFGS(parameters, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimizer.step(closure)


def _tuned(fit, loss, groups: torch.Tensor, seed: int):
    """Fit on all the training data with the weight decay that did best on a held-out quarter of
    its groups (paragraphs), so that the test split is never used to choose it."""
    unique = groups.unique()
    held = unique[torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))[:max(1, len(unique) // 4)]]
    inner = torch.isin(groups, held)
    best = min(WEIGHT_DECAYS, key=lambda decay: loss(fit(~inner, decay), inner))
    return fit(torch.ones_like(inner), best)


def softmax_probe_bits(train_x: torch.Tensor, train_y: torch.Tensor, train_groups: torch.Tensor, test_x: torch.Tensor,
                       test_y: torch.Tensor, classes: int, seed: int = 0, iterations: int = 50) -> float:
    """Held-out lower bound on I(x; y), bits per sample, from a multinomial logistic probe.

    x: (n, features), whitened beforehand; y: (n,) integer labels in [0, classes); groups: (n,)
    the paragraph of each training row."""
    loss = torch.nn.functional.cross_entropy

    def fit(rows, decay):
        weight = torch.zeros(train_x.shape[1], classes, requires_grad=True)
        bias = torch.zeros(classes, requires_grad=True)
        x, y = train_x[rows], train_y[rows]
        _minimize([weight, bias], lambda: loss(x @ weight + bias, y) + decay * weight.square().sum(), iterations)
        return weight.detach(), bias.detach()

    weight, bias = _tuned(fit, lambda params, rows: float(loss(train_x[rows] @ params[0] + params[1], train_y[rows])),
                          train_groups, seed)
    counts = torch.bincount(train_y, minlength=classes).float() + 0.5  # add-half: no class has probability 0
    prior_ce = -(counts / counts.sum()).log()[test_y].mean()
    probe_ce = loss(test_x @ weight + bias, test_y)
    return float(prior_ce - probe_ce) / LOG2


def _padded(sets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.nn.utils.rnn.pad_sequence(sets, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.bool) for s in sets], batch_first=True)
    return rows, mask


def pointer_probe_bits(train_sets: list[torch.Tensor], train_targets: torch.Tensor, train_groups: torch.Tensor,
                       test_sets: list[torch.Tensor], test_targets: torch.Tensor, seed: int = 0,
                       iterations: int = 50) -> float:
    """Held-out lower bound, bits per question, on I(features; which row is the target).

    Each question has a set of rows (tokens, features), whitened beforehand, and one target row;
    the probe scores rows linearly and takes a softmax over the question's rows. The prior is
    uniform over the rows."""
    def cross_entropy(weight, rows, mask, targets):
        scores = (rows @ weight).masked_fill(~mask, float("-inf"))
        return -scores.log_softmax(1).gather(1, targets[:, None]).mean()

    train_rows, train_mask = _padded(train_sets)

    def fit(questions, decay):
        weight = torch.zeros(train_rows.shape[2], requires_grad=True)
        rows, mask, targets = train_rows[questions], train_mask[questions], train_targets[questions]
        _minimize([weight], lambda: cross_entropy(weight, rows, mask, targets) + decay * weight.square().sum(),
                  iterations)
        return weight.detach()

    weight = _tuned(fit, lambda w, q: float(cross_entropy(w, train_rows[q], train_mask[q], train_targets[q])),
                    train_groups, seed)
    test_rows, test_mask = _padded(test_sets)
    probe_ce = cross_entropy(weight, test_rows, test_mask, test_targets)
    prior_ce = test_mask.sum(1).float().log().mean()
    return float(prior_ce - probe_ce) / LOG2


def infonce_bits(train_x: torch.Tensor, train_y: torch.Tensor, train_groups: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, seed: int = 0, iterations: int = 50) -> float:
    """Held-out InfoNCE lower bound on I(x; y), bits: log N - CE of picking each test x's own y
    among all N test y's, with a bilinear critic x W y^T trained on the training pairs (inputs
    whitened beforehand). It cannot exceed log2 N of the test split."""
    loss = torch.nn.functional.cross_entropy

    def nce(weight, x, y):
        scores = x @ weight @ y.T
        labels = torch.arange(len(x))
        return loss(scores, labels)

    def fit(pairs, decay):
        weight = torch.zeros(train_x.shape[1], train_y.shape[1], requires_grad=True)
        x, y = train_x[pairs], train_y[pairs]
        _minimize([weight], lambda: nce(weight, x, y) + nce(weight.T, y, x) + decay * weight.square().sum(), iterations)
        return weight.detach()

    weight = _tuned(fit, lambda w, pairs: float(nce(w, train_x[pairs], train_y[pairs])),
                    train_groups, seed)
    return float(math.log(len(test_x)) - nce(weight, test_x, test_y)) / LOG2


def gaussian_rd(eigenvalues: torch.Tensor, weights: torch.Tensor, level: float) -> tuple[float, float]:
    """Reverse water-filling at water level `level`: (bits per element, MSE per element).

    eigenvalues: (m,) the covariance eigenvalues of every independent component; weights: (m,)
    how many elements each stands for (tokens). R = sum w max(0, log2(l / level) / 2) / sum w,
    D = sum w min(level, l) / sum w: the Gaussian source's R(D) under MSE."""
    eigenvalues = eigenvalues.double().clamp_min(1e-30)
    total = weights.double().sum()
    rate = (weights * (eigenvalues / level).log2().clamp_min(0) / 2).sum() / total
    distortion = (weights * eigenvalues.clamp_max(level)).sum() / total
    return float(rate), float(distortion)


def gaussian_rate_at(eigenvalues: torch.Tensor, weights: torch.Tensor, distortion: float) -> float:
    """R(D) of the Gaussian source: bits per element at MSE `distortion` (bisection on the level)."""
    lo, hi = math.log(1e-30), math.log(float(eigenvalues.max()) + 1e-30)
    if distortion >= gaussian_rd(eigenvalues, weights, math.exp(hi))[1]:
        return 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if gaussian_rd(eigenvalues, weights, math.exp(mid))[1] > distortion:
            hi = mid
        else:
            lo = mid
    return gaussian_rd(eigenvalues, weights, math.exp((lo + hi) / 2))[0]


def ranks(values: list[float]) -> torch.Tensor:
    """Average ranks (ties share the mean of their ranks), from 0."""
    x = torch.tensor(values, dtype=torch.float64)
    order = x.argsort()
    result = torch.empty_like(x)
    result[order] = torch.arange(len(x), dtype=torch.float64)
    for value in x.unique():
        tied = x == value
        result[tied] = result[tied].mean()
    return result


def spearman(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or len(a) < 3:
        raise ValueError("Spearman's rank correlation needs two lists of the same length, at least 3")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float((ra.square().sum() * rb.square().sum()).sqrt())
    return float((ra * rb).sum()) / denominator if denominator else float("nan")


def allocate_bits(weights: list[float], levels: list[int], costs: list[float], budget: float) -> list[int]:
    """Per-layer bit widths from `levels` that minimize sum_l weights[l] * 4^-bits[l] (equivalently,
    maximize sum_l w_l (1 - 4^-b_l), the model I(Z_l; Y) = I(K_l; Y)(1 - 4^-b_l)) with
    sum_l costs[level] <= budget.

    Greedy from the lowest level, always taking the upgrade with the largest gain per unit of
    cost: the gains per unit cost fall level after level, so this is the Lagrangian solution,
    the one a sweep over beta in  sum I(Z_l; Y) - beta * rate  would find, up to the last step."""
    if sorted(levels) != list(levels) or len(levels) != len(costs):
        raise ValueError("levels must be increasing, with one cost each")
    if budget < len(weights) * costs[0]:
        raise ValueError(f"budget {budget} is below every layer at {levels[0]} bits ({len(weights) * costs[0]})")
    chosen = [0] * len(weights)
    spent = len(weights) * costs[0]
    while True:
        candidates = []
        for layer, at in enumerate(chosen):
            if at + 1 < len(levels) and spent + costs[at + 1] - costs[at] <= budget + 1e-9:
                gain = max(weights[layer], 0.0) * (4.0 ** -levels[at] - 4.0 ** -levels[at + 1])
                candidates.append((gain / (costs[at + 1] - costs[at]), -layer, layer))
        if not candidates:
            return [levels[i] for i in chosen]
        _, _, layer = max(candidates)
        spent += costs[chosen[layer] + 1] - costs[chosen[layer]]
        chosen[layer] += 1
