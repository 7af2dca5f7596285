"""H2O: heavy hitters (attention accumulated over all queries) plus a recent window."""

from dataclasses import dataclass
from typing import ClassVar

from common.select.base import GrammarOptions, ScoreInput, SelectionError, Selector


@dataclass
class H2O(Selector):
    recent_fraction: float = 0.5  # of the budget, spent on the most recent tokens

    needs = ("all",)
    default_granularity = "head"
    grammar_options: ClassVar[GrammarOptions] = {"r": ("recent_fraction", float)}

    def __post_init__(self):
        if not 0 <= self.recent_fraction <= 1:
            raise SelectionError("h2o recent fraction must lie in [0, 1]")

    def score(self, inputs: ScoreInput, layer: int):
        mass = inputs.mass("all", layer).clone()
        recent = int(inputs.budget * self.recent_fraction)
        if recent:
            mass[:, max(0, inputs.context_len - recent):] = float("inf")
        return mass
