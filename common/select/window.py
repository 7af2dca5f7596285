"""Sliding window: the most recent context tokens only."""

from dataclasses import dataclass

from common.select.base import ScoreInput, Selector, recency


@dataclass
class Window(Selector):
    def score(self, inputs: ScoreInput, layer: int):
        return recency(inputs, inputs.kv.keys[layer].shape[1])
