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
    total = min(count, limit) * layers
    weights = weights.clamp_min(1e-9).double()
    counts = torch.zeros(layers, dtype=torch.float64)
    free = torch.ones(layers, dtype=torch.bool)
    # Water-filling: share what is left among the free layers; pin those that fall outside
    # [1, limit] (first the ones under the floor, then the ones over the cap) and share again.
    for _ in range(2 * layers):
        remaining = total - counts[~free].sum()
        share = remaining * weights / weights[free].sum()
        low = free & (share < 1)
        high = free & (share > limit)
        pin = low if low.any() else high
        if not pin.any():
            counts[free] = share[free]
            break
        counts[pin] = torch.where(low[pin], torch.ones_like(share[pin]), torch.full_like(share[pin], limit))
        free &= ~pin
        if not free.any():
            break
    result = counts.floor().long().clamp(1, limit)
    shortfall = int(total - result.sum())
    order = torch.argsort(counts - counts.floor(), descending=True)
    for i in order.tolist():
        if shortfall <= 0:
            break
        if result[i] < limit:
            result[i] += 1
            shortfall -= 1
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
