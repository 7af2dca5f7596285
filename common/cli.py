"""The `kvwire` command line."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local packages; never wait on the hub

app = typer.Typer(help="Send an LLM's KV cache between machines, and measure what each byte buys.", no_args_is_help=True)
receiver_app = typer.Typer(help="The receiving node.", no_args_is_help=True)
sender_app = typer.Typer(help="The sending node.", no_args_is_help=True)
app.add_typer(receiver_app, name="receiver")
app.add_typer(sender_app, name="sender")
bench_app = typer.Typer(help="Benchmarks that print figures.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
study_app = typer.Typer(help="Reproduce the research claims kvwire starts from, with a verdict.", no_args_is_help=True)
app.add_typer(study_app, name="study")
console = Console(width=None if sys.stdout.isatty() else 160)  # wide tables in logs and CI

ModelOption = typer.Option(None, "--model", help="smollm2-135m (default), gemma3-270m, tiny-llama, tiny-gemma3, a HF id or a directory.")


@receiver_app.command("serve")
def receiver_serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind (gRPC and HTTP)."),
    port: int = typer.Option(50051, help="gRPC port."),
    http_port: int = typer.Option(8080, help="HTTP port (health, metrics, sessions, dashboard); 0 for none."),
    model: Optional[str] = ModelOption,
) -> None:
    """Serve the KVWire gRPC service (health, reflection) and its HTTP side in one process."""
    from common.settings import get_settings
    from receiver.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = get_settings()
    if not http_port:
        asyncio.run(serve(host, port, model))
        return
    import uvicorn

    from receiver.http import create_app

    uvicorn.run(create_app(settings, host, port, model), host=host, port=http_port, log_level="info",
                ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
                ssl_keyfile=str(settings.tls_key) if settings.tls_key else None)


@receiver_app.command("health")
def receiver_health(target: str = typer.Option("127.0.0.1:50051", help="Receiver host:port."),
                    wait: float = typer.Option(0.0, help="Keep trying this many seconds.")) -> None:
    """Exit 0 when the receiver's gRPC health service says SERVING (for container healthchecks)."""
    from common.settings import get_settings
    from sender.client import Client

    with Client.from_settings(get_settings(), target) as client:
        try:
            client.wait_until_serving(timeout_s=max(wait, 0.1))
        except TimeoutError as exc:
            console.print(str(exc))
            raise typer.Exit(1) from None
    console.print(f"{target} SERVING")


@sender_app.command("serve")
def sender_serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8081, help="HTTP port."),
    target: Optional[str] = typer.Option(None, help="Receiver host:port (default: KVWIRE_RECEIVER_TARGET)."),
    model: Optional[str] = ModelOption,
) -> None:
    """The sender's HTTP API: POST /v1/ask, /metrics, OpenAPI docs at /docs."""
    import uvicorn

    from common.settings import get_settings
    from sender.http import create_app

    settings = get_settings(**({"receiver_target": target} if target else {}))
    uvicorn.run(create_app(settings, model), host=host, port=port, log_level="info",
                ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
                ssl_keyfile=str(settings.tls_key) if settings.tls_key else None)


