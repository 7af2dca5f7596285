"""Tables for evaluation summaries."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table


def summary_table(summaries: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column in ("profile", "F1 gold", "fidelity F1", "token match", "KL first", "KL tf", "top-1", "bytes", "vs fp16",
                   "kept"):
        table.add_column(column, justify="left" if column == "profile" else "right")
    for s in summaries:
        table.add_row(
            s["profile"], f"{s['f1_gold']:.3f} ± {s['f1_gold_ci95']:.3f}",
            f"{s['fidelity_f1']:.3f} ± {s['fidelity_f1_ci95']:.3f}", f"{s['token_match_rate']:.0%}",
            f"{s['kl_first']:.3f}", f"{s['kl_tf']:.3f}" if "kl_tf" in s else "-", f"{s['top1_agree']:.0%}",
            f"{s['bytes_mean']:,.0f}", f"{s['ratio_vs_fp16']:.3f}",
            f"{s['kept_fraction']:.2f}",
        )
    return table


def family(profile: str) -> str:
    """The method family a profile belongs to, for rate-distortion curves."""
    from common.profile import parse_profile

    parsed = parse_profile(profile)
    quantized = parsed.precision is not None and parsed.precision.quantizer.code_bits is not None
    if parsed.pca is not None:  # transform coding, whatever ranks the tokens for its tiers
        name = "pca+tiers" if parsed.importance else "pca"
        return name + "+text" if parsed.text_head or parsed.text_question else name
    if quantized and (parsed.prerope or parsed.rotation is not None):
        return "quantization+rot"
    if parsed.selection is not None:
        return parsed.selection.method + ("+quant" if quantized or parsed.rank else "")
    if parsed.rank is not None:
        return "svd"
    if quantized:
        return "quantization"
    return "full"


def _rate_bits(rate: str) -> float:
    from common.link import parse_rate

    return parse_rate(rate)


TICKS = (0.015625, 0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0)  # the frontier plot's: its default budgets, halved and doubled


def plot_frontier(document: dict, path: Path) -> Path:
    """`kvwire frontier`'s document as a PNG: fidelity and F1 against gold over the bytes, the tuning candidates,
    the picks on the held-out questions (with their 95% intervals) and the baselines, each budget a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    picks = [r for r in document["frontier"] if r["profile"] is not None]
    baselines = document.get("baselines", [])
    tuning = document.get("tuning", {}).get("summaries", [])
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    # (axis, the frontier row's key, the summaries' key, label); a row's interval is its fidelity's only
    panels = ((axes[0], "fidelity", "fidelity_f1", "fidelity F1 (vs the full cache's answer)"),
              (axes[1], "f1_gold", "f1_gold", "F1 vs SQuAD gold"))
    for ax, key, summary_key, label in panels:
        for r in document["frontier"]:
            ax.axvline(r["budget"], color="grey", ls=":", lw=1)
        if key == "fidelity" and tuning:
            ax.scatter([s["ratio_vs_fp16"] for s in tuning], [s["fidelity_f1"] for s in tuning], facecolors="none",
                       edgecolors="grey", label=f"candidates, {document['tuning'].get('questions', '?')} tuning questions")
        ordered = sorted(picks, key=lambda r: r["bytes_vs_fp16"])
        ax.errorbar([r["bytes_vs_fp16"] for r in ordered], [r[key] for r in ordered],
                    yerr=[r["fidelity_ci95"] for r in ordered] if key == "fidelity" else None,
                    marker="o", capsize=3, color="tab:blue", label="picks, held-out questions")
        for r in ordered:
            text = r["profile"] if key == "fidelity" else f"{r['budget']:.4g}"
            ax.annotate(text, (r["bytes_vs_fp16"], r[key]), textcoords="offset points", xytext=(4, -12), fontsize=7,
                        color="tab:blue")
        for s in baselines:
            ax.errorbar([s["ratio_vs_fp16"]], [s[summary_key]], yerr=[s[summary_key + "_ci95"]], marker="s", capsize=3,
                        color="tab:orange", ls="none")
            ax.annotate(s["profile"], (s["ratio_vs_fp16"], s[summary_key]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color="tab:orange")
        ax.set_xscale("log")
        ax.set_xticks(TICKS, [f"{100 * t:g}%" for t in TICKS])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("bytes on the wire / fp16 KV bytes (dotted: the budgets)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{document['model']}: the compression frontier (baselines in orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(summaries: list[dict], out_dir: Path) -> dict[str, Path]:
    """Rate-distortion, time-to-first-token vs bandwidth, and the Pareto front, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from channel.evaluation.sweep import pareto_front

    out_dir.mkdir(parents=True, exist_ok=True)
    by_profile = {}
    for s in summaries:
        by_profile.setdefault(s["profile"], s)
    paths = {}

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    families: dict[str, list[dict]] = {}
    for s in by_profile.values():
        families.setdefault(family(s["profile"]), []).append(s)
    colours = plt.get_cmap("tab20").colors  # distinct for up to 20 families; markers tell neighbours apart
    for i, (name, members) in enumerate(sorted(families.items())):
        members.sort(key=lambda s: s["ratio_vs_fp16"])
        for ax, key in zip(axes, ("fidelity_f1", "f1_gold")):
            ax.errorbar([m["ratio_vs_fp16"] for m in members], [m[key] for m in members],
                        yerr=[m[f"{key}_ci95"] for m in members], marker="osD^v<>"[i % 7], capsize=3, label=name,
                        color=colours[(2 * i) % 20 + (2 * i) // 20 % 2])
    for ax, label in zip(axes, ("fidelity F1 (vs full-KV answer)", "F1 vs SQuAD gold")):
        ax.set_xscale("log")
        ax.set_xlabel("bytes on the wire / fp16 KV bytes")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=7, fontsize=8)  # below: off the curves
    fig.suptitle("accuracy against bytes")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    paths["rate_distortion"] = out_dir / "rate_distortion.png"
    fig.savefig(paths["rate_distortion"], dpi=110)
    plt.close(fig)

    constant = [s for s in summaries if s["trace"] == "constant" and s["rate"]]
    if constant:
        fig, ax = plt.subplots(figsize=(8, 5))
        for profile in by_profile:
            series = sorted((s for s in constant if s["profile"] == profile), key=lambda s: _rate_bits(s["rate"]))
            ax.plot([_rate_bits(s["rate"]) / 1e6 for s in series], [s["ttft_s"] for s in series], marker=".", label=profile)
        text = {}
        for s in constant:
            text.setdefault(s["rate"], []).append(s["text_ttft_s"])
        rates = sorted(text, key=_rate_bits)
        ax.plot([_rate_bits(r) / 1e6 for r in rates], [sum(text[r]) / len(text[r]) for r in rates], "k--", lw=2,
                label="text baseline (receiver prefills)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link rate (Mbit/s)")
        ax.set_ylabel("time to first token (s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title("time to first token against bandwidth")
        fig.tight_layout()
        paths["ttft"] = out_dir / "ttft_vs_bandwidth.png"
        fig.savefig(paths["ttft"], dpi=110)
        plt.close(fig)

    front = set(pareto_front(summaries))
    fig, ax = plt.subplots(figsize=(8, 5))
    for s in by_profile.values():
        on_front = s["profile"] in front
        ax.scatter(s["ratio_vs_fp16"], s["fidelity_f1"], color="C3" if on_front else "C0", s=40 if on_front else 15)
        if on_front:
            ax.annotate(s["profile"], (s["ratio_vs_fp16"], s["fidelity_f1"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    line = sorted((by_profile[p] for p in front), key=lambda s: s["ratio_vs_fp16"])
    ax.plot([s["ratio_vs_fp16"] for s in line], [s["fidelity_f1"] for s in line], "C3-", alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("bytes on the wire / fp16 KV bytes")
    ax.set_ylabel("fidelity F1")
    ax.set_title("Pareto front: no other profile is both smaller and more faithful")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    paths["pareto"] = out_dir / "pareto.png"
    fig.savefig(paths["pareto"], dpi=110)
    plt.close(fig)
    return paths


def html_report(summaries: list[dict], plots: dict[str, Path], best: list[dict], path: Path, title: str,
                fit_s: float = 1.0) -> None:
    """One self-contained HTML file: the plots inlined, the summary and best-profile tables (a row of
    `best` with no profile gives its `reason`)."""
    import base64
    import html

    images = "".join(
        f'<h2>{html.escape(name.replace("_", " "))}</h2><img src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}" style="max-width:100%">' for name, p in plots.items())
    columns = ["profile", "link", "n", "fidelity_f1", "f1_gold", "kl_first", "bytes_mean", "ratio_vs_fp16", "link_s",
               "ttft_s", "text_ttft_s"]

    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))

    rows = "".join("<tr>" + "".join(f"<td>{cell(s[c])}</td>" for c in columns) + "</tr>" for s in summaries)
    best_rows = "".join(f"<tr><td>{html.escape(b['rate'])}</td><td>{html.escape(b['profile'])}</td>"
                        f"<td>{cell(b['fidelity_f1'])}</td><td>{cell(b['link_s'])}</td></tr>" if b["profile"] else
                        f"<tr><td>{html.escape(b['rate'])}</td><td colspan=3>none: {html.escape(b['reason'])}</td></tr>"
                        for b in best)
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}</style></head><body>
<h1>{html.escape(title)}</h1>{images}
<h2>best profile per bandwidth (most faithful whose transfer fits {fit_s:g} s)</h2>
<table><tr><th>rate</th><th>profile</th><th>fidelity F1</th><th>link s</th></tr>{best_rows}</table>
<h2>all points</h2><table><tr>{"".join(f"<th>{c}</th>" for c in columns)}</tr>{rows}</table></body></html>""")
