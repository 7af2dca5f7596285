"""Answer metrics with the official SQuAD normalization."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize(text: str) -> str:
    """Lower case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def best_f1(prediction: str, references: Sequence[str]) -> float:
    return max((f1(prediction, r) for r in references), default=0.0)


def best_em(prediction: str, references: Sequence[str]) -> float:
    return max((exact_match(prediction, r) for r in references), default=0.0)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n)


def _field(row, name: str):
    return row[name] if isinstance(row, dict) else getattr(row, name)


def summarize_groups(rows: Sequence, by: Sequence[str], stats: Sequence[tuple]) -> list[dict]:
    """Group rows (dicts or dataclasses) by the fields `by`, in first-seen order, and summarize each group.

    Each stat is (output key, how, field): how is "mean_ci" (the mean under the key, and the
    half-width of its 95% interval under key_ci95, or under the second of a pair of keys), "mean",
    "first" (the group's first value),
    or "ratio" (field is a pair: the sum of one over the sum of the other). Every summary
    starts with the `by` fields and n, then the stats in the order given.
    """
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault(tuple(_field(row, name) for name in by), []).append(row)
    summaries = []
    for key, group in groups.items():
        summary = {**dict(zip(by, key)), "n": len(group)}
        for out, how, name in stats:
            if how == "ratio":
                numerator, denominator = name
                summary[out] = sum(_field(r, numerator) for r in group) / sum(_field(r, denominator) for r in group)
            elif how == "first":
                summary[out] = _field(group[0], name)
            elif how == "mean_ci":
                mean_key, ci_key = out if isinstance(out, tuple) else (out, f"{out}_ci95")
                summary[mean_key], summary[ci_key] = mean_ci95([_field(r, name) for r in group])
            elif how == "mean":
                summary[out] = sum(_field(r, name) for r in group) / len(group)
            else:
                raise ValueError(f"unknown statistic {how!r}")
        summaries.append(summary)
    return summaries
