"""The sender's model work: prefill the part that travels as KV, and select tokens from it."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace

import torch

from common.kvstate import KVState, prefill
from common.models import LoadedModel
from common.plan import tier_sizes
from common.profile import Profile
from common.prompts import Prompt, build_prompt
from common.select import METHODS, AttentionStats, SelectionError, apply_selection
from common.select.budgets import shipped_sensitivities
from common.select.stats import collecting

QUESTION = "question"  # the attention row set of the question's tokens (see AttentionStats)


@dataclass
class Prefilled:
    prompt: Prompt
    kv: KVState
    context_len: int  # cache tokens [0, context_len) are selectable context; the rest are always kept
    stats: AttentionStats | None
    seconds: float

    @property
    def cache_ids(self) -> list[int]:
        """The prompt tokens the cache holds (what a text segment of it carries)."""
        return self.prompt.ids[:self.kv.seq_len]

    @property
    def tail_ids(self) -> list[int]:
        """What the receiver prefills on top of the whole cache."""
        return self.tail_after(self.kv.seq_len)

    @property
    def head_ids(self) -> list[int]:
        """The template's head: what a profile's text:h sends as token ids."""
        return self.prompt.ids[:self.prompt.head_len]

    def tail_after(self, seq_len: int) -> list[int]:
        """What the receiver prefills on top of a cache that ends at `seq_len` (a text:q cache ends with the context)."""
        return self.prompt.ids[seq_len:]

    @property
    def seconds_per_token(self) -> float:
        """This prefill's rate: what the receiver's prefill of text from this context will cost."""
        return self.seconds / self.kv.seq_len


def prefill_prompt(loaded: LoadedModel, context: str, question: str, query_aware: bool = True,
                   profiles: list[Profile] = ()) -> Prefilled:
    """Prefill context (and question, when query-aware) into a KVState.

    Query-aware: the cache covers the whole prompt but its last token, which the
    receiver feeds to produce the first answer token. Query-agnostic: the cache
    covers the context only, and the question travels as text. Attention statistics
    are captured for the selection stages of `profiles`.
    """
    return prefill_built(loaded, build_prompt(loaded.tokenizer, context, question), query_aware, profiles)


def prefill_built(loaded: LoadedModel, prompt: Prompt, query_aware: bool = True, profiles: list[Profile] = (),
                  on_layer=None) -> Prefilled:
    """`prefill_prompt` of a prompt already built. `on_layer(layer, keys, values, importance)`, if given,
    is called as soon as each layer has run, with its final cache tensors and, when a profile steps
    tokens by the question (pca:...:e:iG), that layer's importance (else None).

    The question is prefilled with the context, so layer l's share of the question's attention is
    complete once layer l has run: the attention statistics of a layer are taken inside its own
    attention, before any later layer starts. A layer-pipelined sender can code layer l while the
    later layers prefill, with the same importance as a whole prefill's.
    """
    loaded.check_prompt(len(prompt.ids))  # before any model work: RoPE past the trained positions is garbage
    seq_len = len(prompt.ids) - 1 if query_aware else len(prompt.context_ids)
    context_len = len(prompt.context_ids)
    row_sets = {}
    for profile in profiles:
        if profile.selection is not None:
            row_sets.update(profile.selection.needs(seq_len, context_len))
    importance = any(profile.needs_importance for profile in profiles)
    if importance:
        if not query_aware:
            raise SelectionError("pca:...:e:iG steps tokens by the question's attention: send query-aware")
        row_sets[QUESTION] = range(context_len, seq_len)
    stats = AttentionStats(row_sets) if row_sets else None
    shares: dict[int, torch.Tensor] = {}

    def share(layer: int) -> torch.Tensor:
        """Each position's share of the question's attention in `layer`, summed over heads. The statistics
        skip sliding-window layers (Gemma-3), whose tokens then share one step."""
        if layer not in shares:
            found = stats.mass.get(QUESTION, {})
            if layer in found:
                shares[layer] = found[layer].float().sum(0)
            elif layer in loaded.sliding_layers:
                shares[layer] = torch.ones(seq_len, device=loaded.device)
            else:
                raise SelectionError(f"no question attention was captured for layer {layer}")
        return shares[layer]

    def layer_done(layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        on_layer(layer, keys, values, share(layer) if importance else None)

    start = time.perf_counter()
    with collecting(stats):
        kv = prefill(loaded.model, prompt.ids[:seq_len], layer_done if on_layer else None)
    if importance:
        kv = replace(kv, importance=[share(layer) for layer in range(kv.num_layers)])
    if loaded.device.type == "cuda":  # the clock stops when the device has run the prefill, not when it was queued
        torch.cuda.current_stream(loaded.device).synchronize()
    return Prefilled(prompt, kv, context_len, stats, time.perf_counter() - start)


def needs_question(profile: Profile) -> bool:
    """Whether the profile reads the question's attention (its selection, or pca:...:e:iG's per-token
    steps), so the sender must prefill the question (query-aware)."""
    return profile.needs_importance or (profile.selection is not None and METHODS[profile.selection.method].needs_question)


def select_tokens(loaded: LoadedModel, pre: Prefilled, profile: Profile) -> KVState:
    """Apply the profile's selection stage (if any), and leave out the question when it travels as text
    (text:q); the codec stages run in common.wire."""
    kv = _selected(loaded, pre, profile)
    return kv.before(pre.context_len) if profile.text_question else kv


def _selected(loaded: LoadedModel, pre: Prefilled, profile: Profile) -> KVState:
    selection = profile.selection
    if selection is None:
        return pre.kv
    if needs_question(profile) and pre.context_len >= pre.kv.seq_len:
        raise SelectionError(f"{selection.method} needs the question inside the cache: send query-aware")
    sensitivities = shipped_sensitivities(loaded.name) if selection.budget == "adaptive" else None
    return apply_selection(pre.kv, selection, pre.stats, pre.context_len, loaded.sliding_layers, sensitivities,
                           functools.partial(tier_sizes, profile) if profile.importance else None, keep_tail=not profile.text_question)
