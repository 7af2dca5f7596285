"""Knorm: keep the keys with the lowest L2 norm (low-norm keys draw the most attention)."""

from dataclasses import dataclass

from common.select.base import ScoreInput, Selector


@dataclass
class KNorm(Selector):
    default_granularity = "head"

    def score(self, inputs: ScoreInput, layer: int):
        return -inputs.keys(layer).norm(dim=-1)
