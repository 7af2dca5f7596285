"""SnapKV: attention from an observation window of the last queries, pooled, top-k per head."""

from dataclasses import dataclass

import torch

from common.select.base import ScoreInput, SelectionError, Selector


@dataclass
class SnapKV(Selector):
    window: int = 32
    kernel: int = 7
    pooling: str = "max"

    default_granularity = "head"

    @property
    def stats_name(self) -> str:
        return f"window{self.window}"

    @property
    def needs(self) -> tuple[str, ...]:
        return (self.stats_name,)

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
        in_window = torch.arange(inputs.context_len) >= inputs.kv.seq_len - self.window
        return pooled.masked_fill(in_window, float("inf"))
