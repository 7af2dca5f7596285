"""Random selection, seeded and reproducible: the baseline every method must beat."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from common.select.base import GrammarOptions, ScoreInput, Selector


@dataclass
class Random(Selector):
    seed: int = 0

    grammar_options: ClassVar[GrammarOptions] = {"seed": ("seed", int)}

    def score(self, inputs: ScoreInput, layer: int):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer)
        # Drawn on the CPU so that a seed keeps the same tokens on every device.
        keys = inputs.kv.keys[layer]
        return torch.rand(keys.shape[1], inputs.context_len, generator=generator).to(keys.device)