@sender_app.command("ask")
def sender_ask(
    question: str = typer.Option(..., help="The question."),
    context: Optional[str] = typer.Option(None, help="The context text."),
    context_file: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="Read the context from a file."),
    target: str = typer.Option("127.0.0.1:50051", help="Receiver host:port."),
    profile: str = typer.Option("raw", help="Compression profile."),
    query_agnostic: bool = typer.Option(False, help="Send only the context as KV; the question travels as text."),
    max_new_tokens: int = typer.Option(64, min=1, max=512),
    model: Optional[str] = ModelOption,
) -> None:
    """Prefill a context, stream its KV cache to a receiver and print the answer."""
    from common.models import load_model
    from common.settings import get_settings
    from sender.client import Client
    from sender.prefill import prefill_prompt, select_tokens

    if (context is None) == (context_file is None):
        raise typer.BadParameter("give exactly one of --context and --context-file")
    text = context if context is not None else context_file.read_text()
    loaded = load_model(model)
    with Client.from_settings(get_settings(), target) as client:
        agreed = client.negotiate(loaded.fingerprint, [profile]).profile
        pre = prefill_prompt(loaded, text, question, not query_agnostic, [agreed])
        sent = client.transfer(select_tokens(loaded, pre, agreed), agreed, loaded.fingerprint)
        if query_agnostic:
            reply = client.generate(sent.session_id, question=question, max_new_tokens=max_new_tokens)
        else:
            reply = client.generate(sent.session_id, token_ids=pre.tail_ids, max_new_tokens=max_new_tokens)
    console.print(f"[bold]{reply.text}[/bold]")
    console.print(f"{sent.bytes_sent:,} bytes in {sent.frames} frames for {pre.kv.seq_len} tokens; "
                  f"prefill {pre.seconds:.2f} s, transfer {sent.seconds:.2f} s, decode {reply.decode_seconds:.2f} s")


@app.command()
def demo(
    samples: int = typer.Option(20, min=1, help="Number of answerable questions."),
    data: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="A SQuAD-format JSON file (default: the embedded subset)."),
    profiles: str = typer.Option("raw,int8,int4:g32,q2c:0.5+int4:g32",
                                 help="Comma-separated profiles; the first gets the per-question table."),
    rate: str = typer.Option("50mbit", help="Rate of the emulated link every transfer crosses (the relay); 'none' for plain loopback."),
    delay: str = typer.Option("10ms", help="One-way delay of the emulated link."),
    query_agnostic: bool = typer.Option(False, help="Send only the context as KV; the question travels as text."),
    max_new_tokens: int = typer.Option(32, min=1, max=512),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON."),
    plot_path: Optional[Path] = typer.Option(Path("kvwire-demo.png"), "--plot", help="Accuracy against bytes and time (PNG)."),
    target: Optional[str] = typer.Option(None, help="Use this running receiver (or relay) instead of starting one."),
    model: str = typer.Option("smollm2-135m", "--model"),
) -> None:
    """Run a receiver on loopback behind an emulated link; send SQuAD questions under several profiles."""
    from common.channel import link_from_options
    from common.evaluation.squad import load_squad
    from sender.demo import report, run_demo

    names = _parse_profiles(profiles)
    link_factory, link = None, "plain loopback"
    if target:
        link = f"the network to {target}"
    elif rate != "none":
        try:
            link_from_options(rate, delay=delay)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        link_factory, link = (lambda: link_from_options(rate, delay=delay)), f"a {rate} link with {delay} delay"
    rows = run_demo(load_squad(data, limit=samples), model, names, not query_agnostic, max_new_tokens, console,
                    link_factory, target)
    report(rows, console, json_path, plot_path, link)


LinkOptions = dict(
    rate=typer.Option("100mbit", envvar="KVWIRE_CHANNEL_RATE", help="Link rate, e.g. 20mbit (constant trace)."),
    trace=typer.Option("constant", help="constant, markov, step:RATE1:RATE2:AT (e.g. step:100mbit:10mbit:1s) or a CSV of time,rate."),
    delay=typer.Option("0ms", envvar="KVWIRE_CHANNEL_DELAY", help="One-way delay."),
    jitter=typer.Option("0ms", help="Extra delay, uniform in [0, jitter]."),
    stall_rate=typer.Option(0.0, help="Stalls (retransmission timeouts) per second of transmission."),
    stall=typer.Option("200ms", help="Length of one stall."),
    seed=typer.Option(0, help="Seed for the Markov trace, jitter and stalls."),
)


DEFAULT_SWEEP_PROFILES = ("fp16,int8,int4:g32,int3,int2,nf4,svd:r32+int8,q2c:0.75+fp16,q2c:0.5+fp16,q2c:0.25+fp16,"
                          "snapkv:0.5+fp16,h2o:0.5+fp16,random:0.5+fp16,q2c:0.75+int4:g32,q2c:0.5+int4:g32,"
                          "q2c:0.25+int4:g32,q2c:0.5+int8,snapkv:0.5+int4:g32")


