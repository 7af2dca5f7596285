"""`kvwire frontier`: the best profile within each byte budget, chosen on one split, measured on another.

Tuning questions pick, for each budget (a fraction of the fp16 bytes), the profile with the best
fidelity (ties: the lower teacher-forced KL) among those whose bytes stay within it. The picks
are then measured on held-out questions, which is what `results/frontier.json` reports.
"""

from __future__ import annotations

DEFAULT_BUDGETS = (0.03125, 0.0625, 0.125, 0.25)


def pick(summaries: list[dict], budgets: tuple[float, ...] = DEFAULT_BUDGETS) -> dict[float, dict | None]:
    """budget -> the tuning summary of the profile chosen for it (None if none fits)."""
    chosen = {}
    for budget in budgets:
        fitting = [s for s in summaries if s["ratio_vs_fp16"] <= budget]
        chosen[budget] = max(fitting, key=lambda s: (s["fidelity_f1"], -s["kl_tf"]), default=None)
    return chosen


def frontier_table(model: str, chosen: dict[float, dict | None], measured: list[dict], tuning: dict) -> dict:
    """The results/frontier.json document: per budget the pick and its held-out figures."""
    by_profile = {s["profile"]: s for s in measured}
    rows = []
    for budget, pick_ in chosen.items():
        if pick_ is None:
            rows.append({"budget": budget, "profile": None})
            continue
        s = by_profile[pick_["profile"]]
        rows.append({
            "budget": budget, "profile": s["profile"], "fidelity": s["fidelity_f1"],
            "fidelity_ci95": s["fidelity_f1_ci95"], "kl": s["kl_tf"], "kl_ci95": s["kl_tf_ci95"],
            "bytes_vs_fp16": s["ratio_vs_fp16"], "within_budget": s["ratio_vs_fp16"] <= budget,
            "token_match": s["token_match_rate"], "f1_gold": s["f1_gold"], "n": s["n"],
            "tuning_fidelity": pick_["fidelity_f1"], "tuning_kl": pick_["kl_tf"],
        })
    return {"model": model, "frontier": rows, "tuning": tuning}
