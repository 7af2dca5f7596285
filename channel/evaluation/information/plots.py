"""The three studies' figures (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_info_plane(result: dict, title: str, path: Path) -> None:
    """Left: the information plane, I(X; K_l) against I(K_l; Y = answer start), one point per layer.
    Right: every estimator against depth (means over splits, bars: spread)."""
    plt = _pyplot()
    figure, (plane, depth) = plt.subplots(1, 2, figsize=(13, 5.5))
    layers = result["layers"]
    for kind, colour in (("keys", "tab:blue"), ("values", "tab:orange")):
        x = [l[kind]["token"]["mean"] for l in layers]
        y = [l[kind]["start"]["mean"] for l in layers]
        plane.errorbar(x, y, xerr=[l[kind]["token"]["std"] for l in layers], yerr=[l[kind]["start"]["std"] for l in layers],
                       fmt="o", color=colour, alpha=0.8, label=kind, ms=4, lw=0.8)
        for index, (a, b) in enumerate(zip(x, y)):
            plane.annotate(str(index), (a, b), fontsize=7, color=colour)
        for name, style in (("token", "-"), ("start", "--"), ("span", ":"), ("nce", "-.")):
            depth.errorbar(range(len(layers)), [l[kind][name]["mean"] for l in layers],
                           yerr=[l[kind][name]["std"] for l in layers], ls=style, color=colour, lw=1,
                           label=f"{kind} {name}")
    plane.set_xlabel("I(X; K_l) lower bound: token id from the layer's row (bits/token)")
    plane.set_ylabel("I(K_l; Y) lower bound: answer start (bits/question)")
    plane.set_title("information plane (numbers: layer)")
    plane.legend()
    depth.axhline(0, color="grey", lw=0.5)
    depth.set_xlabel("layer")
    depth.set_ylabel("held-out bound (bits)")
    depth.set_title("estimators by depth (bars: spread over splits)")
    depth.legend(fontsize=7, ncol=2)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_allocation(result: dict, title: str, path: Path) -> None:
    """Top: the per-layer weights (I(K_l; Y) and measured sensitivity, each scaled to its maximum)
    and the bits each plan gives each layer. Bottom: the plans' task quality at matched bytes."""
    plt = _pyplot()
    figure, (weights, quality) = plt.subplots(2, 1, figsize=(11, 8))
    layers = range(len(result["weights"]["ib"]))
    for name, colour in (("ib", "tab:green"), ("measured", "tab:red")):
        values = result["weights"][name]
        top = max(max(values), 1e-12)
        weights.plot(layers, [v / top for v in values], "o-", color=colour, label=f"{name} weight (scaled)")
    for name, colour in (("ib", "tab:green"), ("ib-ranked", "tab:olive"), ("measured", "tab:red")):
        weights.step(layers, [b / 8 for b in result["plans"][name]["bits"]], where="mid", color=colour, ls="--",
                     label=f"{name} plan: bits / 8")
    weights.set_xlabel("layer")
    weights.legend(fontsize=8)
    weights.set_title("per-layer weights and the bits each plan gives")
    names = [s["profile"] for s in result["summaries"]]
    labels = [s["plan"] for s in result["summaries"]]
    kl = [s["kl_tf"] for s in result["summaries"]]
    half = [s["kl_tf_ci95"] for s in result["summaries"]]
    quality.bar(range(len(names)), kl, yerr=half, color="tab:purple", alpha=0.7)
    quality.set_xticks(range(len(names)), [f"{label}\n{s['bytes_mean']:,.0f} B" for label, s in
                                           zip(labels, result["summaries"])])
    quality.set_ylabel("teacher-forced KL vs full cache (nats, lower is better)")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_rd(result: dict, title: str, path: Path) -> None:
    """The Gaussian R(D) bound of the cache against each profile's (MSE, bits per element)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(9, 6))
    curve = result["bound_curve"]
    axes.plot([p["mse"] for p in curve], [p["bits"] for p in curve], "k-", label="Gaussian R(D) (reverse water-filling)")
    colours = {"quantization": "tab:blue", "svd": "tab:red", "selection": "tab:green", "hybrid": "tab:purple"}
    for family, colour in colours.items():
        rows = [r for r in result["profiles"] if r["family"] == family]
        axes.plot([r["mse"] for r in rows], [r["bits_per_element"] for r in rows], "o", color=colour, label=family)
    for row in result["profiles"]:
        axes.annotate(row["profile"], (row["mse"], row["bits_per_element"]), fontsize=7)
    axes.set_xscale("log")
    axes.set_xlabel("MSE per element (keys and values)")
    axes.set_ylabel("bits per element (on the wire)")
    axes.legend()
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