@app.command("sweep")
def sweep(
    profiles: str = typer.Option(DEFAULT_SWEEP_PROFILES, help="Comma-separated profiles."),
    bandwidths: str = typer.Option("1mbit,2mbit,5mbit,10mbit,20mbit,50mbit,100mbit,200mbit,500mbit,1gbit",
                                   help="Constant-rate links."),
    traces: str = typer.Option("markov,step:100mbit:10mbit:0.5s", help="Varying links (comma-separated; empty for none)."),
    delay: str = typer.Option("10ms", help="One-way delay on every link."),
    samples: int = typer.Option(20, min=1),
    data: Optional[Path] = typer.Option(None, exists=True, dir_okay=False),
    out: Path = typer.Option(Path("results/sweep.jsonl"), help="JSONL of points; rerunning skips what is there."),
    report_dir: Path = typer.Option(Path("results/sweep"), help="Plots, summary JSON and the HTML report."),
    max_new_tokens: int = typer.Option(24, min=1, max=512),
    workers: int = typer.Option(1, min=1, help="Local processes for the model work."),
    runner: str = typer.Option("local", help="local, or ray (optional extra)."),
    validate: int = typer.Option(0, min=0, help="Re-run this many constant-rate points through real gRPC and the relay."),
    haystack: int = typer.Option(0, min=0, help="Use needle-in-a-haystack contexts of this many tokens instead of SQuAD."),
    model: str = typer.Option("smollm2-135m", "--model"),
) -> None:
    """Grid of profiles x links x samples: accuracy vs bytes, time to first token vs bandwidth, Pareto front."""
    import json

    from rich.progress import Progress
    from rich.table import Table

    from common.evaluation import sweep as sweep_module
    from common.evaluation.report import html_report, plot_sweep
    from common.evaluation.squad import load_squad

    if runner not in ("local", "ray"):
        raise typer.BadParameter("runner is local or ray", param_hint="--runner")
    names = _parse_profiles(profiles)
    links = sweep_module.link_specs([b for b in bandwidths.split(",") if b], [t for t in traces.split(",") if t], delay)
    try:
        for spec in links:
            link_from_options_checked(spec)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if haystack:
        from common.evaluation.haystack import needle_samples
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
        computed = sweep_module.run_sweep(model, dataset, names, links, out, max_new_tokens, workers, runner,
                                          progress=lambda n: progress.advance(task, n))
    console.print(f"{computed} (sample, profile) pairs computed, {already} already in {out}")
    ids = {s.id for s in dataset}
    points = [p for p in map(json.loads, out.read_text().splitlines()) if p["sample_id"] in ids and p["profile"] in names]
    summaries = sweep_module.summarize(points)
    plots = plot_sweep(summaries, report_dir)
    best = [b for b in (sweep_module.best_at(summaries, rate) for rate in ("5mbit", "20mbit", "100mbit")) if b]
    table = Table(title="best profile per bandwidth: the most faithful whose modeled transfer fits 1 s")
    for column in ("rate", "profile", "fidelity F1", "F1 gold", "bytes", "link s", "TTFT s", "text TTFT s"):
        table.add_column(column, justify="right")
    for b in best:
        table.add_row(b["rate"], b["profile"], f"{b['fidelity_f1']:.3f}", f"{b['f1_gold']:.3f}", f"{b['bytes_mean']:,.0f}",
                      f"{b['link_s']:.3f}", f"{b['ttft_s']:.2f}", f"{b['text_ttft_s']:.2f}")
    console.print(table)
    front = sweep_module.pareto_front(summaries)
    console.print(f"Pareto front (bytes vs fidelity): {', '.join(front)}")
    validation = []
    if validate:
        from common.evaluation.validate import validate as run_validation

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
    report = {"model": model, "samples": len(dataset), "profiles": names, "links": links, "summaries": summaries,
              "best": best, "pareto": front, "validation": validation}
    (report_dir / "summary.json").write_text(json.dumps(report, indent=2))
    html_report(summaries, plots, best, report_dir / "report.html", f"kvwire sweep: {model}, {len(dataset)} questions")
    console.print(f"wrote {report_dir}/summary.json, report.html and {len(plots)} plots")


