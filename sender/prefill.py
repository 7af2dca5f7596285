"""The sender's model work: build the prompt and prefill the part that travels as KV."""

from __future__ import annotations

import time
from dataclasses import dataclass

from common.kvstate import KVState, prefill
from common.models import LoadedModel
from common.prompts import Prompt, build_prompt


@dataclass
class Prefilled:
    prompt: Prompt
    kv: KVState
    tail_ids: list[int]  # what the receiver prefills on top of the cache
    query_aware: bool
    seconds: float


def prefill_prompt(loaded: LoadedModel, context: str, question: str, query_aware: bool = True) -> Prefilled:
    """Prefill context (and question, when query-aware) into a KVState.

    Query-aware: the cache covers the whole prompt but its last token, which the
    receiver feeds to produce the first answer token. Query-agnostic: the cache
    covers the context only, and the question travels as text.
    """
    prompt = build_prompt(loaded.tokenizer, context, question)
    split = len(prompt.ids) - 1 if query_aware else len(prompt.context_ids)
    start = time.perf_counter()
    kv = prefill(loaded.model, prompt.ids[:split])
    return Prefilled(prompt, kv, prompt.ids[split:], query_aware, time.perf_counter() - start)
