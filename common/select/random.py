"""Random selection, seeded and reproducible: the baseline every method must beat."""

from dataclasses import dataclass

import torch

from common.select.base import ScoreInput, Selector


@dataclass
class Random(Selector):
    seed: int = 0

    def score(self, inputs: ScoreInput, layer: int):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer)
        return torch.rand(inputs.kv.keys[layer].shape[1], inputs.context_len, generator=generator)