def link_from_options_checked(spec: dict) -> None:
    from common.channel import link_from_options

    link_from_options(spec["rate"] or None, spec["trace"], spec["delay"])


@app.command("channel")
def channel(
    listen: str = typer.Option("127.0.0.1:50052", help="Address the relay accepts connections on."),
    upstream: str = typer.Option("127.0.0.1:50051", help="The receiver's address."),
    rate: str = LinkOptions["rate"], trace: str = LinkOptions["trace"], delay: str = LinkOptions["delay"],
    jitter: str = LinkOptions["jitter"], stall_rate: float = LinkOptions["stall_rate"], stall: str = LinkOptions["stall"],
    seed: int = LinkOptions["seed"],
    corrupt_per_mb: float = typer.Option(0.0, help="Fault injection: flip a random bit this often per MB sent upstream."),
) -> None:
    """A TCP relay that shapes the real bytes of the gRPC connection (rate, delay, jitter, stalls)."""
    from common.channel import link_from_options
    from common.relay import run_relay

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        link_from_options(rate, trace, delay, jitter, stall_rate, stall, seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    asyncio.run(run_relay(listen, upstream, lambda: link_from_options(rate, trace, delay, jitter, stall_rate, stall, seed),
                          corrupt_per_mb))


@app.command("eval")
def eval_command(
    profiles: str = typer.Option("fp16,int8,int4:g32,q2c:0.5", help="Comma-separated profiles."),
    samples: int = typer.Option(20, min=1, help="Answerable questions to use."),
    data: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="A SQuAD-format JSON file (default: the embedded subset)."),
    max_new_tokens: int = typer.Option(24, min=1, max=512),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write per-profile summaries and per-sample rows."),
    model: str = typer.Option("smollm2-135m", "--model"),
) -> None:
    """Accuracy against bytes: F1 vs gold, fidelity vs full KV, first-token KL, bytes per profile."""
    import json

    from rich.progress import Progress

    from common.evaluation.harness import aggregate, evaluate, rows_as_dicts
    from common.evaluation.report import summary_table
    from common.evaluation.squad import load_squad
    from common.models import load_model

    names = _parse_profiles(profiles)
    loaded = load_model(model)
    dataset = load_squad(data, limit=samples)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("samples x profiles", total=len(dataset) * len(names))
        rows = evaluate(loaded, dataset, names, max_new_tokens, progress=lambda: progress.advance(task))
    summaries = aggregate(rows)
    console.print(summary_table(summaries, f"{model}: {len(dataset)} questions, fidelity against the full-KV answer"))
    if json_path:
        json_path.write_text(json.dumps({"model": model, "profiles": summaries, "samples": rows_as_dicts(rows)}, indent=2))
        console.print(f"wrote {json_path}")


def _parse_profiles(text: str) -> list[str]:
    from common.profile import ProfileError, parse_profile

    names = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [str(parse_profile(name)) for name in names]
    except ProfileError as exc:
        raise typer.BadParameter(str(exc), param_hint="--profiles") from None


