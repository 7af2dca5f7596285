"""`kvwire study info-plane`: I(X; K_l) against I(K_l; Y) for every layer, keys and values apart.

Y, the task, is measured three ways, each a held-out lower bound in bits:
- span: is each context token inside the answer? (per token; features k_t and k_t * k_last, the
  element-wise product with the last cached token, the one that has read the question)
- start: which context token starts the answer? (per question; a linear pointer over the same
  features, against a uniform prior over the context's tokens)
- nce: InfoNCE between the pooled cache (mean over the context, and the last token) and the mean
  input embedding of the answer's tokens (per question; capped at log2 of the test questions)
X, the input: which token (the training split's most frequent ids, the rest as one class) sits
at position t, from k_t alone (per token): a proxy of I(X; K_l), a lower bound on it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from channel.evaluation.information.estimators import (
    infonce_bits,
    pointer_probe_bits,
    softmax_probe_bits,
    spearman,
    whiten,
)
from channel.evaluation.information.features import KINDS, KVFeatures, split_by_article

ESTIMATORS = ("token", "span", "start", "nce")
TOKEN_CLASSES = 128  # the most frequent ids of the training split; the rest share one class
TOKEN_ROWS = (4000, 3000)  # (train, test) tokens for the token-id probe, drawn at random


CONTEXT_COMPONENTS = 32  # principal components of k_t for span and start (features: z_t and z_t * z_last)
TOKEN_COMPONENTS = 64
POOLED_COMPONENTS = 16  # for InfoNCE: per pooled part, and for the answer embedding


def _context(features: KVFeatures, paragraph: int, kind: str, layer: int) -> torch.Tensor:
    return features.paragraphs[paragraph].features[kind][layer].float()


def _paragraphs(features: KVFeatures, questions: list[int]) -> list[int]:
    return [features.questions[q].paragraph for q in questions]


def _question_rows(features: KVFeatures, train: list[int], test: list[int], kind: str,
                   layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per question, (context tokens, 2 * CONTEXT_COMPONENTS): z_t and z_t * z_last, where z is the
    whitened projection of the layer's rows learned on the training paragraphs."""
    contexts = {p: _context(features, p, kind, layer) for p in set(_paragraphs(features, train + test))}
    train_rows = torch.cat([contexts[p] for p in sorted(set(_paragraphs(features, train)))])
    lasts = [features.questions[q].last[kind][layer].float()[None] for q in train + test]
    _, projected = whiten(train_rows, [contexts[p] for p in contexts] + lasts, CONTEXT_COMPONENTS)
    z = dict(zip(contexts, projected[:len(contexts)]))
    rows = [torch.cat([z[features.questions[q].paragraph], z[features.questions[q].paragraph] * last], dim=1)
            for q, last in zip(train + test, projected[len(contexts):])]
    return rows[:len(train)], rows[len(train):]


def _span_labels(features: KVFeatures, questions: list[int]) -> torch.Tensor:
    labels = []
    for q in questions:
        question = features.questions[q]
        inside = torch.zeros(len(features.paragraphs[question.paragraph].token_ids), dtype=torch.long)
        inside[question.answer_start:question.answer_end] = 1
        labels.append(inside)
    return torch.cat(labels)


