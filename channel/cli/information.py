"""`kvwire study info-plane | ib-allocation | rd-bound`: the KV cache's information plane (seed Topic 8)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from channel.cli.app import (
    DeviceOption,
    DtypeOption,
    JsonOption,
    ModelOption,
    _parse_profiles,
    console,
    study_app,
    use_device,
)

Data = typer.Option(None, exists=True, dir_okay=False, help="A SQuAD-format file (default: the embedded subset).")


def _tracked(label: str, total: int | None, work):
    """work(advance) under a progress bar; a ValueError it raises is a clear error (exit 2)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                        transient=True)
    task = progress.add_task(label, total=total)
    try:
        with progress:
            return work(lambda: progress.advance(task))
    except ValueError as exc:
        _fail(exc)


def _load(model: str):
    from common.models import load_model

    try:
        return load_model(model)
    except (OSError, ValueError) as exc:
        console.print(f"[red]cannot load model {model!r}: {exc}[/red]")
        raise typer.Exit(2) from None


def _questions(data: Optional[Path], samples: int, per_paragraph: int):
    from channel.evaluation.information.features import article_titles, spread_questions
    from channel.evaluation.squad import load_squad

    titles = article_titles(data)
    return spread_questions(load_squad(data), titles, samples, per_paragraph), titles


def _write(result: dict, json_path: Optional[Path], plot_path: Optional[Path], plot, title: str) -> None:
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {json_path}")
    if plot_path:
        plot(result, title, plot_path)
        console.print(f"wrote {plot_path}")


def _fail(exc: ValueError) -> None:
    console.print(f"[red]{exc}[/red]")
    raise typer.Exit(2) from None


@study_app.command("info-plane")
def info_plane_command(
    samples: int = typer.Option(300, min=1, help="Questions (at most --per-paragraph from each paragraph)."),
    per_paragraph: int = typer.Option(2, min=1, help="Questions taken from each paragraph."),
    splits: int = typer.Option(3, min=2, help="Held-out splits by article (split r uses seed r)."),
    data: Optional[Path] = Data,
    model: str = ModelOption,
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = DtypeOption,
    json_path: Optional[Path] = JsonOption(),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="PNG of the information plane."),
) -> None:
    """Per-layer I(X; K_l) and I(K_l; Y), keys and values apart: probes and InfoNCE, held out by article."""
    use_device(device, dtype)
    from rich.table import Table

    from channel.evaluation.information.features import extract
    from channel.evaluation.information.plane import info_plane
    from channel.evaluation.information.plots import plot_info_plane

    started = time.perf_counter()
    loaded = _load(model)
    questions, titles = _questions(data, samples, per_paragraph)
    features = _tracked("prefill", len(questions), lambda advance: extract(loaded, questions, titles, progress=advance))
    result = _tracked("layers x kinds x splits", features.num_layers * 2 * splits,
                      lambda advance: info_plane(features, splits, progress=advance))
    table = Table(title=f"{model}: held-out bounds in bits, mean ± spread over {splits} splits by {result['split_unit']} "
                        f"({result['questions']} questions, {result['articles']} articles); control: shuffled labels")
    for column in ("layer", "kind", "I(X;K) token", "I(K;Y) span", "I(K;Y) start", "I(K;Y) nce", "controls t/s/s/n"):
        table.add_column(column, justify="right")
    for layer, row in enumerate(result["layers"]):
        for kind in ("keys", "values"):
            cells = [f"{row[kind][n]['mean']:.3f} ± {row[kind][n]['std']:.3f}" for n in ("token", "span", "start", "nce")]
            controls = "/".join(f"{row[kind][n]['control']:+.2f}" for n in ("token", "span", "start", "nce"))
            table.add_row(str(layer), kind, *cells, controls)
    console.print(table)
    console.print(f"[bold]info-plane: the seed's prediction {result['verdict']}.[/bold] {result['evidence']}")
    result = {"study": "info-plane", "model": model, "seconds": time.perf_counter() - started, **result}
    _write(result, json_path, plot_path, plot_info_plane, f"{model}: information plane of the KV cache")