@bench_app.command("select")
def bench_select(
    tokens: int = typer.Option(8192, help="Context length for kvwire's O(T) statistics."),
    eager_tokens: int = typer.Option(2048, help="Context length for the naive output_attentions=True run."),
    model: str = typer.Option("smollm2-135m", "--model"),
    json_path: Optional[Path] = typer.Option(None, "--json"),
) -> None:
    """Prefill + Q2C/SnapKV selection: time and peak memory, O(T) statistics against eager attention maps."""
    import json
    import subprocess

    from rich.table import Table

    results = []
    for mode, length in (("kvwire", tokens), ("eager", eager_tokens)):
        console.print(f"running {mode} at {length} tokens in a fresh process…")
        out = subprocess.run([sys.executable, "-m", "common.cli", "bench", "select-once", mode, str(length), "--model", model],
                             capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    table = Table(title="prefill + selection scores (Q2C and SnapKV) on the CPU")
    for column in ("attention statistics", "tokens", "seconds", "peak RSS GiB", "of which model GiB"):
        table.add_column(column, justify="left" if column == "attention statistics" else "right")
    for r in results:
        label = "kvwire O(T) rows" if r["mode"] == "kvwire" else "eager output_attentions=True"
        table.add_row(label, str(r["tokens"]), f"{r['seconds']:.1f}", f"{r['peak_rss_gib']:.2f}", f"{r['model_rss_gib']:.2f}")
    console.print(table)
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))


@bench_app.command("select-once", hidden=True)
def bench_select_once(mode: str, tokens: int, model: str = typer.Option("smollm2-135m", "--model")) -> None:
    import json

    from common.bench import select_once

    print(json.dumps(select_once(mode, tokens, model)))


def _run_study(name: str, samples: int, data: Optional[Path], model: str, json_path: Optional[Path], **kwargs) -> None:
    import json

    from rich.progress import Progress

    from common.evaluation import studies
    from common.evaluation.report import summary_table
    from common.evaluation.squad import load_squad
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


@study_app.command("quant-cliff")
def study_quant_cliff(samples: int = StudySamples, data: Optional[Path] = StudyData,
                      model: str = typer.Option("smollm2-135m", "--model"),
                      json_path: Optional[Path] = typer.Option(None, "--json")) -> None:
    """INT8/4/3/2/1: are INT8 and INT4 lossless, with a cliff below?"""
    _run_study("quant_cliff", samples, data, model, json_path)


@study_app.command("svd-cliff")
def study_svd_cliff(samples: int = StudySamples, data: Optional[Path] = StudyData,
                    model: str = typer.Option("smollm2-135m", "--model"),
                    json_path: Optional[Path] = typer.Option(None, "--json")) -> None:
    """SVD ranks 32/16/8/4: where does low rank break?"""
    _run_study("svd_cliff", samples, data, model, json_path)


@study_app.command("selection")
def study_selection(samples: int = StudySamples, data: Optional[Path] = StudyData,
                    model: str = typer.Option("smollm2-135m", "--model"),
                    json_path: Optional[Path] = typer.Option(None, "--json")) -> None:
    """Q2C, SnapKV, H2O and random at 25/50/75%: does Q2C > SnapKV > H2O > random at 50%?"""
    _run_study("selection", samples, data, model, json_path)


@study_app.command("hybrid")
def study_hybrid(samples: int = StudySamples, data: Optional[Path] = StudyData,
                 model: str = typer.Option("smollm2-135m", "--model"),
                 json_path: Optional[Path] = typer.Option(None, "--json")) -> None:
    """Selection + INT4 against either alone at matched bytes."""
    _run_study("hybrid", samples, data, model, json_path)


@study_app.command("truncation")
def study_truncation(
    samples: int = typer.Option(8, min=1, help="Haystack contexts (the needle at spread depths)."),
    tokens: int = typer.Option(2048, help="Context length."),
    sinks: int = typer.Option(0, help="Also keep this many first tokens (sink + recent)."),
    fit_up_to: int = typer.Option(128, help="Fit on windows up to this; judge the extrapolation beyond."),
    model: str = typer.Option("smollm2-135m", "--model"),
    json_path: Optional[Path] = typer.Option(None, "--json"),
) -> None:
    """Next-token KL against window size: power law or exponential? Fitted exponent and extrapolation error."""
    import json

    from rich.progress import Progress

    from common.evaluation import studies
    from common.evaluation.haystack import needle_samples
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


