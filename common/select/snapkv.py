"""SnapKV: attention from an observation window of the last queries, pooled, top-k per head."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from common.select.base import GrammarOptions, ScoreInput, SelectionError, Selector


@dataclass
class SnapKV(Selector):
    window: int = 32
    kernel: int = 7
    pooling: str = "max"

    default_granularity = "head"
    grammar_options: ClassVar[GrammarOptions] = {
        "w": ("window", int), "k": ("kernel", int), "max": ("pooling", str), "avg": ("pooling", str),
    }

    @property
    def stats_name(self) -> str:
        return f"window{self.window}"

    def row_sets(self, seq_len: int, context_len: int) -> dict[str, range]:
        """The last `window` rows: the observation window."""
        return {self.stats_name: range(max(0, seq_len - self.window), seq_len)}

    def __post_init__(self):
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise SelectionError("snapkv needs window >= 1 and an odd pooling kernel >= 1")
        if self.pooling not in ("max", "avg"):
            raise SelectionError("snapkv pooling is max or avg")

    def score(self, inputs: ScoreInput, layer: int):
        mass = inputs.mass(self.stats_name, layer).unsqueeze(0)  # (1, heads, context)
        pool = torch.nn.functional.max_pool1d if self.pooling == "max" else torch.nn.functional.avg_pool1d
        pooled = pool(mass, self.kernel, stride=1, padding=self.kernel // 2)[0]
        # The observation window itself is always kept (it usually lies after the context).
        in_window = torch.arange(inputs.context_len, device=pooled.device) >= inputs.kv.seq_len - self.window
        return pooled.masked_fill(in_window, float("inf"))
