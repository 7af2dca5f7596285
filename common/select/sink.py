"""StreamingLLM: the first few tokens (attention sinks) plus the most recent ones."""

from dataclasses import dataclass
from typing import ClassVar

from common.select.base import (
    GrammarOptions,
    ScoreInput,
    SelectionError,
    Selector,
    recency,
)


@dataclass
class Sink(Selector):
    sinks: int = 4

    grammar_options: ClassVar[GrammarOptions] = {"s": ("sinks", int)}

    def __post_init__(self):
        if self.sinks < 0:
            raise SelectionError("sink count must be >= 0")

    def score(self, inputs: ScoreInput, layer: int):
        scores = recency(inputs, inputs.kv.keys[layer].shape[1]).clone()
        scores[:, : self.sinks] = float("inf")
        return scores