@study_app.command("ib-allocation")
def ib_allocation_command(
    info: Path = typer.Option(..., exists=True, dir_okay=False, help="The info-plane JSON of the same model."),
    target: str = typer.Option("start", help="Which I(K_l; Y) estimate weighs the layers: start, span or nce."),
    uniform_bits: int = typer.Option(3, help="The matched budget: every layer at intN:g32 (2, 3, 4 or 8)."),
    sensitivity: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                               help="A `kvwire study layers --compress int2` JSON; default: measure "
                                                    "it here on --sensitivity-samples other questions."),
    sensitivity_samples: int = typer.Option(12, min=1, help="Questions for the int2 per-layer sensitivity."),
    samples: int = typer.Option(40, min=1, help="Questions for the end-to-end comparison (other paragraphs)."),
    data: Optional[Path] = Data,
    model: str = ModelOption,
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = DtypeOption,
    json_path: Optional[Path] = JsonOption(),
    plot_path: Optional[Path] = typer.Option(None, "--plot"),
) -> None:
    """Per-layer bits from I(K_l; Y) (IB) against the measured sensitivity, uniform and random, at matched bytes."""
    use_device(device, dtype)
    from rich.table import Table

    from channel.evaluation.information.allocation import ib_allocation
    from channel.evaluation.information.plots import plot_allocation
    from channel.evaluation.sensitivity import layer_sensitivity
    from common.profile import parse_profile

    started = time.perf_counter()
    plane = json.loads(info.read_text())
    if plane.get("study") != "info-plane" or plane.get("model") != model:
        _fail(ValueError(f"{info} is not an info-plane result for {model}"))
    if target not in ("start", "span", "nce"):
        _fail(ValueError("--target is start, span or nce"))
    loaded = _load(model)
    questions, _ = _questions(data, sensitivity_samples + samples, per_paragraph=1)
    if len(questions) < sensitivity_samples + samples:
        _fail(ValueError(f"{len(questions)} paragraphs with an answerable question: fewer than "
                         f"{sensitivity_samples} + {samples}"))
    held_for_sensitivity, evaluated = questions[:sensitivity_samples], questions[sensitivity_samples:]
    if sensitivity:
        measured = json.loads(sensitivity.read_text())["sensitivity"]
    else:
        measured = _tracked("int2 sensitivity", len(held_for_sensitivity), lambda advance: layer_sensitivity(
            loaded, held_for_sensitivity, parse_profile("int2"), progress=advance))
    result = _tracked("questions x plans", None, lambda advance: ib_allocation(
        loaded, plane, measured, evaluated, uniform_bits, target, progress=advance))
    table = Table(title=f"{model}: plans at the bytes of uniform int{uniform_bits}, {len(evaluated)} questions")
    for column in ("plan", "profile", "B/token", "KL tf", "KL first", "fidelity F1", "F1 gold"):
        table.add_column(column, justify="right")
    for s in result["summaries"]:
        table.add_row(s["plan"], s["profile"], f"{s['bytes_mean'] / s['seq_len_mean']:,.0f}",
                      f"{s['kl_tf']:.4f} ± {s['kl_tf_ci95']:.4f}", f"{s['kl_first']:.4f}",
                      f"{s['fidelity_f1']:.3f} ± {s['fidelity_f1_ci95']:.3f}", f"{s['f1_gold']:.3f}")
    console.print(table)
    console.print(f"[bold]ib-allocation: the IB plan matching the measured best {result['verdict']}.[/bold] "
                  f"{result['evidence']}")
    result = {"study": "ib-allocation", "model": model, "info": str(info),
              "sensitivity_source": str(sensitivity) if sensitivity else f"measured, int2, {sensitivity_samples} questions",
              "seconds": time.perf_counter() - started, **result}
    _write(result, json_path, plot_path, plot_allocation, f"{model}: IB allocation against the measured sensitivity")


@study_app.command("rd-bound")
def rd_bound_command(
    profiles: str = typer.Option(None, help="Comma-separated profiles (default: quantization, NF4, SVD, selection "
                                            "and hybrids; any spec of the grammar)."),
    samples: int = typer.Option(24, min=2, help="Questions for the covariances, bits and MSE."),
    task_samples: int = typer.Option(16, min=1, help="Of those, questions for KL and fidelity through the harness."),
    data: Optional[Path] = Data,
    model: str = ModelOption,
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = DtypeOption,
    json_path: Optional[Path] = JsonOption(),
    plot_path: Optional[Path] = typer.Option(None, "--plot"),
) -> None:
    """Every codec's bits per element against the Gaussian R(D) bound at the same MSE, and MSE against task KL."""
    use_device(device, dtype)
    from rich.table import Table

    from channel.evaluation.information.plots import plot_rd
    from channel.evaluation.information.ratedistortion import (
        DEFAULT_RD_PROFILES,
        rd_bound,
    )

    started = time.perf_counter()
    parsed = _parse_profiles(profiles or DEFAULT_RD_PROFILES)
    loaded = _load(model)
    questions, _ = _questions(data, samples, per_paragraph=1)
    result = _tracked("questions (codecs, then the harness)", len(questions) + min(task_samples, len(questions)) * len(parsed),
                      lambda advance: rd_bound(loaded, questions, parsed, task_samples, progress=advance))
    table = Table(title=f"{model}: bits per element against the Gaussian bound at equal MSE ({len(questions)} questions; "
                        f"KL and fidelity on {result['task_samples']})")
    for column in ("profile", "family", "bits/elem", "MSE", "bound bits", "gap bits", "KL tf", "fidelity"):
        table.add_column(column, justify="right")
    for r in sorted(result["profiles"], key=lambda r: r["bits_per_element"]):
        table.add_row(r["profile"], r["family"], f"{r['bits_per_element']:.2f}", f"{r['mse']:.4g}", f"{r['bound_bits']:.2f}",
                      f"{r['gap_bits']:+.2f}", f"{r['kl_tf']:.4f}", f"{r['fidelity_f1']:.3f}")
    console.print(table)
    console.print(f"[bold]rd-bound: SVD closest to the Gaussian bound (Theorem 2) {result['verdict']}.[/bold] "
                  f"{result['evidence']}")
    result = {"study": "rd-bound", "model": model, "seconds": time.perf_counter() - started, **result}
    _write(result, json_path, plot_path, plot_rd, f"{model}: codecs against the Gaussian rate-distortion bound")
