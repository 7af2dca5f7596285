"""Commands that measure: eval, sweep, studies, calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from channel.cli.app import (
    DeviceOption,
    DtypeOption,
    JsonOption,
    ModelOption,
    _evaluate,
    _parse_profiles,
    app,
    console,
    study_app,
    use_device,
)


@app.command("eval")
def eval_command(
    profiles: str = typer.Option("fp16,int8,int4:g32,q2c:0.5", help="Comma-separated profiles."),
    samples: int = typer.Option(20, min=1, help="Answerable questions to use."),
    data: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="A SQuAD-format JSON file (default: the embedded subset)."),
    max_new_tokens: int = typer.Option(24, min=1, max=512),
    skip: int = typer.Option(0, min=0, help="Leave out the first N answerable questions (a held-out split)."),
    json_path: Optional[Path] = JsonOption("Write per-profile summaries and per-sample rows."),
    model: str = ModelOption,
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = DtypeOption,
) -> None:
    """Accuracy against bytes: F1 vs gold, fidelity vs full KV, first-token KL, bytes per profile."""
    use_device(device, dtype)
    import json

    from channel.evaluation.harness import aggregate, rows_as_dicts
    from channel.evaluation.report import summary_table

    rows, dataset = _evaluate(model, data, samples, _parse_profiles(profiles), max_new_tokens, skip)
    summaries = aggregate(rows)
    console.print(summary_table(summaries, f"{model}: {len(dataset)} questions, fidelity against the full-KV answer"))
    if json_path:
        json_path.write_text(json.dumps({"model": model, "profiles": summaries, "samples": rows_as_dicts(rows)}, indent=2))
        console.print(f"wrote {json_path}")


DEFAULT_SWEEP_PROFILES = ("fp16,int8,int4:g32,int3,int2,nf4,svd:r32+int8,q2c:0.75+fp16,q2c:0.5+fp16,q2c:0.25+fp16,"
                          "snapkv:0.5+fp16,h2o:0.5+fp16,random:0.5+fp16,q2c:0.75+int4:g32,q2c:0.5+int4:g32,"
                          "q2c:0.25+int4:g32,q2c:0.5+int8,snapkv:0.5+int4:g32,int4:g32+prerope+rot,"
                          "q2c:1+pca:b0.5+tier:0.1:int4,pca:b1+protect:s4,pca:b2.5+protect:s4,"
                          "q2c:1+pca:b3:k2.5+tier:0.15:int8,pca:b0.65:w+text,pca:b1.05+pca:b1.9@13-24+text,"
                          "pca:b1.35:w+text,pca:b2.8:w+text,pca:b5.5:w+text,pca:b0.8:w:e:i1+text,"
                          "pca:b1.75:w:e:i1+text,pca:b3.1:w:e:i1+text,pca:b4.8:w:e+text,pca:b1.75:w:e:i1:f3+text,"
                          "pca:b3.05:w:e:i1:f3+text,pca:b1.7:w:e:j:i1:f3+text,pca:b3.05:w:e:j:i1:f3+text")


@app.command("sweep")
def sweep(
    profiles: str = typer.Option(DEFAULT_SWEEP_PROFILES, help="Comma-separated profiles."),
    bandwidths: str = typer.Option("1mbit,2mbit,5mbit,10mbit,20mbit,50mbit,100mbit,200mbit,500mbit,1gbit",
                                   help="Constant-rate links."),
    traces: str = typer.Option("markov,step:100mbit:10mbit:0.5s", help="Varying links (comma-separated; empty for none)."),
    delay: str = typer.Option("10ms", help="One-way delay on every link."),
    samples: int = typer.Option(20, min=1),
    data: Optional[Path] = typer.Option(None, exists=True, dir_okay=False),
    out: Path = typer.Option(Path("kvwire-sweep/sweep.jsonl"), help="JSONL of points; rerunning skips what is there."),
    report_dir: Path = typer.Option(Path("kvwire-sweep"), help="Plots, summary JSON and the HTML report."),
    fit_s: float = typer.Option(1.0, "--fit-s", min=0.0, help="The best-profile table: the most faithful profile "
                                                              "whose modeled transfer takes at most this long."),
    max_new_tokens: int = typer.Option(24, min=1, max=512),
    workers: int = typer.Option(1, min=1, help="Local processes for the model work."),
    runner: str = typer.Option("local", help="local, or ray (optional extra)."),
    validate: int = typer.Option(0, min=0, help="Re-run this many constant-rate points through real gRPC and the relay."),
    deadlines: str = typer.Option("", help="e.g. 0.5,1,2,5: replay transfers along each trace of --traces and compare "
                                           "static profiles against auto and auto-segments on deadline hit rate "
                                           "and quality."),
    statics: str = typer.Option("int8,int4:g32,q2c:0.5+int4:g32", help="Static profiles for --deadlines."),
    haystack: int = typer.Option(0, min=0, help="Use needle-in-a-haystack contexts of this many tokens instead of SQuAD."),
    model: str = ModelOption,
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = DtypeOption,
) -> None:
    """Grid of profiles x links x samples: accuracy vs bytes, time to first token vs bandwidth, Pareto front."""
    use_device(device, dtype)
    import json

    from rich.progress import Progress
    from rich.table import Table

    from channel.evaluation import sweep as sweep_module
    from channel.evaluation.report import html_report, plot_sweep
    from channel.evaluation.squad import load_squad

    if runner not in ("local", "ray"):
        raise typer.BadParameter("runner is local or ray", param_hint="--runner")
    parsed = _parse_profiles(profiles)
    names = [str(p) for p in parsed]
    links = sweep_module.link_specs([b for b in bandwidths.split(",") if b], [t for t in traces.split(",") if t], delay)
    try:
        for spec in links:
            link_from_options_checked(spec)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if haystack:
        from channel.evaluation.haystack import needle_samples
        from common.models import load_model

        depths = [i / max(1, samples - 1) for i in range(samples)]
        dataset = needle_samples(load_model(model).tokenizer, haystack, depths)
    else:
        dataset = load_squad(data, limit=samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    with Progress(console=console) as progress:
        task = progress.add_task("samples x profiles", total=len(dataset) * len(names))
        done = sweep_module.load_done(out)
        already = sum(1 for s in dataset for p in names
                      if {sweep_module.link_key(l) for l in links} <= done.get((s.id, p), set()))
        progress.advance(task, already)
        computed = sweep_module.run_sweep(model, dataset, parsed, links, out, max_new_tokens, workers, runner,
                                          progress=lambda n: progress.advance(task, n))
    console.print(f"{computed} (sample, profile) pairs computed, {already} already in {out}")
    ids = {s.id for s in dataset}
    wanted = {sweep_module.link_key(spec) for spec in links}  # the file may hold other runs' links too
    points = [p for p in map(json.loads, out.read_text().splitlines())
              if p["sample_id"] in ids and p["profile"] in names and p["link"] in wanted]
    summaries = sweep_module.summarize(points)
    plots = plot_sweep(summaries, report_dir)
    rates = [spec["rate"] for spec in links if spec["trace"] == "constant"]
    best = sweep_module.best_per_rate(summaries, rates, fit_s)
    table = Table(title=f"best profile per bandwidth: the most faithful whose modeled transfer fits {fit_s:g} s")
    for column in ("rate", "profile", "fidelity F1", "F1 gold", "bytes", "link s", "TTFT s", "text TTFT s"):
        table.add_column(column, justify="right")
    for b in best:
        if b["profile"]:
            table.add_row(b["rate"], b["profile"], f"{b['fidelity_f1']:.3f}", f"{b['f1_gold']:.3f}",
                          f"{b['bytes_mean']:,.0f}", f"{b['link_s']:.3f}", f"{b['ttft_s']:.2f}", f"{b['text_ttft_s']:.2f}")
        else:
            table.add_row(b["rate"], f"none: {b['reason']}", *[""] * 6)
    if not rates:
        table.caption = "no constant-rate link was asked for (--bandwidths is empty)"
    console.print(table)
    front = sweep_module.pareto_front(summaries)
    console.print(f"Pareto front (bytes vs fidelity): {', '.join(front)}")
    validation = []
    if validate:
        from channel.evaluation.validate import validate as run_validation

        distinct = {}
        for p in points:  # one point per (profile, rate), spread over the grid
            if p["trace"] == "constant":
                distinct.setdefault((p["profile"], p["rate"]), p)
        chosen = list(distinct.values())
        chosen = chosen[:: max(1, len(chosen) // validate)][:validate]
        validation = run_validation(model, {s.id: s for s in dataset}, chosen)
        for v in validation:
            console.print(f"validate {v['profile']} at {v['rate']}: modeled {v['modeled_s']:.3f} s, "
                          f"measured {v['measured_s']:.3f} s through the relay (x{v['ratio']:.3f})")
    deadline_rows = []
    if deadlines:
        from channel.evaluation.deadlines import replay, replay_span
        from common.link import Trace, link_from_options, parse_duration
        from common.planner import load_table

        static_names = [str(p) for p in _parse_profiles(statics)]
        varying = [spec for spec in links if spec["trace"] != "constant"]
        if not varying:
            raise typer.BadParameter("--deadlines replays transfers along the varying links of --traces", param_hint="--traces")
        limits = [float(d) for d in deadlines.split(",")]
        for spec in varying:
            trace = link_from_options(None, spec["trace"], spec["delay"]).trace
            if spec["trace"] == "markov":  # as long as the replay reads it: every start plus the longest deadline
                trace = Trace.markov(duration_s=replay_span(limits))
            rows = replay(sweep_module.model_points(points), [s.id for s in dataset], static_names, load_table(model),
                          trace, parse_duration(delay), limits,
                          enter_at_random=not spec["trace"].startswith("step:"))
            deadline_rows += [{"trace": spec["trace"], **row} for row in rows]
            table = Table(title=f"static profiles against the planners, trace {spec['trace']}: deadline hit rate, quality")
            for column in ("deadline s", "profile", "hit rate", "mean quality", "sent as"):
                table.add_column(column, justify="right")
            for row in rows:
                sent_as = ", ".join(f"{name} {count / row['transfers']:.0%}" for name, count in row["choices"].items())
                table.add_row(f"{row['deadline_s']:g}", row["profile"], f"{row['hit_rate']:.1%}", f"{row['mean_quality']:.3f}",
                              sent_as if row["profile"].startswith("auto") else "")
            console.print(table)
    report = {"model": model, "samples": len(dataset), "profiles": names, "links": links, "summaries": summaries,
              "best": best, "pareto": front, "validation": validation, "deadlines": deadline_rows}
    (report_dir / "summary.json").write_text(json.dumps(report, indent=2))
    html_report(summaries, plots, best, report_dir / "report.html", f"kvwire sweep: {model}, {len(dataset)} questions",
                fit_s)
    console.print(f"wrote {report_dir}/summary.json, report.html and {len(plots)} plots")


def link_from_options_checked(spec: dict) -> None:
    from common.link import link_from_options

    link_from_options(spec["rate"] or None, spec["trace"], spec["delay"])


DEFAULT_FRONTIER_PROFILES = (
    "pca:b0.5+protect:s4,pca:b0.5:k0.25+protect:s4,q2c:1+pca:b0.25+tier:0.05:int4,q2c:0.5+pca:b0.75+tier:0.05:int4,"
    "pca:b1+protect:s4,pca:b1:k0.75+protect:s4,q2c:1+pca:b0.75+tier:0.05:int8,q2c:1+pca:b0.5+tier:0.1:int4,"
    "q2c:0.75+pca:b1+tier:0.05:int8,q2c:1+int1+tier:0.1:int4,"
    "pca:b2+protect:s4,pca:b2:k1.5+protect:s4,q2c:1+pca:b1.5+tier:0.1:int8,q2c:1+pca:b1.5:k1+tier:0.1:int8,"
    "q2c:1+pca:b1+tier:0.1:int8+tier:0.1:int4,q2c:1+int2+prerope+rot+tier:0.1:int8,"
    "pca:b4:k3+protect:s4,q2c:1+pca:b3+tier:0.1:int8,q2c:1+pca:b3:k2.5+tier:0.15:int8,q2c:1+int3+prerope+rot+tier:0.1:int8,"
    "int4:g32+prerope+rot,q2c:0.5+int4:g32,"
    # round 3: per-layer bits, more for layers 13-24 (the most sensitive in `kvwire study layers` on SmolLM2)
    "q2c:0.5+pca:b0.3+pca:b0.8@13-24+tier:0.05:int4,q2c:1+pca:b0.25+pca:b0.9@13-24+tier:0.1:int4,"
    "pca:b0.35+pca:b1.2@13-24+protect:s4,q2c:1+pca:b0.35+pca:b1.1@13-24+tier:0.1:int8+tier:0.1:int4,"
    "pca:b1+pca:b2.5@13-24+protect:s4,q2c:1+pca:b0.75+pca:b2@13-24+tier:0.1:int4,"
    "q2c:1+pca:b0.9+pca:b2.2@13-24+tier:0.1:int4,q2c:1+pca:b2.25:k2+pca:b4:k3.5@13-24+tier:0.15:int8,"
    # round 4: the template's head and the question travel as token ids (text), the context in the basis
    "pca:b0.6+text,pca:b0.7+text,pca:b1.35+text,pca:b1.4+text,pca:b1.05+pca:b1.9@13-24+text,pca:b1.4:k1.1+text,"
    "pca:b2.8+text,pca:b2.2+pca:b3.6@13-24+text,pca:b5.5+text,int4:g32+text,q2c:1+pca:b0.6+tier:0.1:int4+text:q,"
    # round 5: the basis fitted for attention's error, with layer weights (pca:w: bits over all layers by them)
    "pca:b0.65:w+text,pca:b1.3:w+text,pca:b1.35:w+text,pca:b1.4:w+text,pca:b2.75:w+text,pca:b2.8:w+text,pca:b5.5:w+text,"
    # round 6: entropy-coded (pca:w:e: one weighted step for every component, range-coded), and with each
    # token's step set by the question's attention (pca:w:e:i1)
    "pca:b0.55:w:e+text,pca:b0.6:w:e+text,pca:b1.2:w:e+text,pca:b1.25:w:e+text,pca:b2.4:w:e+text,pca:b2.5:w:e+text,"
    "pca:b4.8:w:e+text,pca:b5:w:e+text,pca:b0.8:w:e:i1+text,pca:b0.85:w:e:i1+text,pca:b1.7:w:e:i1+text,"
    "pca:b1.75:w:e:i1+text,pca:b3.1:w:e:i1+text,pca:b3.4:w:e:i1+text,pca:b3.5:w:e:i1+text,pca:b5.5:w:e:i1+text,"
    "pca:b6.5:w:e:i1+text,"
    # round 7: a floor on the per-token step classes (pca:w:e:i1:fF: no token coarser than 2^(F/2) steps)
    "pca:b1.6:w:e:i1:f2+text,pca:b1.65:w:e:i1:f2+text,pca:b1.7:w:e:i1:f3+text,pca:b1.75:w:e:i1:f3+text,"
    "pca:b0.9:w:e:i1:f2+text,pca:b2.95:w:e:i1:f2+text,pca:b3.05:w:e:i1:f3+text,"
    # round 8: keys and values in one joint transform per layer (pca:w:e:j)
    "pca:b1.65:w:e:j:i1:f3+text,pca:b1.7:w:e:j:i1:f3+text,pca:b3.05:w:e:j:i1:f3+text,pca:b3.15:w:e:j:i1:f3+text,"
    "pca:b3.25:w:e:j:i1:f3+text")


@app.command("frontier")
def frontier_command(
    profiles: str = typer.Option(DEFAULT_FRONTIER_PROFILES, help="Candidate profiles, comma-separated."),
    budgets: str = typer.Option("0.03125,0.0625,0.125,0.25", help="Byte budgets, fractions of the fp16 bytes."),
    baselines: str = typer.Option("int8,int4:g32,q2c:0.25+int4:g32", help="Measured on the held-out questions beside the picks."),
    tune_data: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="Tuning questions (default: the embedded subset, after the held-out ones)."),
    tune_skip: Optional[int] = typer.Option(None, min=0, help="Leave out the first N tuning questions (default: --samples when tuning on the embedded subset, else 0)."),
    tune_samples: int = typer.Option(40, min=1),
    data: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="Held-out questions (default: the embedded subset)."),
    samples: int = typer.Option(100, min=1, help="Held-out questions."),
    max_new_tokens: int = typer.Option(24, min=1, max=512),
    json_path: Optional[Path] = JsonOption("Write results/frontier.json's format, and its plot beside it (.png)."),
    model: str = ModelOption,
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = DtypeOption,
) -> None:
    """The compression frontier: per byte budget, the best candidate on tuning questions, measured on held-out ones."""
    use_device(device, dtype)
    import json

    from rich.table import Table

    from channel.evaluation.frontier import frontier_table, pick
    from channel.evaluation.harness import aggregate
    from channel.evaluation.report import plot_frontier, summary_table

    try:
        limits = tuple(float(b) for b in budgets.split(",") if b.strip())
    except ValueError:
        raise typer.BadParameter(f"budgets {budgets!r} are not numbers", param_hint="--budgets") from None
    candidates, references = _parse_profiles(profiles), _parse_profiles(baselines)
    skip = tune_skip if tune_skip is not None else (0 if tune_data else samples)
    rows, tuning_set = _evaluate(model, tune_data, tune_samples, candidates, max_new_tokens, skip)
    tuned = aggregate(rows)
    console.print(summary_table(tuned, f"tuning: {model}, {len(tuning_set)} questions"))
    if json_path:  # the tuning alone, in case the held-out run is cut short
        json_path.write_text(json.dumps({"model": model, "tuning": tuned}, indent=2))
    chosen = pick(tuned, limits)
    picked = list(dict.fromkeys(s["profile"] for s in chosen.values() if s is not None))
    held_out = _parse_profiles(",".join(picked)) + [p for p in references if str(p) not in picked]
    rows, dataset = _evaluate(model, data, samples, held_out, max_new_tokens)
    measured = aggregate(rows)
    console.print(summary_table(measured, f"held out: {model}, {len(dataset)} questions"))
    result = frontier_table(model, chosen, measured, {"questions": len(tuning_set), "data": str(tune_data or "embedded"),
                                                      "skip": skip, "summaries": tuned})
    result["baselines"] = [s for s in measured if s["profile"] not in picked]
    table = Table(title=f"frontier: {model}, picked on {len(tuning_set)} tuning questions, measured on {len(dataset)} others")
    for column in ("budget", "profile", "fidelity", "KL tf", "vs fp16", "n"):
        table.add_column(column, justify="left" if column == "profile" else "right")
    for r in result["frontier"]:
        if r["profile"] is None:
            table.add_row(f"{r['budget']:.4g}", "(no candidate fits)", "", "", "", "")
            continue
        table.add_row(f"{r['budget']:.4g}", r["profile"], f"{r['fidelity']:.3f} ± {r['fidelity_ci95']:.3f}",
                      f"{r['kl']:.4f}", f"{r['bytes_vs_fp16']:.4f}", str(r["n"]))
    console.print(table)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {json_path} and {plot_frontier(result, json_path.with_suffix('.png'))}")


@app.command("calibrate")
def calibrate(
    profiles: str = typer.Option("fp16,int8,int4:g32,int3,nf4,int4:g32+prerope+rot,q2c:0.75+int8,q2c:0.5+int8,"
                                 "q2c:0.5+int4:g32,q2c:0.25+int4:g32,q2c:0.25+int2,q2c:1+pca:b3:k2.5+tier:0.15:int8,"
                                 "pca:b1+protect:s4,q2c:1+pca:b0.5+tier:0.1:int4,pca:b1+protect:s4+pca:b2.5@13-24,"
                                 "pca:b0.65:w+text,pca:b1.05+pca:b1.9@13-24+text,pca:b2.8:w+text,pca:b5.5:w+text,"
                                 "pca:b0.8:w:e:i1+text,pca:b1.75:w:e:i1+text,pca:b3.1:w:e:i1+text,pca:b4.8:w:e+text,"
                                 "pca:b1.75:w:e:i1:f3+text,pca:b3.05:w:e:i1:f3+text,pca:b1.7:w:e:j:i1:f3+text,"
                                 "pca:b3.05:w:e:j:i1:f3+text",
                                 help="Profiles the planner may choose from."),
    samples: int = typer.Option(20, min=1),
    data: Optional[Path] = typer.Option(None, exists=True, dir_okay=False),
    out: Optional[Path] = typer.Option(None, help="Where to write the table or basis (default: the model's shipped one)."),
    model: str = ModelOption,
    basis: bool = typer.Option(False, "--basis", help="Fit the model's PCA basis (the pca stage) instead: one "
                               "prompt per paragraph of --data, skipping the paragraphs of --exclude."),
    metric: bool = typer.Option(False, "--metric", help="--basis: fit for the error attention sees (keys weighed by "
                                "the queries' energy per channel, values by the output projection), not the squared error."),
    weights: int = typer.Option(0, "--weights", min=0, help="--basis: then measure the layer weights of pca:bB:w (the "
                                "teacher-forced KL per unit of each layer's key and value error) on this many of the prompts."),
    joint: bool = typer.Option(False, "--joint", help="--basis: instead of fitting a basis, add to the model's shipped "
                               "one (which must hold layer weights) the joint transform of pca:bB:w:e:j, fitted on "
                               "the same paragraphs."),
    exclude: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                           help="--basis: a SQuAD file whose paragraphs are left out (default: the "
                                                "embedded subset, which eval and demo use)."),
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = DtypeOption,
) -> None:
    """Measure the rate-distortion table the planner (profile 'auto') chooses from, or fit the PCA basis."""
    use_device(device, dtype)
    import json

    if joint and not basis:
        raise typer.BadParameter("the joint transform is part of the PCA basis: add --basis", param_hint="--joint")
    if joint and (metric or weights):
        raise typer.BadParameter("--joint adds to the shipped basis and fits nothing else: drop --metric and --weights",
                                 param_hint="--joint")
    if basis:
        _fit_basis(model, data, exclude, samples, out, metric, weights, joint)
        return

    from channel.evaluation.harness import aggregate
    from channel.evaluation.report import summary_table
    from common.planner import calibration_path, table_from_summaries

    rows, dataset = _evaluate(model, data, samples, _parse_profiles(profiles))
    summaries = aggregate(rows)
    console.print(summary_table(summaries, f"calibration: {model}, {len(dataset)} questions"))
    target = out or calibration_path(model)
    target.write_text(json.dumps(table_from_summaries(model, summaries, len(dataset)), indent=2))
    console.print(f"wrote {target}")


def _fit_basis(model: str, data: Optional[Path], exclude: Optional[Path], samples: int, out: Optional[Path],
               metric: bool = False, weights: int = 0, joint: bool = False) -> None:
    from rich.progress import Progress

    from channel.evaluation.basis import fit_basis, fit_joint
    from channel.evaluation.squad import load_squad
    from common.models import basis_path, load_model

    loaded = load_model(model)
    skipped = {s.context for s in load_squad(exclude, answerable_only=False)}
    paragraphs = {s.context: s for s in load_squad(data, answerable_only=False) if s.context not in skipped}
    dataset = list(paragraphs.values())[:samples]
    if not dataset:
        raise typer.BadParameter("no paragraph of --data is left once --exclude's are skipped", param_hint="--data")
    target = out or basis_path(model)
    if joint:
        shipped = loaded.codec_context.basis
        if shipped is None or shipped.weights is None:
            raise typer.BadParameter(f"{model} has no shipped basis with layer weights to add a joint transform to; "
                                     "fit one with --basis --metric --weights N first", param_hint="--joint")
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("prefilling calibration prompts for the joint transform", total=len(dataset))
            fitted = fit_joint(loaded, shipped, dataset, target, progress=lambda: progress.advance(task))
        console.print(f"wrote {target}: basis {fitted.digest} (was {shipped.digest}) with a joint transform fitted on "
                      f"{fitted.metadata['joint_tokens']} tokens from {len(dataset)} paragraphs")
        return
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("prefilling calibration prompts (then measuring layer weights)",
                                 total=len(dataset) + min(weights, len(dataset)))
        fitted = fit_basis(loaded, dataset, target, progress=lambda: progress.advance(task), metric=metric,
                           weight_samples=weights)
    console.print(f"wrote {target}: basis {fitted.digest}, {fitted.num_layers} layers, "
                  f"{fitted.metadata['tokens']} tokens from {len(dataset)} paragraphs")


def _run_study(name: str, samples: int, data: Optional[Path], model: str, json_path: Optional[Path], **kwargs) -> None:
    import json

    from rich.progress import Progress

    from channel.evaluation import studies
    from channel.evaluation.report import summary_table
    from channel.evaluation.squad import load_squad
    from common.models import load_model

    loaded = load_model(model)
    dataset = load_squad(data, limit=samples)
    study = getattr(studies, name.replace("-", "_"))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(name, total=None)
        result = study(loaded, dataset, progress=lambda: progress.advance(task), **kwargs)
    if "summaries" in result:
        console.print(summary_table(result["summaries"], f"study {name}: {model}, {len(dataset)} questions"))
    console.print(f"[bold]{name}: the claim {result['verdict']}.[/bold] {result['evidence']}")
    if json_path:
        json_path.write_text(json.dumps({"study": name, "model": model, "samples": len(dataset), **result}, indent=2))


StudySamples = typer.Option(30, min=1, help="Answerable questions.")
StudyData = typer.Option(None, exists=True, dir_okay=False, help="A SQuAD-format file (default: the embedded subset).")


SQUAD_STUDIES = {
    "quant-cliff": "INT8/4/3/2/1: are INT8 and INT4 lossless, with a cliff below?",
    "svd-cliff": "SVD ranks 32/16/8/4: where does low rank break?",
    "selection": "Q2C, SnapKV, H2O and random at 25/50/75%: does Q2C > SnapKV > H2O > random at 50%?",
    "hybrid": "Selection + INT4 against either alone at matched bytes.",
}


def _register_squad_study(name: str, doc: str) -> None:
    def command(samples: int = StudySamples, data: Optional[Path] = StudyData,
                model: str = ModelOption,
                device: Optional[str] = DeviceOption,
                dtype: Optional[str] = DtypeOption,
                json_path: Optional[Path] = JsonOption()) -> None:
        use_device(device, dtype)
        _run_study(name.replace("-", "_"), samples, data, model, json_path)

    command.__doc__ = doc
    study_app.command(name)(command)


for _name, _doc in SQUAD_STUDIES.items():
    _register_squad_study(_name, _doc)


@study_app.command("truncation")
def study_truncation(
    samples: int = typer.Option(8, min=1, help="Haystack contexts (the needle at spread depths)."),
    tokens: int = typer.Option(2048, help="Context length."),
    sinks: int = typer.Option(0, help="Also keep this many first tokens (sink + recent)."),
    fit_up_to: int = typer.Option(128, help="Fit on windows up to this; judge the extrapolation beyond."),
    model: str = ModelOption,
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = DtypeOption,
    json_path: Optional[Path] = JsonOption(),
) -> None:
    """Next-token KL against window size: power law or exponential? Fitted exponent and extrapolation error."""
    use_device(device, dtype)
    import json

    from rich.progress import Progress

    from channel.evaluation import studies
    from channel.evaluation.haystack import needle_samples
    from common.models import load_model

    loaded = load_model(model)
    dataset = needle_samples(loaded.tokenizer, tokens, [i / max(1, samples - 1) for i in range(samples)])
    windows = tuple(w for w in (8, 16, 32, 64, 128, 256, 512, 1024, 1536) if w < tokens)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("contexts", total=len(dataset))
        result = studies.truncation(loaded, dataset, windows, fit_up_to, sinks, progress=lambda: progress.advance(task))
    console.print(f"[bold]truncation: the claim {result['verdict']}.[/bold] {result['evidence']}")
    if json_path:
        json_path.write_text(json.dumps({"study": "truncation", "model": model, "tokens": tokens, **result}, indent=2))


@study_app.command("layers")
def study_layers(
    samples: int = typer.Option(20, min=1),
    compress: str = typer.Option("q2c:0.25:layer", help="What compressing one layer means: a profile."),
    data: Optional[Path] = typer.Option(None, exists=True, dir_okay=False),
    model: str = ModelOption,
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = DtypeOption,
    write: bool = typer.Option(False, help="Save as the model's shipped sensitivities (used by the adaptive budget)."),
    json_path: Optional[Path] = JsonOption(),
) -> None:
    """Per-layer sensitivity: next-token KL when only that layer is compressed. Is there a layer-0 bottleneck?"""
    use_device(device, dtype)
    import json
    from importlib import resources

    from rich.progress import Progress
    from rich.table import Table

    from channel.evaluation.sensitivity import layer_sensitivity
    from channel.evaluation.squad import load_squad
    from common.models import load_model

    loaded = load_model(model)
    dataset = load_squad(data, limit=samples)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("samples", total=len(dataset))
        kl = layer_sensitivity(loaded, dataset, _parse_profiles(compress)[0], progress=lambda: progress.advance(task))
    table = Table(title=f"{model}: KL(full || layer l alone compressed with {compress}), {len(dataset)} questions")
    table.add_column("layer", justify="right")
    table.add_column("KL (nats)", justify="right")
    table.add_column("")
    top = max(kl)
    for layer, value in enumerate(kl):
        table.add_row(str(layer), f"{value:.4f}", "█" * max(1, round(30 * value / top)) if top > 0 else "")
    console.print(table)
    ranked = sorted(range(len(kl)), key=lambda i: -kl[i])
    others = sorted(kl[1:])[len(kl[1:]) // 2]
    verdict = "holds" if ranked[0] == 0 and kl[0] > 2 * others else "does not hold"
    console.print(f"most sensitive layers: {ranked[:5]}; layer 0 KL {kl[0]:.4f} vs median of the others {others:.4f}: "
                  f"the layer-0 bottleneck {verdict} here")
    result = {"model": model, "compress": compress, "samples": len(dataset), "sensitivity": kl, "ranked": ranked}
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
    if write:
        target = Path(str(resources.files("common") / "data" / f"layer-sensitivity-{model}.json"))
        target.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {target}")
