"""`kvwire study ib-allocation`: per-layer precision from I(K_l; Y) against the measured best, at matched bytes.

The model of what a layer keeps: quantizing layer l to b bits leaves I(Z_l; Y) = I(K_l; Y)(1 - 4^-b)
(a Gaussian channel whose noise power falls by 4 per bit). The IB plan maximizes
sum_l I(Z_l; Y) - beta * rate, beta set so that the plan spends what uniform precision spends.
The measured plan runs the same allocation with each layer's measured sensitivity (KL when that
layer alone is at int2) in place of I(K_l; Y): both minimize sum_l w_l 4^-b_l, only the weights
differ. Because the model turns weights within a factor of 4 of each other into the same width,
a second IB plan keeps only I(K_l; Y)'s ranking: the measured plan's widths, given out in that
order. These, uniform precision and a random shuffle of the measured plan's widths run end to
end through the evaluation harness.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from channel.evaluation.harness import aggregate, evaluate
from channel.evaluation.information.estimators import allocate_bits, spearman
from channel.evaluation.metrics import mean_ci95
from channel.evaluation.squad import Sample
from common.models import LoadedModel
from common.profile import parse_profile

LEVELS = (2, 3, 4, 8)
GROUP = 32  # int-N:g32, asymmetric: an fp16 scale and an fp16 minimum per 32 elements


def bits_per_element(bits: int) -> float:
    return bits + 32 / GROUP


def plan_spec(bits: list[int]) -> str:
    """A profile spec: the most common width, and an @A-B override for each run of other widths."""
    base = max(set(bits), key=bits.count)
    spec, layer = [f"int{base}"], 0
    while layer < len(bits):
        end = layer
        while end + 1 < len(bits) and bits[end + 1] == bits[layer]:
            end += 1
        if bits[layer] != base:
            spec.append(f"int{bits[layer]}@{layer}" if end == layer else f"int{bits[layer]}@{layer}-{end}")
        layer = end + 1
    return "+".join(spec)


def ib_weights(plane: dict, target: str) -> list[float]:
    """I(K_l; Y) + I(V_l; Y) per layer from an info-plane result (a negative bound counts as 0)."""
    return [sum(max(0.0, layer[kind][target]["mean"]) for kind in ("keys", "values")) for layer in plane["layers"]]


def plans(ib: list[float], measured: list[float], uniform_bits: int, seed: int) -> dict[str, list[int]]:
    """Bits per layer for every plan, all within the bytes of uniform `uniform_bits`.

    ib: the allocation under the 4^-b model with I(K_l; Y) as weights; ib-ranked: the measured
    plan's widths, given to the layers in the order of I(K_l; Y) (the ranking alone, apart from the
    model); measured: the allocation with the measured sensitivities; random: the measured plan's
    widths shuffled (a control)."""
    if len(ib) != len(measured):
        raise ValueError(f"{len(ib)} information estimates but {len(measured)} sensitivities: not the same model")
    if uniform_bits not in LEVELS:
        raise ValueError(f"uniform bits must be one of {LEVELS}")
    costs = [bits_per_element(b) for b in LEVELS]
    budget = len(ib) * bits_per_element(uniform_bits)
    measured_bits = allocate_bits(measured, list(LEVELS), costs, budget)
    ranked = [0] * len(ib)
    for layer, width in zip(sorted(range(len(ib)), key=lambda l: ib[l]), sorted(measured_bits)):
        ranked[layer] = width
    shuffled = measured_bits[:]
    random.Random(seed).shuffle(shuffled)
    return {"uniform": [uniform_bits] * len(ib), "ib": allocate_bits(ib, list(LEVELS), costs, budget),
            "ib-ranked": ranked, "measured": measured_bits, "random": shuffled}


def _paired(rows, a: str, b: str, metric: str) -> dict:
    """Per question, plan a minus plan b: mean and 95% half-width."""
    by = {(r.sample_id, r.profile): getattr(r, metric) for r in rows}
    samples = sorted({r.sample_id for r in rows})
    mean, half = mean_ci95([by[(s, a)] - by[(s, b)] for s in samples])
    return {"mean": mean, "ci95": half}


def ib_allocation(loaded: LoadedModel, plane: dict, sensitivity: list[float], samples: list[Sample],
                  uniform_bits: int = 3, target: str = "start", seed: int = 0, max_new_tokens: int = 16,
                  progress: Callable[[], None] | None = None) -> dict:
    ib = ib_weights(plane, target)
    bits = plans(ib, sensitivity, uniform_bits, seed)
    parsed = {name: parse_profile(plan_spec(b)) for name, b in bits.items()}
    canonical = {name: str(profile) for name, profile in parsed.items()}
    unique = list({str(profile): profile for profile in parsed.values()}.values())  # two plans may coincide: run each once
    rows = evaluate(loaded, samples, unique, max_new_tokens, progress=progress)
    by_profile = {s["profile"]: s for s in aggregate(rows)}
    summaries = [{"plan": name, **by_profile[spec]} for name, spec in canonical.items()]
    comparisons = {f"{a} - {b}": {metric: _paired(rows, canonical[a], canonical[b], metric)
                                  for metric in ("kl_tf", "kl_first", "fidelity_f1")}
                   for a, b in (("ib", "measured"), ("ib-ranked", "measured"), ("ib", "uniform"), ("ib-ranked", "random"),
                                ("measured", "uniform"), ("measured", "random"))}
    upgraded = {name: {l for l, b in enumerate(bits[name]) if b > uniform_bits} for name in ("ib-ranked", "measured")}
    union = upgraded["ib-ranked"] | upgraded["measured"]
    agreement = {"spearman_weights": spearman(ib, sensitivity),
                 "upgraded_jaccard": len(upgraded["ib-ranked"] & upgraded["measured"]) / len(union) if union else 1.0,
                 "same_bits_layers": sum(a == b for a, b in zip(bits["ib"], bits["measured"]))}
    verdict, evidence = _verdict(comparisons, agreement)
    return {"target": target, "uniform_bits": uniform_bits, "levels": LEVELS, "samples": len(samples),
            "weights": {"ib": ib, "measured": sensitivity}, "plans": {n: {"bits": bits[n], "profile": canonical[n]}
                                                                       for n in bits},
            "summaries": summaries, "paired": comparisons, "agreement": agreement, "verdict": verdict,
            "evidence": evidence}


def _significant(difference: dict) -> int:
    """+1 when the paired difference is above 0 beyond its 95% interval, -1 below, 0 otherwise."""
    if abs(difference["mean"]) <= difference["ci95"]:
        return 0
    return 1 if difference["mean"] > 0 else -1


def _verdict(comparisons: dict, agreement: dict) -> tuple[str, str]:
    """The claim: an allocation from I(K_l; Y) matches the measured best. Judged on teacher-forced
    KL: it holds when an IB plan (by the model, or by rank) is not worse than the measured plan
    beyond the noise and better than uniform or random precision; it does not hold when both IB
    plans are worse than the measured one."""
    worse = {plan: _significant(comparisons[f"{plan} - measured"]["kl_tf"]) > 0 for plan in ("ib", "ib-ranked")}
    better = {"ib": _significant(comparisons["ib - uniform"]["kl_tf"]) < 0,
              "ib-ranked": _significant(comparisons["ib-ranked - random"]["kl_tf"]) < 0}
    if all(worse.values()):
        verdict = "does not hold"
    elif any(better[plan] and not worse[plan] for plan in worse):
        verdict = "holds"
    else:
        verdict = "is not decided (the plans' differences are within the noise)"
    parts = [f"{key}: KL {c['kl_tf']['mean']:+.4f} ± {c['kl_tf']['ci95']:.4f}, fidelity {c['fidelity_f1']['mean']:+.3f} "
             f"± {c['fidelity_f1']['ci95']:.3f}" for key, c in comparisons.items()]
    parts.append(f"weights' rank correlation {agreement['spearman_weights']:+.2f}, layers upgraded by both / either "
                 f"{agreement['upgraded_jaccard']:.2f}")
    return verdict, "; ".join(parts)