@app.command("loadtest")
def loadtest(
    concurrency: int = typer.Option(16, min=1),
    transfers: int = typer.Option(200, min=1),
    profile: str = typer.Option("raw"),
    rate: Optional[str] = typer.Option(None, help="Put every transfer through the shaping relay at this rate."),
    samples: int = typer.Option(8, min=1, help="Distinct contexts, cycled."),
    max_new_tokens: int = typer.Option(4, min=1, max=512),
    budget: str = typer.Option("1gib", help="The receiver's session byte budget (e.g. 512mib, 1gib)."),
    target: Optional[str] = typer.Option(None, help="Load this running receiver instead of starting one."),
    json_path: Optional[Path] = typer.Option(None, "--json"),
    model: str = typer.Option("smollm2-135m", "--model"),
) -> None:
    """N concurrent senders against one receiver: throughput, latency percentiles, errors, peak memory;
    every answer is checked against the one the same profile gives in process."""
    import json

    from rich.progress import Progress

    from common.channel import link_from_options
    from common.relay import BackgroundRelay
    from sender import loadtest as lt

    names = _parse_profiles(profile)
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30}
    match = re.fullmatch(r"(\d+)(kib|mib|gib)", budget.lower())
    if not match:
        raise typer.BadParameter("budget like 512mib or 1gib", param_hint="--budget")
    _, prepared = lt.prepare(model, names[0], samples, max_new_tokens)
    process = None
    if target is None:
        process, target = lt.start_receiver(model, int(match.group(1)) * units[match.group(2)])
    try:
        relay = BackgroundRelay(target, lambda: link_from_options(rate)) if rate else None
        with Progress(console=console) as progress:
            task = progress.add_task("transfers", total=transfers)
            report = lt.run_load(relay.target if relay else target, prepared, concurrency, transfers, max_new_tokens,
                                 progress=lambda: progress.advance(task))
        if relay:
            relay.close()
        if process:
            report.receiver_peak_rss = lt.peak_rss(process.pid)
    finally:
        if process:
            process.terminate()
            process.wait(timeout=30)
    summary = report.summary()
    console.print(
        f"{summary['transfers']} transfers of {names[0]} at concurrency {concurrency}{f' over {rate}' if rate else ''}: "
        f"{summary['ok']} answers right, {summary['wrong_answers']} wrong, {summary['lost']} lost; errors {summary['errors']}; "
        f"retries {summary['retries']}\n{summary['transfers_per_s']:.2f} transfers/s, {summary['mb_per_s']:.1f} MB/s; latency "
        f"p50 {summary['p50_s']:.3f} s, p95 {summary['p95_s']:.3f} s, p99 {summary['p99_s']:.3f} s; receiver peak RSS "
        f"{summary['receiver_peak_rss_mib'] or float('nan'):.0f} MiB")
    if json_path:
        json_path.write_text(json.dumps({"profile": names[0], "concurrency": concurrency, "rate": rate, **summary}, indent=2))
    if summary["wrong_answers"] or summary["lost"]:
        raise typer.Exit(1)


@app.command("calibrate")
def calibrate(
    profiles: str = typer.Option("fp16,int8,int4:g32,int3,nf4,q2c:0.75+int8,q2c:0.5+int8,q2c:0.5+int4:g32,"
                                 "q2c:0.25+int4:g32,q2c:0.25+int2", help="Profiles the planner may choose from."),
    samples: int = typer.Option(20, min=1),
    data: Optional[Path] = typer.Option(None, exists=True, dir_okay=False),
    out: Optional[Path] = typer.Option(None, help="Where to write the table (default: the model's shipped table)."),
    model: str = typer.Option("smollm2-135m", "--model"),
) -> None:
    """Measure the rate-distortion table the planner (profile 'auto') chooses from."""
    import json

    from rich.progress import Progress

    from common.evaluation.harness import aggregate, evaluate
    from common.evaluation.report import summary_table
    from common.evaluation.squad import load_squad
    from common.models import load_model
    from common.planner import calibration_path, table_from_summaries

    names = _parse_profiles(profiles)
    loaded = load_model(model)
    dataset = load_squad(data, limit=samples)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("samples x profiles", total=len(dataset) * len(names))
        summaries = aggregate(evaluate(loaded, dataset, names, progress=lambda: progress.advance(task)))
    console.print(summary_table(summaries, f"calibration: {model}, {len(dataset)} questions"))
    target = out or calibration_path(model)
    target.write_text(json.dumps(table_from_summaries(model, summaries, len(dataset)), indent=2))
    console.print(f"wrote {target}")


