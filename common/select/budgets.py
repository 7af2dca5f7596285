"""Per-layer budgets: how many context tokens each layer keeps.

- uniform: every layer keeps the same count;
- pyramid: PyramidKV-style, linearly more in lower layers and fewer in upper ones;
- adaptive: half of the tokens spread uniformly, half in proportion to each layer's
  measured sensitivity (the KL divergence of the next-token distribution when only that
  layer is compressed; `kvwire study layers`): an information-bottleneck allocation that
  spends tokens where they carry the most task signal, without starving any layer.
All keep the same total, `count * layers`, up to rounding, and each layer in [1, limit].
"""

from __future__ import annotations

import json
from importlib import resources

import torch

BUDGETS = ("uniform", "pyramid", "adaptive")
PYRAMID_SLOPE = 0.5  # the bottom layer keeps (1 + slope) x the mean, the top (1 - slope) x


def _fit(weights: torch.Tensor, count: int, limit: int) -> list[int]:
    """Integer counts proportional to `weights`, each in [1, limit], summing to count * len(weights)."""
    layers = len(weights)
    total = min(count * layers, limit * layers)
    weights = weights.clamp_min(1e-9).double()
    counts = torch.ones(layers, dtype=torch.float64)
    free = torch.ones(layers, dtype=torch.bool)
    # Water-filling: share what is left among layers that are not yet at their limit.
    for _ in range(layers):
        remaining = total - counts[~free].sum()
        share = remaining * weights * free / (weights * free).sum()
        counts = torch.where(free, share.clamp(1, limit), counts)
        capped = free & (counts >= limit)
        if not capped.any():
            break
        free &= ~capped
    result = counts.floor().long()
    shortfall = int(total - result.sum())
    order = torch.argsort(counts - result, descending=True)
    for i in order[: max(0, shortfall)]:
        if result[i] < limit:
            result[i] += 1
    return result.tolist()


def uniform(count: int, layers: int, limit: int) -> list[int]:
    return [min(max(count, 1), limit)] * layers


def pyramid(count: int, layers: int, limit: int) -> list[int]:
    if layers == 1:
        return uniform(count, layers, limit)
    slope = torch.linspace(1 + PYRAMID_SLOPE, 1 - PYRAMID_SLOPE, layers)
    return _fit(slope, count, limit)


def adaptive(count: int, sensitivities: list[float], limit: int) -> list[int]:
    weights = torch.tensor(sensitivities, dtype=torch.float64).clamp_min(0)
    share = weights / weights.mean() if weights.sum() > 0 else torch.ones_like(weights)
    return _fit(0.5 + 0.5 * share, count, limit)


def shipped_sensitivities(model: str) -> list[float] | None:
    """Per-layer sensitivities measured by `kvwire study layers` and shipped for the embedded model."""
    path = resources.files("common") / "data" / f"layer-sensitivity-{model}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["sensitivity"]
