"""Attention statistics captured during prefill, without the T x T matrix.

kvwire registers an attention function, `kvwire`, that is sdpa plus an optional
observer. While an `AttentionStats` collector is active, the observer takes the
post-RoPE queries and keys the model itself uses and computes, for each requested
set of query rows, the attention mass every key receives from those rows: a
`(kv_heads, seq_len)` tensor per layer. Rows are processed in chunks, so memory is
O(chunk x T), never O(T x T). Query heads are grouped onto their KV head (GQA).

A row set whose name starts with `mean_query` (e.g. "mean_query_context4") instead
collects the mean post-RoPE query of those rows: a `(kv_heads, group, head_dim)` float32
tensor per layer, query head `h` at `[h // group, h % group]` (the query heads of a KV
head, in the order the model repeats keys for them). O(T x head_dim) work, O(head_dim) memory.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "kvwire"
ROW_CHUNK = 256

_active: contextvars.ContextVar[AttentionStats | None] = contextvars.ContextVar("kvwire_attention_stats", default=None)


def attention_mass(query: torch.Tensor, key: torch.Tensor, rows: range, scaling: float, chunk: int = ROW_CHUNK) -> torch.Tensor:
    """Attention mass each key receives from query rows `rows`, causal, summed per KV head.

    query: (1, q_heads, T, head_dim); key: (1, kv_heads, T, head_dim) -> (kv_heads, T).
    """
    _, q_heads, _, _ = query.shape
    kv_heads, seq_len = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    keys = key[0].float().repeat_interleave(group, dim=0)  # (q_heads, T, d)
    mass = torch.zeros(q_heads, seq_len, device=key.device)
    key_positions = torch.arange(seq_len, device=key.device)
    for start in range(rows.start, rows.stop, chunk):
        stop = min(start + chunk, rows.stop)
        logits = query[0, :, start:stop].float() @ keys.transpose(1, 2) * scaling  # (q_heads, rows, T)
        future = key_positions.unsqueeze(0) > torch.arange(start, stop, device=key.device).unsqueeze(1)
        probs = logits.masked_fill(future, float("-inf")).softmax(dim=-1)
        mass += probs.sum(dim=1)
    return mass.view(kv_heads, group, seq_len).sum(dim=1)


MEAN_QUERY = "mean_query"


def mean_query(query: torch.Tensor, kv_heads: int, rows: range) -> torch.Tensor:
    """Mean over rows `rows` of the post-RoPE queries, grouped by KV head.

    query: (1, q_heads, T, head_dim) -> (kv_heads, q_heads // kv_heads, head_dim), float32.
    """
    q_heads, head_dim = query.shape[1], query.shape[-1]
    mean = query[0, :, rows.start:rows.stop].float().mean(dim=1)  # (q_heads, d)
    return mean.view(kv_heads, q_heads // kv_heads, head_dim)


@dataclass
class AttentionStats:
    """Collects attention mass per layer for named row ranges, e.g. {"question": range(200, 230)}."""

    row_sets: dict[str, range]
    # name -> layer -> (kv_heads, seq_len) attention mass, or (kv_heads, group, head_dim) mean query
    # for names starting with MEAN_QUERY.
    mass: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)

    def observe(self, module, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        for name, rows in self.row_sets.items():
            if len(rows):
                if name.startswith(MEAN_QUERY):
                    value = mean_query(query, key.shape[1], rows)
                else:
                    value = attention_mass(query, key, rows, scaling)
                self.mass.setdefault(name, {})[module.layer_idx] = value

    def layer(self, name: str, layer: int) -> torch.Tensor:
        try:
            return self.mass[name][layer]
        except KeyError:
            raise KeyError(f"no '{name}' attention statistics for layer {layer}; capture them during prefill") from None


def _attention(module, query, key, value, attention_mask, **kwargs):
    stats = _active.get()
    # Sliding-window layers keep their own window; selection never touches them.
    if stats is not None and kwargs.get("sliding_window") is None and query.shape[2] == key.shape[2]:
        stats.observe(module, query, key, kwargs.get("scaling") or query.shape[-1] ** -0.5)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


@contextlib.contextmanager
def collecting(stats: AttentionStats | None):
    """Within this block, prefills of kvwire-loaded models feed `stats`."""
    token = _active.set(stats)
    try:
        yield stats
    finally:
        _active.reset(token)
