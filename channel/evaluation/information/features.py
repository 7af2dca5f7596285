"""Per-layer KV features of SQuAD questions, and held-out splits by article.

A context token's keys and values do not depend on the question that follows it (the model
is causal), so each paragraph's context features are stored once; each question adds the
features of the last cached token, the one position whose key and value have read the
question, and where its answer lies among the paragraph's tokens.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from channel.evaluation.squad import Sample, embedded_path
from common.models import LoadedModel
from sender.prefill import prefill_prompt

KINDS = ("keys", "values")


@dataclass
class Paragraph:
    article: str
    token_ids: torch.Tensor  # (T,) the context text's tokens
    features: dict[str, list[torch.Tensor]]  # kind -> per layer (T, kv_heads * head_dim), float16


@dataclass
class Question:
    paragraph: int  # index into KVFeatures.paragraphs
    answer_start: int  # first answer token, an index into the paragraph's tokens
    answer_end: int  # exclusive
    last: dict[str, list[torch.Tensor]]  # kind -> per layer (kv_heads * head_dim,): the last cached token
    answer_embedding: torch.Tensor  # (hidden,): mean input embedding of the answer's tokens


@dataclass
class KVFeatures:
    paragraphs: list[Paragraph]
    questions: list[Question]
    num_layers: int


def article_titles(path: str | Path | None) -> dict[str, str]:
    """Context text -> the title of its article (load_squad keeps no article)."""
    articles = json.loads(Path(path or embedded_path()).read_text())["data"]
    return {p["context"]: a.get("title", str(i)) for i, a in enumerate(articles) for p in a["paragraphs"]}


def spread_questions(samples: list[Sample], titles: dict[str, str], limit: int, per_paragraph: int = 2,
                     max_context_chars: int = 1200) -> list[Sample]:
    """Up to `limit` questions, at most `per_paragraph` of each paragraph (more paragraphs, more
    varied contexts), taken round-robin over the articles so that a held-out split by article has
    several articles on each side."""
    by_article: dict[str, dict[str, list[Sample]]] = defaultdict(dict)
    for sample in samples:
        if len(sample.context) <= max_context_chars:
            by_article[titles.get(sample.context, "?")].setdefault(sample.context, []).append(sample)
    queues = [list(paragraphs.values()) for paragraphs in by_article.values()]
    chosen: list[Sample] = []
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen += queue.pop(0)[:min(per_paragraph, limit - len(chosen))]
    return chosen


def _context_tokens(tokenizer, context_ids: list[int], context: str) -> tuple[list[tuple[int, int]], int] | None:
    """Character offsets of the prompt's context tokens, and where the context text starts;
    None when the decoded prompt does not re-tokenize to the same ids."""
    text = tokenizer.decode(context_ids)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.find(context)
    if encoded["input_ids"] != list(context_ids) or start < 0:
        return None
    return encoded["offset_mapping"], start


def _layer_rows(kv, first: int, last: int, kind: str) -> list[torch.Tensor] | None:
    """(last - first, heads * head_dim) per layer for cache positions [first, last); None when a
    sliding layer no longer holds them."""
    rows = []
    for tensor in getattr(kv, kind):
        offset = kv.seq_len - tensor.shape[2]
        if first < offset:
            return None
        block = tensor[0, :, first - offset:last - offset]  # (heads, tokens, head_dim)
        rows.append(block.permute(1, 0, 2).reshape(last - first, -1).to(torch.float16))
    return rows


def extract(loaded: LoadedModel, samples: list[Sample], titles: dict[str, str],
            progress: Callable[[], None] | None = None) -> KVFeatures:
    """Prefill every question (query-aware, as the sender does) and keep its features.

    A question whose answer text is not found in its context, or whose context falls out of
    a sliding window, is skipped."""
    embeddings = loaded.model.get_input_embeddings().weight
    paragraphs: list[Paragraph] = []
    index_of: dict[str, int] = {}
    questions: list[Question] = []
    for sample in samples:
        pre = prefill_prompt(loaded, sample.context, sample.question)
        located = _context_tokens(loaded.tokenizer, pre.prompt.context_ids, sample.context)
        answer_at = sample.context.find(sample.answers[0]) if located else -1
        if progress:
            progress()
        if answer_at < 0:
            continue
        offsets, context_start = located
        end = context_start + len(sample.context)
        inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > context_start]
        first, last = inside[0], inside[-1] + 1
        lo, hi = context_start + answer_at, context_start + answer_at + len(sample.answers[0])
        span = [i - first for i in range(first, last) if offsets[i][0] < hi and offsets[i][1] > lo]
        if not span:
            continue
        if sample.context not in index_of:
            features = {kind: _layer_rows(pre.kv, first, last, kind) for kind in KINDS}
            if any(f is None for f in features.values()):
                continue
            index_of[sample.context] = len(paragraphs)
            paragraphs.append(Paragraph(titles.get(sample.context, "?"),
                                        torch.tensor(pre.prompt.context_ids[first:last]), features))
        paragraph = paragraphs[index_of[sample.context]]
        last_rows = {kind: [r[0] for r in _layer_rows(pre.kv, pre.kv.seq_len - 1, pre.kv.seq_len, kind)] for kind in KINDS}
        answer_ids = paragraph.token_ids[span[0]:span[-1] + 1]
        questions.append(Question(index_of[sample.context], span[0], span[-1] + 1, last_rows,
                                  embeddings[answer_ids].float().mean(0).detach()))
    return KVFeatures(paragraphs, questions, pre.kv.num_layers)


def split_by_article(features: KVFeatures, seed: int, test_fraction: float = 0.3) -> tuple[set[int], str]:
    """Paragraph indices held out for testing: whole articles when there are at least four,
    else whole paragraphs (never single questions, so no context is on both sides)."""
    articles = sorted({p.article for p in features.paragraphs})
    rng = random.Random(seed)
    if len(articles) >= 4:
        rng.shuffle(articles)
        held = set(articles[:max(1, round(test_fraction * len(articles)))])
        return {i for i, p in enumerate(features.paragraphs) if p.article in held}, "article"
    indices = list(range(len(features.paragraphs)))
    rng.shuffle(indices)
    return set(indices[:max(1, round(test_fraction * len(indices)))]), "paragraph"
