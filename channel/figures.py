"""`make figures`: redraw every plot in results/ (the ones docs/ shows) from the JSON beside it.

    .venv/bin/python -m channel.figures [--out DIR]

No model runs: each plot comes from its data file alone, with the plotting code of the command that
first drew it (`kvwire demo`, `kvwire sweep`, `kvwire frontier`, `kvwire study ...`). With --out, the plots go to DIR
under the same relative paths, and results/ is left alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
SWEEPS = ("sweep", "sweep4k", "sweep_deadlines")


def _study_title(study: str, model: str) -> str:
    return {"info_plane": f"{model}: information plane of the KV cache",
            "ib_allocation": f"{model}: IB allocation against the measured sensitivity",
            "rd_bound": f"{model}: codecs against the Gaussian rate-distortion bound"}[study]


def redraw(out: Path) -> list[Path]:
    """Every plot, written under `out` at its path relative to results/; returns the paths."""
    from channel.demo import plot as plot_demo
    from channel.evaluation.information.plots import plot_allocation, plot_info_plane, plot_rd
    from channel.evaluation.report import plot_frontier, plot_sweep

    written = []
    demo = json.loads((RESULTS / "demo.json").read_text())
    plot_demo(demo["profiles"], out / "demo.png", demo["link"])
    written.append(out / "demo.png")
    plotters = {"info_plane": plot_info_plane, "ib_allocation": plot_allocation, "rd_bound": plot_rd}
    for data in sorted(RESULTS.glob("study_*.json")):
        study = next((name for name in plotters if data.stem.startswith(f"study_{name}_")), None)
        if study is None or not (RESULTS / f"{data.stem}.png").exists():
            continue  # a study with no plot in results/ (e.g. study_hybrid)
        result = json.loads(data.read_text())
        path = out / f"{data.stem}.png"
        plotters[study](result, _study_title(study, result["model"]), path)
        written.append(path)
    for data in sorted(RESULTS.glob("frontier*.json")):
        if (RESULTS / f"{data.stem}.png").exists():  # the frontiers that predate the plot have none
            written.append(plot_frontier(json.loads(data.read_text()), out / f"{data.stem}.png"))
    for sweep in SWEEPS:
        summary = json.loads((RESULTS / sweep / "summary.json").read_text())
        (out / sweep).mkdir(parents=True, exist_ok=True)
        written += plot_sweep(summary["summaries"], out / sweep).values()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m channel.figures", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write (default: results/ itself)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = redraw(args.out)
    print(f"redrew {len(written)} plots under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
