"""Token selection: which context tokens each layer (or KV head) keeps.

The registry maps names in the profile grammar (`METHOD:KEEP`) to selector classes; a new
method is its own module (a `Selector` subclass) plus a line in METHODS. `apply_selection`
turns a selector's scores into a smaller KVState.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from common.kvstate import KVState
from common.select import budgets
from common.select.base import GRANULARITIES, ScoreInput, SelectionError, Selector
from common.select.capkv import CapKV, CapKVLeverage, CapKVQuery
from common.select.h2o import H2O
from common.select.knorm import KNorm
from common.select.q2c import Q2C, Q2CLast
from common.select.random import Random
from common.select.sink import Sink
from common.select.snapkv import SnapKV
from common.select.stats import AttentionStats
from common.select.window import Window

METHODS: dict[str, type[Selector]] = {
    "q2c": Q2C, "q2c-last": Q2CLast, "snapkv": SnapKV, "h2o": H2O, "sink": Sink,
    "window": Window, "random": Random, "knorm": KNorm, "capkv": CapKV,
    "capkv-q": CapKVQuery, "capkv-leverage": CapKVLeverage,
}


@dataclass(frozen=True)
class Selection:
    method: str
    keep: float | int  # a fraction of the context in (0, 1], or a token count
    granularity: str = ""  # "" means the method's default
    budget: str = "uniform"
    options: tuple[tuple[str, str], ...] = field(default=())  # grammar options, e.g. (("w", "16"),)

    def selector(self) -> Selector:
        cls = METHODS[self.method]
        kwargs = {}
        for name, value in self.options:
            attribute, kind = cls.grammar_options[name]
            kwargs[attribute] = name if kind is str else kind(value)
        return cls(**kwargs)

    @property
    def resolved_granularity(self) -> str:
        return self.granularity or METHODS[self.method].default_granularity

    def needs(self, seq_len: int, context_len: int) -> dict[str, range]:
        """The attention row sets this selection reads, for a prefill of seq_len tokens."""
        return self.selector().row_sets(seq_len, context_len)

    def kept_count(self, context_len: int) -> int:
        if isinstance(self.keep, int):
            return max(1, min(self.keep, context_len))
        return max(1, min(context_len, round(self.keep * context_len)))

    def __str__(self) -> str:
        keep = f"{self.keep}t" if isinstance(self.keep, int) else f"{self.keep:g}"
        parts = [self.method, keep]
        if self.granularity and self.granularity != METHODS[self.method].default_granularity:
            parts.append(self.granularity)
        if self.budget != "uniform":
            parts.append(self.budget)
        known = METHODS[self.method].grammar_options
        parts += [name if known[name][1] is str else f"{name}{value}" for name, value in self.options]
        return ":".join(parts)


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor: (1, heads, T, d); index: (heads, k) -> (1, heads, k, d)."""
    return tensor.gather(2, index[None, :, :, None].expand(1, -1, -1, tensor.shape[-1]))


# Attention sinks: the first tokens of a prompt, outliers that every layer attends to. Importance
# tiers rank the kept ones first after the question (KVTC never compresses them).
SINK_TOKENS = 4


def _importance_order(ranked: torch.Tensor, tail: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Kept tokens ordered for importance tiers: the tail (question, template), the kept sink tokens,
    then the other context tokens by falling score, cut into tiers of `sizes` and a rest; each part
    by position. ranked: (heads, k) context indices by falling score -> (heads, k + len(tail))."""
    sinks_first = (ranked >= SINK_TOKENS).to(torch.int8).sort(dim=1, stable=True).indices  # score order kept otherwise
    ranked = ranked.gather(1, sinks_first)
    ordered = torch.cat([tail.expand(ranked.shape[0], -1), ranked], dim=1)
    parts, start = [], 0
    for size in [*sizes, ordered.shape[1] - sum(sizes)]:
        parts.append(ordered[:, start:start + size].sort(dim=-1).values)
        start += size
    return torch.cat(parts, dim=1)


def apply_selection(
    kv: KVState, selection: Selection, stats: AttentionStats | None, context_len: int,
    sliding_layers: frozenset[int] = frozenset(), sensitivities: list[float] | None = None,
    tier_sizes: Callable[[int], list[int]] | None = None, keep_tail: bool = True,
) -> KVState:
    """Keep `selection.keep` of the context tokens [0, context_len) in every full-attention layer.

    Tokens after the context (question, chat template) are always kept, unless `keep_tail` is
    False (they travel as text): then the full-attention layers end with the context; sliding-window
    layers keep their own window untouched. Kept tokens are in position order, unless
    `tier_sizes` (kept count -> sizes of the importance tiers) asks for tiers: then each layer's
    tokens come most important first, tier by tier, each tier in position order.
    """
    if not 0 < context_len <= kv.seq_len:
        raise SelectionError(f"context length {context_len} outside 1..{kv.seq_len}")
    selector = selection.selector()
    granularity = selection.resolved_granularity
    layers = [i for i in range(kv.num_layers) if i not in sliding_layers]
    count = selection.kept_count(context_len)
    if selection.budget == "uniform":
        counts = budgets.uniform(count, len(layers), context_len)
    elif granularity == "global":
        raise SelectionError("global selection keeps the same tokens in every layer: use the uniform budget")
    elif selection.budget == "pyramid":
        counts = budgets.pyramid(count, len(layers), context_len)
    else:
        if sensitivities is None or len(sensitivities) != kv.num_layers:
            raise SelectionError("the adaptive budget needs one measured sensitivity per layer (kvwire study layers)")
        counts = budgets.adaptive(count, [sensitivities[i] for i in layers], context_len)
    scores = {layer: selector.score(ScoreInput(kv, stats, context_len, k), layer) for layer, k in zip(layers, counts)}
    if granularity == "global":
        summed = [layers[-1]] if selector.global_layers == "last" else layers
        total = sum(scores[layer].sum(dim=0) for layer in summed)
        scores = {layer: total.unsqueeze(0) for layer in layers}
    tail = torch.arange(context_len, kv.seq_len if keep_tail else context_len, device=kv.keys[0].device)
    keys, values, positions = list(kv.keys), list(kv.values), list(kv.positions)
    for layer, k in zip(layers, counts):
        heads = kv.keys[layer].shape[1]
        layer_scores = scores[layer]
        if granularity != "head":
            layer_scores = layer_scores.sum(dim=0, keepdim=True)
        ranked = layer_scores.topk(k, dim=-1).indices.expand(heads, -1)
        if tier_sizes is None:
            index = torch.cat([ranked.sort(dim=-1).values, tail.expand(heads, -1)], dim=1)
        else:
            index = _importance_order(ranked, tail, tier_sizes(k + len(tail)))
        keys[layer] = _gather(kv.keys[layer], index)
        values[layer] = _gather(kv.values[layer], index)
        positions[layer] = kv.positions[layer].gather(1, index)
    return KVState(keys, values, positions, kv.seq_len, kv.importance)


__all__ = ["GRANULARITIES", "METHODS", "AttentionStats", "Selection", "SelectionError", "apply_selection"]