@app.command("prepare")
def prepare(model: str = typer.Option("smollm2-135m", "--model")) -> None:
    """Convert and cache a model's weights now (a Docker build step), and print its fingerprint."""
    from common.models import load_model

    loaded = load_model(model)
    console.print(f"{model}: ready in {loaded.load_seconds:.1f} s; weights sha256 {loaded.fingerprint.weights_sha256}")


@study_app.command("layers")
def study_layers(
    samples: int = typer.Option(20, min=1),
    compress: str = typer.Option("q2c:0.25:layer", help="What compressing one layer means: a profile."),
    data: Optional[Path] = typer.Option(None, exists=True, dir_okay=False),
    model: str = typer.Option("smollm2-135m", "--model"),
    write: bool = typer.Option(False, help="Save as the model's shipped sensitivities (used by the adaptive budget)."),
    json_path: Optional[Path] = typer.Option(None, "--json"),
) -> None:
    """Per-layer sensitivity: next-token KL when only that layer is compressed. Is there a layer-0 bottleneck?"""
    import json
    from importlib import resources

    from rich.progress import Progress
    from rich.table import Table

    from common.evaluation.sensitivity import layer_sensitivity
    from common.evaluation.squad import load_squad
    from common.models import load_model

    loaded = load_model(model)
    dataset = load_squad(data, limit=samples)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("samples", total=len(dataset))
        kl = layer_sensitivity(loaded, dataset, compress, progress=lambda: progress.advance(task))
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


@bench_app.command("channel")
def bench_channel(
    rates: str = typer.Option("1mbit,20mbit,200mbit", help="Comma-separated rates."),
    seconds: float = typer.Option(2.0, help="Each transfer carries this many seconds of data at its rate."),
    json_path: Optional[Path] = typer.Option(None, "--json"),
) -> None:
    """Relay goodput against the configured rate, and the same transfer through Linux tc tbf."""
    import json

    from rich.table import Table

    from common.channel import link_from_options, parse_rate
    from common.netns import NetnsUnavailable, tbf_transfer_seconds
    from common.relay import measure_goodput

    table = Table(title="kvwire channel relay: goodput at the receiver vs configured rate (loopback)")
    for column in ("rate", "bytes", "relay s", "relay goodput / rate", "tc tbf s", "tbf goodput / rate", "relay s / tbf s"):
        table.add_column(column, justify="right")
    rows = []
    for rate in [r.strip() for r in rates.split(",") if r.strip()]:
        bits = parse_rate(rate)
        nbytes = int(bits / 8 * seconds)
        goodput = asyncio.run(measure_goodput(link_from_options(rate=rate), nbytes))
        relay_s = nbytes * 8 / goodput
        try:
            tbf_s = tbf_transfer_seconds(rate, nbytes)
        except NetnsUnavailable as exc:
            console.print(f"tc tbf reference skipped: {exc}")
            tbf_s = None
        rows.append({"rate": rate, "bytes": nbytes, "relay_s": relay_s, "relay_ratio": goodput / bits,
                     "tbf_s": tbf_s, "tbf_ratio": None if tbf_s is None else nbytes * 8 / tbf_s / bits})
        table.add_row(rate, f"{nbytes:,}", f"{relay_s:.3f}", f"{goodput / bits:.3f}",
                      "-" if tbf_s is None else f"{tbf_s:.3f}", "-" if tbf_s is None else f"{rows[-1]['tbf_ratio']:.3f}",
                      "-" if tbf_s is None else f"{relay_s / tbf_s:.3f}")
    console.print(table)
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2))