def _token_data(features: KVFeatures, paragraphs: list[int], kind: str, layer: int, rows: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to `rows` random tokens of these paragraphs: (features, token ids, paragraph of each)."""
    x = torch.cat([_context(features, p, kind, layer) for p in paragraphs])
    ids = torch.cat([features.paragraphs[p].token_ids for p in paragraphs])
    groups = torch.cat([torch.full((len(features.paragraphs[p].token_ids),), p) for p in paragraphs])
    keep = torch.randperm(len(ids), generator=generator)[:rows]
    return x[keep], ids[keep], groups[keep]


def _token_classes(train_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    values, counts = train_ids.unique(return_counts=True)
    frequent = values[counts.argsort(descending=True)[:TOKEN_CLASSES - 1]]
    classes = torch.full_like(ids, TOKEN_CLASSES - 1)
    for index, token in enumerate(frequent.tolist()):
        classes[ids == token] = index
    return classes


def _pooled(features: KVFeatures, train: list[int], test: list[int], kind: str,
            layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per question: the whitened context mean and the whitened last token, side by side."""
    means = torch.stack([_context(features, p, kind, layer).mean(0) for p in _paragraphs(features, train + test)])
    lasts = torch.stack([features.questions[q].last[kind][layer].float() for q in train + test])
    parts = [whiten(x[:len(train)], [x], POOLED_COMPONENTS)[1][0] for x in (means, lasts)]
    pooled = torch.cat(parts, dim=1)
    return pooled[:len(train)], pooled[len(train):]


def _answers(features: KVFeatures, train: list[int], test: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    answers = torch.stack([features.questions[q].answer_embedding for q in train + test])
    train_answers, (test_answers,) = whiten(answers[:len(train)], [answers[len(train):]], POOLED_COMPONENTS)
    return train_answers, test_answers


def estimate_layer(features: KVFeatures, train: list[int], test: list[int], kind: str, layer: int, seed: int,
                   shuffled: bool = False) -> dict[str, float]:
    """Every estimator for one layer and kind on one split (train and test: question indices).
    shuffled: the control, in which the training labels are shuffled (each bound should be ~0)."""
    generator = torch.Generator().manual_seed(seed)

    def scramble(labels: torch.Tensor) -> torch.Tensor:
        return labels[torch.randperm(len(labels), generator=generator)] if shuffled else labels

    question_groups = torch.tensor(_paragraphs(features, train))
    train_rows, test_rows = _question_rows(features, train, test, kind, layer)
    row_groups = torch.cat([torch.full((len(r),), g) for r, g in zip(train_rows, question_groups.tolist())])
    span = softmax_probe_bits(torch.cat(train_rows), scramble(_span_labels(features, train)), row_groups,
                              torch.cat(test_rows), _span_labels(features, test), 2, seed)
    starts = torch.tensor([features.questions[q].answer_start for q in train])
    if shuffled:
        starts = torch.tensor([int(torch.randint(len(r), (1,), generator=generator)) for r in train_rows])
    start = pointer_probe_bits(train_rows, starts, question_groups, test_rows,
                               torch.tensor([features.questions[q].answer_start for q in test]), seed)
    token_train, train_ids, token_groups = _token_data(features, sorted(set(_paragraphs(features, train))), kind, layer,
                                                       TOKEN_ROWS[0], generator)
    token_test, test_ids, _ = _token_data(features, sorted(set(_paragraphs(features, test))), kind, layer,
                                          TOKEN_ROWS[1], generator)
    token_train, (token_test,) = whiten(token_train, [token_test], TOKEN_COMPONENTS)
    token = softmax_probe_bits(token_train, scramble(_token_classes(train_ids, train_ids)), token_groups, token_test,
                               _token_classes(train_ids, test_ids), TOKEN_CLASSES, seed)
    train_pooled, test_pooled = _pooled(features, train, test, kind, layer)
    train_answers, test_answers = _answers(features, train, test)
    nce = infonce_bits(train_pooled, scramble(train_answers), question_groups, test_pooled, test_answers, seed)
    return {"token": token, "span": span, "start": start, "nce": nce}


def _summary(values: list[float], control: float) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "splits": values, "control": control}


def info_plane(features: KVFeatures, splits: int = 3, progress: Callable[[], None] | None = None) -> dict:
    """Every estimator for every layer and kind on `splits` held-out splits (split r uses seed r),
    and the shuffled-label control on split 0. Returns the per-layer table and the verdict."""
    if splits < 2:
        raise ValueError("at least 2 splits, so that there is a spread to report")
    if len(features.paragraphs) < 6 or len(features.questions) < 40:
        raise ValueError(f"{len(features.questions)} usable questions in {len(features.paragraphs)} paragraphs: "
                         "need at least 40 questions in 6 paragraphs")
    runs: dict = {}
    for split in range(splits):
        held, unit = split_by_article(features, split)
        test = [q for q, question in enumerate(features.questions) if question.paragraph in held]
        train = [q for q, question in enumerate(features.questions) if question.paragraph not in held]
        for layer in range(features.num_layers):
            for kind in KINDS:
                runs[(split, layer, kind)] = estimate_layer(features, train, test, kind, layer, split)
                if split == 0:
                    runs[("control", layer, kind)] = estimate_layer(features, train, test, kind, layer, 0, shuffled=True)
                if progress:
                    progress()
    layers = [{kind: {name: _summary([runs[(s, layer, kind)][name] for s in range(splits)],
                                     runs[("control", layer, kind)][name]) for name in ESTIMATORS}
               for kind in KINDS} for layer in range(features.num_layers)]
    verdict, evidence, parts = _verdict(layers, splits)
    return {"questions": len(features.questions), "paragraphs": len(features.paragraphs),
            "articles": len({p.article for p in features.paragraphs}), "split_unit": unit, "splits": splits,
            "units": "bits (token, span: per token; start, nce: per question)", "layers": layers,
            "depth_trends": parts, "verdict": verdict, "evidence": evidence}


def _third_difference(layers: list[dict], kind: str, name: str, splits: int) -> tuple[float, float]:
    """Deep third minus shallow third of the layers: the mean over splits, and its spread."""
    third = max(1, len(layers) // 3)
    per_split = [statistics.fmean(l[kind][name]["splits"][s] for l in layers[-third:])
                 - statistics.fmean(l[kind][name]["splits"][s] for l in layers[:third]) for s in range(splits)]
    return statistics.fmean(per_split), statistics.stdev(per_split)


def _trend(difference: float, spread: float, largest: float, expected_sign: int) -> str:
    """holds / fails: the difference is beyond twice its spread over splits, in the expected or the
    other direction; flat: beyond the spread but under a tenth of the largest layer's bound."""
    if abs(difference) <= 2 * spread:
        return "too noisy"
    if abs(difference) < 0.1 * abs(largest):
        return "flat"
    return "holds" if difference * expected_sign > 0 else "fails"


def _verdict(layers: list[dict], splits: int) -> tuple[str, str, dict]:
    """The seed predicts I(X; K_l) falls with depth (shallow layers compressible) and I(K_l; Y)
    is larger in deep layers (deep layers must be kept). Judged on token, start and span; the
    InfoNCE bound is reported beside them but, capped at log2 of the test questions and near 0
    on real caches, it does not vote."""
    parts = {}
    for kind in KINDS:
        for name, sign in (("token", -1), ("span", 1), ("start", 1), ("nce", 1)):
            difference, spread = _third_difference(layers, kind, name, splits)
            means = [l[kind][name]["mean"] for l in layers]
            parts[f"{kind}/{name}"] = {"deep_minus_shallow": difference, "spread": spread,
                                       "spearman_with_depth": spearman(list(range(len(layers))), means),
                                       "trend": _trend(difference, spread, max(means, key=abs), sign)}
    x_trend = [parts[f"{kind}/token"]["trend"] for kind in KINDS]
    y_trend = [parts[f"{kind}/start"]["trend"] for kind in KINDS] + [parts[f"{kind}/span"]["trend"] for kind in KINDS]
    trends = x_trend + y_trend
    if all(t == "holds" for t in trends):
        verdict = "holds"
    elif "holds" in trends:
        verdict = "holds in part"
    elif all(t == "too noisy" for t in trends):
        verdict = "is not decided (too noisy)"
    else:
        verdict = "does not hold"
    evidence = "; ".join(f"{key}: deep - shallow {p['deep_minus_shallow']:+.3f} ± {p['spread']:.3f} bits ({p['trend']})"
                         for key, p in parts.items())
    return verdict, evidence, parts
