"""CapKV (arXiv 2604.25975): capacity-aware selection, query-relevance-weighted leverage of the values.

Each candidate token i carries an output direction v_i (its value) and a relevance weight
w_i = exp(tau * cos(k_i, mu_q)) against a query anchor mu_q. With the capacity matrix

    A = I + sum_j w_j v_j v_j^T                       (head_dim x head_dim)

token i scores s_i = w_i * v_i^T A^-1 v_i: its weighted ridge leverage, the share of the
log-determinant "capacity" log det A that it carries. The highest scores are kept.

Implementation choices (the paper's form, made numerically safe; NVIDIA kvpress's CapPress
makes the same ones):
- Relevance uses the cosine of k_i and mu_q (both L2-normalized), not the raw dot product:
  post-RoPE keys and queries have norms in the tens, so exp(5 * <k, mu>) would overflow
  and tau = 5 would mean nothing. With the cosine, w_i ranges over exp([-2 tau, 0]).
  The logits are shifted by their per-head maximum before exp (w_max = 1).
- Values are used raw, as in the paper: the identity in A is the paper's unit ridge.
- GQA: every query head has its own anchor (the mean of its own queries), weights and
  capacity matrix; the scores of a KV head's query heads are averaged.
- The first `sinks` context tokens are always kept (score +inf) and are left out of A and
  of the anchor: their large, query-independent keys and values would dominate both.
- The anchor is the mean post-RoPE query (captured during prefill by AttentionStats; O(T)
  work, O(head_dim) memory): over the context rows after the sinks for `capkv` (query-agnostic),
  or over the rows after the context (the question and chat template) for `capkv-q`, which
  therefore needs the question inside the cache, like q2c.
A is symmetric positive definite (I plus a PSD sum), so it is solved by Cholesky, in float32
on the keys' device.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from common.select.base import GrammarOptions, ScoreInput, SelectionError, Selector
from common.select.stats import MEAN_QUERY


def capacity_scores(keys: torch.Tensor, values: torch.Tensor, anchor: torch.Tensor, tau: float) -> torch.Tensor:
    """CapKV scores s_i = w_i v_i^T A^-1 v_i, averaged over the query heads of each KV head.

    keys, values: (kv_heads, n, d); anchor: (kv_heads, group, d) -> (kv_heads, n).
    """
    keys_n = torch.nn.functional.normalize(keys.float(), dim=-1)
    anchor_n = torch.nn.functional.normalize(anchor.float(), dim=-1)
    logits = tau * (anchor_n @ keys_n.transpose(1, 2)).clamp(-1.0, 1.0)  # (kv_heads, group, n)
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp()
    values = values.float()
    d = values.shape[-1]
    eye = torch.eye(d, device=values.device, dtype=values.dtype)
    capacity = eye + torch.einsum("hgn,hnd,hne->hgde", weights, values, values)  # (kv_heads, group, d, d)
    factor = torch.linalg.cholesky(capacity)
    rhs = values.transpose(1, 2).unsqueeze(1).expand(-1, weights.shape[1], -1, -1)  # (kv_heads, group, d, n)
    solved = torch.cholesky_solve(rhs, factor)
    leverage = (rhs * solved).sum(dim=-2)  # (kv_heads, group, n)
    return (weights * leverage).mean(dim=1)


@dataclass
class CapKV(Selector):
    """Query-agnostic CapKV: the anchor is the mean query over the context (after the sinks)."""

    tau: float = 5.0
    sinks: int = 4

    default_granularity = "head"
    grammar_options: ClassVar[GrammarOptions] = {"tau": ("tau", float), "s": ("sinks", int)}

    def __post_init__(self):
        if self.tau < 0:
            raise SelectionError("capkv tau must be >= 0")
        if self.sinks < 0:
            raise SelectionError("capkv sink count must be >= 0")

    def anchor_rows(self, seq_len: int, context_len: int) -> tuple[str, range]:
        return f"{MEAN_QUERY}_context_s{self.sinks}", range(min(self.sinks, context_len), context_len)

    def row_sets(self, seq_len: int, context_len: int) -> dict[str, range]:
        name, rows = self.anchor_rows(seq_len, context_len)
        return {name: rows}

    def score(self, inputs: ScoreInput, layer: int):
        keys, values = inputs.keys(layer), inputs.values(layer)
        scores = torch.full(keys.shape[:2], float("inf"), device=keys.device)
        start = min(self.sinks, inputs.context_len)
        if start < inputs.context_len:
            name, _ = self.anchor_rows(inputs.kv.seq_len, inputs.context_len)
            anchor = inputs.mean_query(name, layer)
            scores[:, start:] = capacity_scores(keys[:, start:], values[:, start:], anchor, self.tau)
        return scores


@dataclass
class CapKVQuery(CapKV):
    """Query-aware CapKV: the anchor is the mean query of the question (the rows after the context)."""

    needs_question = True

    def anchor_rows(self, seq_len: int, context_len: int) -> tuple[str, range]:
        return f"{MEAN_QUERY}_question", range(context_len, seq_len)

    def score(self, inputs: ScoreInput, layer: int):
        if inputs.context_len >= inputs.kv.seq_len:
            raise SelectionError("capkv-q needs the question inside the cache: send query-aware")
        return super().score(inputs, layer)


def leverage_scores(keys: torch.Tensor, ridge: float) -> torch.Tensor:
    """keys: (heads, T, d) -> (heads, T) ridge leverage scores."""
    gram = keys.transpose(1, 2) @ keys  # (heads, d, d)
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
    eye = torch.eye(keys.shape[-1], device=keys.device).expand_as(gram)
    solved = torch.linalg.solve(gram + ridge * scale[:, None, None] * eye, keys.transpose(1, 2))  # (heads, d, T)
    return (keys * solved.transpose(1, 2)).sum(dim=-1)


@dataclass
class CapKVLeverage(Selector):
    """The former `capkv`: ridge leverage of the keys only, no query relevance (kept for comparison)."""

    ridge: float = 1e-3  # relative to the mean diagonal of the Gram matrix

    default_granularity = "head"
    grammar_options: ClassVar[GrammarOptions] = {"ridge": ("ridge", float)}

    def __post_init__(self):
        if self.ridge <= 0:
            raise SelectionError("capkv ridge must be positive")

    def score(self, inputs: ScoreInput, layer: int):
        return leverage_scores(inputs.keys(layer), self.ridge)