@bench_app.command("fuzz")
def bench_fuzz(
    inputs: int = typer.Option(100_000, min=1, help="How many fuzz inputs."),
    seed: int = typer.Option(0),
    model: str = typer.Option("tiny-llama", "--model"),
) -> None:
    """Fuzz the frame decoder and header validator; print inputs tried, outcomes and crashes."""
    from common import fuzz, wire
    from common.kvstate import prefill
    from common.models import load_model

    loaded = load_model(model)
    kv = prefill(loaded.model, list(range(300, 340)))
    seeds = [list(wire.encode(kv, p, loaded.fingerprint)) for p in ("raw", "int4:g32", "nf4", "svd:r4+int8", "int2+int8@0")]
    start = time.perf_counter()
    report = fuzz.run(loaded.fingerprint, seeds, structured=inputs * 3 // 4, random_bytes=inputs - inputs * 3 // 4, seed=seed)
    console.print(f"{report.inputs:,} fuzz inputs in {time.perf_counter() - start:.0f} s: {report.accepted:,} accepted, "
                  f"rejected {dict(sorted(report.rejected.items()))}, crashes {len(report.crashes)}")
    for crash in report.crashes[:20]:
        console.print(f"  crash: {crash}")
    if report.crashes:
        raise typer.Exit(1)


@bench_app.command("codec")
def bench_codec(
    tokens: int = typer.Option(1024, min=16, help="Context length of the cache."),
    device: str = typer.Option("cpu", help="cpu: a real SmolLM2 cache; cuda: synthetic tensors of the same shape on the GPU."),
    profiles: str = typer.Option(",".join(__import__("common.bench", fromlist=["x"]).CODEC_PROFILES), help="Comma-separated profiles."),
    repeats: int = typer.Option(3, min=1),
    json_path: Optional[Path] = typer.Option(None, "--json"),
    model: str = typer.Option("smollm2-135m", "--model"),
) -> None:
    """Encode/decode throughput of each codec, side by side with a plain copy, plus size and error."""
    import json

    import torch
    from rich.progress import Progress
    from rich.table import Table

    from common.bench import bench_codecs, real_cache, rows_as_dicts, synthetic_cache

    torch.set_num_threads(torch.get_num_threads())
    if device == "cpu":
        kv = real_cache(model, tokens)
        source = f"{model} cache of {tokens} tokens (CPU, {torch.get_num_threads()} threads)"
    else:
        kv = synthetic_cache(30, 3, tokens, 64, device)
        source = f"synthetic SmolLM2-shaped cache of {tokens} tokens on {torch.cuda.get_device_name(device)}"
    names = [p for p in profiles.split(",") if p]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("codecs", total=len(names))
        rows, copy_mb_s = bench_codecs(kv, names, repeats, progress=lambda: progress.advance(task))
    table = Table(title=f"codec benchmark: {source}; copy {copy_mb_s:,.0f} MB/s")
    for column in ("profile", "enc MB/s", "dec MB/s", "enc/copy", "dec/copy", "bytes/fp16", "+zstd", "bits/elem",
                   "entropy bound", "rel err K", "rel err V"):
        table.add_column(column, justify="left" if column == "profile" else "right")
    for r in rows:
        entropy = "-" if r.entropy_bits_per_element is None else f"{r.entropy_bits_per_element:.2f}"
        table.add_row(r.profile, f"{r.encode_mb_s:,.0f}", f"{r.decode_mb_s:,.0f}", f"{r.encode_vs_copy:.4f}",
                      f"{r.decode_vs_copy:.4f}", f"{r.bandwidth_fraction:.3f}", f"{r.zstd_fraction:.3f}",
                      f"{r.bits_per_element:.2f}", entropy, f"{r.rel_error_keys:.3f}", f"{r.rel_error_values:.3f}")
    console.print(table)
    if json_path:
        json_path.write_text(json.dumps({"source": source, "copy_mb_s": copy_mb_s, "rows": rows_as_dicts(rows)}, indent=2))


if __name__ == "__main__":
    app()
