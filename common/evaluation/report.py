"""Tables for evaluation summaries."""

from __future__ import annotations

from rich.table import Table


def summary_table(summaries: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column in ("profile", "F1 gold", "fidelity F1", "token match", "KL first", "top-1", "bytes", "vs fp16", "kept"):
        table.add_column(column, justify="left" if column == "profile" else "right")
    for s in summaries:
        table.add_row(
            s["profile"], f"{s['f1_gold']:.3f} ± {s['f1_gold_ci95']:.3f}",
            f"{s['fidelity_f1']:.3f} ± {s['fidelity_f1_ci95']:.3f}", f"{s['token_match_rate']:.0%}",
            f"{s['kl_first']:.3f}", f"{s['top1_agree']:.0%}", f"{s['bytes_mean']:,.0f}", f"{s['ratio_vs_fp16']:.3f}",
            f"{s['kept_fraction']:.2f}",
        )
    return table
