"""Benchmarks that print figures (never timed tests)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from channel.bench import CODEC_PROFILES
from channel.cli.app import bench_app, console


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
        out = subprocess.run([sys.executable, "-m", "channel.cli", "bench", "select-once", mode, str(length), "--model", model],
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

    from channel.bench import select_once

    print(json.dumps(select_once(mode, tokens, model)))


@bench_app.command("channel")
def bench_channel(
    rates: str = typer.Option("1mbit,20mbit,200mbit", help="Comma-separated rates."),
    seconds: float = typer.Option(2.0, help="Each transfer carries this many seconds of data at its rate."),
    json_path: Optional[Path] = typer.Option(None, "--json"),
) -> None:
    """Relay goodput against the configured rate, and the same transfer through Linux tc tbf."""
    import json

    from rich.table import Table

    from common.link import link_from_options, parse_rate
    from channel.netns import NetnsUnavailable, tbf_transfer_seconds
    from channel.relay import measure_goodput

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
    from common import fuzz
    from common.kvstate import prefill
    from common.models import load_model

    loaded = load_model(model)
    kv = prefill(loaded.model, list(range(300, 340)))
    seeds = fuzz.seed_transfers(kv, loaded.fingerprint)
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
    profiles: str = typer.Option(",".join(CODEC_PROFILES), help="Comma-separated profiles."),
    repeats: int = typer.Option(3, min=1),
    zstd_level: int = typer.Option(3, min=1, max=22, help="Level of the entropy stage."),
    json_path: Optional[Path] = typer.Option(None, "--json"),
    model: str = typer.Option("smollm2-135m", "--model"),
) -> None:
    """Encode/decode throughput of each codec, side by side with a plain copy, plus size and error."""
    import json

    import torch
    from rich.progress import Progress
    from rich.table import Table

    from channel.bench import bench_codecs, real_cache, rows_as_dicts, synthetic_cache

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
        rows, copy_mb_s = bench_codecs(kv, names, repeats, zstd_level, progress=lambda: progress.advance(task))
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


@bench_app.command("segments")
def bench_segments(
    tokens: int = typer.Option(1024, min=64, help="Needle-in-a-haystack contexts of this many tokens."),
    segment_tokens: int = typer.Option(256, min=16, help="Tokens per segment."),
    trials: int = typer.Option(12, min=1, help="Contexts (needle depths) x seeded link traces."),
    deadlines: str = typer.Option("2,4", help="Seconds from the first frame to the cache in place."),
    statics: str = typer.Option("int8,int4:g32", help="Whole-cache profiles to compare against."),
    trace: str = typer.Option("markov", help="Link trace (markov, step:A:B:T or a CSV), seeded per trial."),
    delay: str = typer.Option("10ms"),
    bandwidth: Optional[str] = typer.Option(None, help="The rate the first segment is planned with "
                                                       "(default: send it as a probe, the smallest cache)."),
    json_path: Optional[Path] = typer.Option(None, "--json"),
    model: str = typer.Option("smollm2-135m", "--model"),
) -> None:
    """Segmented (adaptive) against whole-cache transfers over real gRPC through the shaping relay:
    deadline hit rate and quality (F1 against the full-prompt answer, 0 when late)."""
    import json

    from rich.progress import Progress
    from rich.table import Table

    from common.link import parse_rate
    from channel.cli.app import _parse_profiles
    from channel.evaluation.haystack import needle_samples
    from channel.evaluation.segment_trials import run_trials, summarize
    from common.models import load_model
    from channel.nodes import local_receiver

    names = _parse_profiles(statics)
    limits = [float(d) for d in deadlines.split(",")]
    loaded = load_model(model)
    samples = needle_samples(loaded.tokenizer, tokens, [i / max(1, trials - 1) for i in range(trials)])
    with local_receiver(model, quiet=True) as target, Progress(console=console) as progress:
        task = progress.add_task("transfers", total=trials * len(limits) * (len(names) + 1))
        rows = run_trials(loaded, target, samples, names, limits, trials, segment_tokens, trace, delay,
                          parse_rate(bandwidth) if bandwidth else None, progress=lambda: progress.advance(task))
    summary = summarize(rows)
    table = Table(title=f"{trials} trials of {tokens}-token contexts on {trace} links ({delay} delay), "
                        f"segments of {segment_tokens} tokens")
    for column in ("deadline s", "method", "hit rate", "mean quality", "MB sent", "sent as"):
        table.add_column(column, justify="right")
    for row in summary:
        table.add_row(f"{row['deadline_s']:g}", row["method"], f"{row['hit_rate']:.0%}", f"{row['mean_quality']:.3f}",
                      f"{row['bytes_mean'] / 1e6:.2f}", ", ".join(f"{k} {v:.0%}" for k, v in row["sent_as"].items()))
    console.print(table)
    if json_path:
        json_path.write_text(json.dumps({"tokens": tokens, "segment_tokens": segment_tokens, "trace": trace,
                                         "delay": delay, "summary": summary, "trials": rows}, indent=2))
