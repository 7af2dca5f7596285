"""`kvwire study NAME`: the research claims kvwire starts from, re-measured here, each with a verdict.

Every study returns a dict with `verdict` ("holds" / "does not hold here"), a sentence of
`evidence` with the numbers, and the per-profile summaries behind them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from channel.evaluation.harness import aggregate, evaluate, kl_divergence
from channel.evaluation.squad import Sample
from common.models import LoadedModel
from common.profile import Profile, parse_profile

QUANT_CLIFF = ["fp16", "int8", "int4:g32", "int3", "int2", "int1"]
# The same ladder with RoPE removed from keys and a Hadamard rotation first (KVQuant, QuaRot): does it move the cliff?
QUANT_ROTATED = ["fp16", "int8+prerope+rot", "int4:g32+prerope+rot", "int3+prerope+rot", "int2+prerope+rot"]
SVD_CLIFF = ["fp16", "svd:r32", "svd:r16", "svd:r8", "svd:r4"]
# Low rank with a calibrated basis instead (KVTC): bits per element, zero-bit components dropped.
PCA_LADDER = ["fp16", "pca:b4", "pca:b2", "pca:b1", "pca:b0.5"]
SELECTION_METHODS = ["q2c", "snapkv", "h2o", "random"]
SELECTION_EXTRA = ["capkv", "capkv-q"]  # CapKV (arXiv 2604.25975), query-agnostic and query-aware: not in the claim
HYBRID = ["q2c:0.5+int4:g32", "int2", "q2c:0.15+fp16", "int4:g32", "q2c:0.5+fp16"]
# Near the same bytes, the compression-frontier stages: selection + transform coding, and transform coding alone.
HYBRID_NEW = ["q2c:0.5+pca:b4", "pca:b2.5+protect:s4"]


def _by_profile(summaries: list[dict]) -> dict[str, dict]:
    return {s["profile"]: s for s in summaries}


def _parsed(specs: list[str]) -> list[Profile]:
    return [parse_profile(spec) for spec in specs]


def _coded(loaded: LoadedModel, specs: list[str]) -> list[str]:
    """The specs this model can code: `pca` needs the basis shipped for its weights, `rot` a head_dim
    that is a power of two."""
    dim = loaded.fingerprint.head_dim
    return [s for s, p in zip(specs, _parsed(specs)) if (p.pca is None or loaded.codec_context.basis is not None)
            and (p.rotation is None or dim & (dim - 1) == 0)]


def _figures(by: dict[str, dict], names: list[str]) -> str:
    return ", ".join(f"{n} {by[n]['fidelity_f1']:.2f} (KL {by[n]['kl_tf']:.3f}, {by[n]['ratio_vs_fp16']:.3f} of fp16)"
                     for n in names)


def _measured(by: dict[str, dict], specs: list[str]) -> list[str]:
    """The canonical names of those `specs` that were measured (a model may not code them all)."""
    return [n for n in map(str, _parsed(specs)) if n in by]


def _cliff(summaries: list[dict], order: list[str], label: str, extra: list[str] = ()) -> dict:
    """Where does fidelity fall most between neighbouring steps, and is everything above it near-lossless?"""
    by = _by_profile(summaries)
    names = [str(parse_profile(p)) for p in order]
    drops = [(by[a]["fidelity_f1"] - by[b]["fidelity_f1"], a, b) for a, b in zip(names, names[1:])]
    drop, above, below = max(drops)
    above_ok = all(by[n]["fidelity_f1"] >= 0.9 for n in names[: names.index(above) + 1])
    holds = drop >= 0.3 and above_ok
    evidence = (f"{label} fidelity F1: {_figures(by, names)}. Largest drop {drop:.2f} from {above} to {below}"
                f"{'' if above_ok else '; the steps above it are already below 0.9'}.")
    extra_names = _measured(by, extra[1:])
    if extra_names:
        evidence += f" {extra[0]}: {_figures(by, extra_names)}."
    return {"verdict": "holds" if holds else "does not hold here", "evidence": evidence, "summaries": summaries}


def quant_cliff(loaded, samples, max_new_tokens=24, progress=None) -> dict:
    """Seed claim: INT8 and INT4 are lossless for the task; accuracy falls off a cliff below."""
    ladder = QUANT_CLIFF + _coded(loaded, QUANT_ROTATED[1:])
    rows = evaluate(loaded, samples, _parsed(ladder), max_new_tokens, progress=progress)
    return _cliff(aggregate(rows), QUANT_CLIFF, "quantization", ["with prerope+rot", *QUANT_ROTATED[1:]])


def svd_cliff(loaded, samples, max_new_tokens=24, progress=None) -> dict:
    """Seed claim: low rank degrades sharply below some rank."""
    rows = evaluate(loaded, samples, _parsed(SVD_CLIFF + _coded(loaded, PCA_LADDER[1:])), max_new_tokens, progress=progress)
    return _cliff(aggregate(rows), SVD_CLIFF, "low rank", ["calibrated PCA basis instead", *PCA_LADDER[1:]])


def selection(loaded, samples, max_new_tokens=24, progress=None) -> dict:
    """Seed claim: at 50% kept, Q2C > SnapKV > H2O > random."""
    profiles = [f"{m}:{k}+fp16" for k in (0.25, 0.5, 0.75) for m in SELECTION_METHODS + SELECTION_EXTRA]
    summaries = aggregate(evaluate(loaded, samples, _parsed(profiles), max_new_tokens, progress=progress))
    by = _by_profile(summaries)
    order = sorted(SELECTION_METHODS, key=lambda m: -by[f"{m}:0.5+fp16"]["fidelity_f1"])
    holds = order == SELECTION_METHODS

    def at_half_figures(methods: list[str]) -> str:
        return ", ".join(f"{m} {by[f'{m}:0.5+fp16']['fidelity_f1']:.2f} ± {by[f'{m}:0.5+fp16']['fidelity_f1_ci95']:.2f}"
                         for m in methods)

    figures, extra = at_half_figures(SELECTION_METHODS), at_half_figures(SELECTION_EXTRA)
    return {"verdict": "holds" if holds else "does not hold here",
            "evidence": f"fidelity F1 at 50% kept: {figures}; measured order {' > '.join(order)}. CapKV at 50%: {extra}.",
            "summaries": summaries}


def hybrid(loaded, samples, max_new_tokens=24, progress=None) -> dict:
    """Seed claim: selection + INT4 beats either alone at matched bytes."""
    summaries = aggregate(evaluate(loaded, samples, _parsed(HYBRID + _coded(loaded, HYBRID_NEW)), max_new_tokens, progress=progress))
    by = _by_profile(summaries)
    mixed, quant_only, select_only = by["q2c:0.5+int4:g32"], by["int2:g32"], by["q2c:0.15+fp16"]
    new = _measured(by, HYBRID_NEW)
    holds = mixed["fidelity_f1"] > max(quant_only["fidelity_f1"], select_only["fidelity_f1"])
    return {"verdict": "holds" if holds else "does not hold here",
            "evidence": (f"at about {mixed['ratio_vs_fp16']:.2f} of the fp16 bytes: q2c:0.5+int4 fidelity "
                         f"{mixed['fidelity_f1']:.2f} ({mixed['ratio_vs_fp16']:.3f}), int2 alone {quant_only['fidelity_f1']:.2f} "
                         f"({quant_only['ratio_vs_fp16']:.3f}), q2c:0.15 alone {select_only['fidelity_f1']:.2f} "
                         f"({select_only['ratio_vs_fp16']:.3f})."
                         + (f" Frontier stages: {_figures(by, new)}." if new else "")),
            "summaries": summaries}


def _fit(xs: list[float], ys: list[float], kind: str) -> tuple[float, float]:
    """Least squares in log space: power law log y = log a - alpha log x, or exponential log y = log a - x / tau."""
    x = torch.tensor([math.log(v) if kind == "power" else v for v in xs], dtype=torch.float64)
    y = torch.tensor([math.log(v) for v in ys], dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], dim=1)
    coef = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)
    return float(coef[0]), float(-coef[1])


def _predict(a: float, b: float, x: float, kind: str) -> float:
    return math.exp(a - b * (math.log(x) if kind == "power" else x))


def truncation(loaded: LoadedModel, samples: list[Sample], windows=(8, 16, 32, 64, 128, 256, 512, 1024),
               fit_up_to: int = 128, sinks: int = 0, progress: Callable[[], None] | None = None) -> dict:
    """Seed claim: next-token KL against the window size decays as a power law, not exponentially.

    For each sample, KL(full || only the last w context tokens kept, plus `sinks` first tokens).
    Both laws are fitted on windows <= fit_up_to and judged on how well they extrapolate beyond.
    """
    from channel.evaluation.sensitivity import first_token_logits
    from common.select import Selection, apply_selection
    from sender.prefill import prefill_prompt

    kl = {w: [] for w in windows}
    for sample in samples:
        pre = prefill_prompt(loaded, sample.context, sample.question, True)
        reference = first_token_logits(loaded, pre.kv, pre.tail_ids)
        for w in windows:
            if w >= pre.context_len:
                continue
            method = Selection("sink", w, options=(("s", str(sinks)),)) if sinks else Selection("window", w)
            kv = apply_selection(pre.kv, method, None, pre.context_len, loaded.sliding_layers)
            kl[w].append(kl_divergence(reference, first_token_logits(loaded, kv, pre.tail_ids)))
        if progress:
            progress()
    points = [(w, sum(v) / len(v)) for w, v in kl.items() if v]
    points = [(w, max(k, 1e-9)) for w, k in points]
    train = [(w, k) for w, k in points if w <= fit_up_to]
    test = [(w, k) for w, k in points if w > fit_up_to]
    fits = {}
    for kind in ("power", "exponential"):
        a, b = _fit([w for w, _ in train], [k for _, k in train], kind)
        error = (sum(abs(math.log(_predict(a, b, w, kind)) - math.log(k)) for w, k in test) / len(test)) if test else math.nan
        fits[kind] = {"log_a": a, "rate": b, "extrapolation_log_error": error}
    power, expo = fits["power"], fits["exponential"]
    holds = power["extrapolation_log_error"] < expo["extrapolation_log_error"]
    curve = ", ".join(f"w={w}: {k:.3g}" for w, k in points)
    return {"verdict": "holds" if holds else "does not hold here",
            "evidence": (f"KL by window ({'sink ' + str(sinks) + ' + ' if sinks else ''}recent): {curve}. "
                         f"Fitted on w <= {fit_up_to}: power-law exponent alpha = {power['rate']:.2f}, "
                         f"mean |log error| beyond it {power['extrapolation_log_error']:.2f} (power) vs "
                         f"{expo['extrapolation_log_error']:.2f} (exponential, tau = {1 / expo['rate'] if expo['rate'] else math.inf:.0f} tokens)."),
            "points": points, "fits": fits}
