"""CapKV: capacity-aware selection by statistical leverage scores of the keys.

Under a linear-Gaussian surrogate of attention, the information a retained subset
carries is a log-determinant of its keys' Gram matrix; leverage scores
l_i = k_i^T (K^T K + lambda I)^-1 k_i are each token's share of it, so keeping the
highest-leverage keys approximately maximizes the log-determinant.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from common.select.base import GrammarOptions, ScoreInput, SelectionError, Selector


def leverage_scores(keys: torch.Tensor, ridge: float) -> torch.Tensor:
    """keys: (heads, T, d) -> (heads, T) ridge leverage scores."""
    gram = keys.transpose(1, 2) @ keys  # (heads, d, d)
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
    eye = torch.eye(keys.shape[-1], device=keys.device).expand_as(gram)
    solved = torch.linalg.solve(gram + ridge * scale[:, None, None] * eye, keys.transpose(1, 2))  # (heads, d, T)
    return (keys * solved.transpose(1, 2)).sum(dim=-1)


@dataclass
class CapKV(Selector):
    ridge: float = 1e-3  # relative to the mean diagonal of the Gram matrix

    default_granularity = "head"
    grammar_options: ClassVar[GrammarOptions] = {"ridge": ("ridge", float)}

    def __post_init__(self):
        if self.ridge <= 0:
            raise SelectionError("capkv ridge must be positive")

    def score(self, inputs: ScoreInput, layer: int):
        return leverage_scores(inputs.keys(layer), self.ridge)
