"""The selector interface: score context tokens, keep the highest.

A selector is a small dataclass with `score()`; it declares the attention statistics it
reads (`row_sets`) and its options in the profile grammar (`grammar_options`). The
framework in `common.select.apply_selection` turns scores into kept positions at the
chosen granularity (global, layer or head) and per-layer budget, always keeping the
tokens after the context (the question and chat template), and writes a new KVState.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from common.kvstate import KVState
from common.select.stats import AttentionStats

GRANULARITIES = ("global", "layer", "head")
# A selector's options in the profile grammar: name -> (dataclass field, type).
GrammarOptions = dict[str, tuple[str, type]]


class SelectionError(ValueError):
    pass


@dataclass
class ScoreInput:
    kv: KVState
    stats: AttentionStats | None
    context_len: int  # tokens [0, context_len) are candidates; the rest are always kept
    budget: int  # tokens this layer may keep out of the context

    def keys(self, layer: int) -> torch.Tensor:
        """(kv_heads, context_len, head_dim) keys of the candidates."""
        return self.kv.keys[layer][0, :, : self.context_len].float()

    def values(self, layer: int) -> torch.Tensor:
        """(kv_heads, context_len, head_dim) values of the candidates."""
        return self.kv.values[layer][0, :, : self.context_len].float()

    def mean_query(self, name: str, layer: int) -> torch.Tensor:
        """(kv_heads, group, head_dim) mean post-RoPE query of a `mean_query...` row set (see AttentionStats)."""
        if self.stats is None:
            raise SelectionError("this method needs query statistics captured during prefill")
        return self.stats.layer(name, layer)

    def mass(self, name: str, layer: int) -> torch.Tensor:
        if self.stats is None:
            raise SelectionError("this method needs attention statistics captured during prefill")
        return self.stats.layer(name, layer)[:, : self.context_len]


@dataclass
class Selector:
    # Attention row sets the method reads: "question" (the rows after the context) or "all".
    needs: ClassVar[tuple[str, ...]] = ()
    default_granularity: ClassVar[str] = "global"
    # Which layers' scores a global selection sums: all of them, or the last only.
    global_layers: ClassVar[str] = "all"
    # Whether the score reads the question's rows, so the question must be inside the cache.
    needs_question: ClassVar[bool] = False
    # A str option is a flag whose name is the value (snapkv's max); the others carry a number
    # (snapkv's w16 sets window = 16).
    grammar_options: ClassVar[GrammarOptions] = {}

    def row_sets(self, seq_len: int, context_len: int) -> dict[str, range]:
        """The attention rows this selector reads, by name (see AttentionStats), for a prefill of seq_len tokens."""
        rows = {"question": range(context_len, seq_len), "all": range(seq_len)}
        return {name: rows[name] for name in self.needs}

    def score(self, inputs: ScoreInput, layer: int) -> torch.Tensor:
        """Scores of shape (kv_heads, context_len); higher is kept first."""
        raise NotImplementedError


def recency(inputs: ScoreInput, heads: int) -> torch.Tensor:
    """Scores that rank later context tokens higher: (heads, context_len)."""
    return torch.arange(inputs.context_len, dtype=torch.float32, device=inputs.kv.keys[0].device).expand(heads, -1)
