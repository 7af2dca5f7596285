"""Benchmarks that print figures (never timed tests)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from channel.cli.app import JsonOption, ModelOption, _parse_profiles, bench_app, console


@bench_app.command("select")
def bench_select(
    tokens: int = typer.Option(8192, help="Context length for kvwire's O(T) statistics."),
    eager_tokens: int = typer.Option(2048, help="Context length for the naive output_attentions=True run."),
    model: str = ModelOption,
    json_path: Optional[Path] = JsonOption(),
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
def bench_select_once(mode: str, tokens: int, model: str = ModelOption) -> None:
    import json

    from channel.bench import select_once

    print(json.dumps(select_once(mode, tokens, model)))


@bench_app.command("channel")
def bench_channel(
    rates: str = typer.Option("1mbit,20mbit,200mbit", help="Comma-separated rates."),
    seconds: float = typer.Option(2.0, help="Each transfer carries this many seconds of data at its rate."),
    json_path: Optional[Path] = JsonOption(),
) -> None:
    """Relay goodput against the configured rate, and the same transfer through Linux tc tbf."""
    import json

    from rich.table import Table

    from channel.netns import NetnsUnavailable, tbf_transfer_seconds
    from channel.relay import measure_goodput
    from common.link import link_from_options, parse_rate

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
    over_grpc: bool = typer.Option(False, "--grpc", help="Stream every input to an in-process receiver over real "
                                   "gRPC and count the status codes its client gets (slower)."),
    memory_gb: float = typer.Option(8.0, help="Address-space limit of this process: an allocation past it fails "
                                    "(and is counted) instead of swapping the machine."),
) -> None:
    """Fuzz the receiver's frame path with mutated transfers, transfers under profiles drawn from the grammar,
    and arbitrary bytes; print the outcomes by status, crashes, UNKNOWN and INTERNAL (any of those three exits 1)."""
    import contextlib
    import resource

    import torch

    from common import fuzz, wire
    from common.kvstate import prefill
    from common.models import load_model

    resource.setrlimit(resource.RLIMIT_AS, (int(memory_gb * 2**30), resource.getrlimit(resource.RLIMIT_AS)[1]))
    torch.set_num_threads(1)  # tensors of a few kilobytes: more threads only contend on a shared machine
    loaded = load_model(model)
    kv = prefill(loaded.model, list(range(300, 340)))
    seeds = fuzz.seed_transfers(kv, loaded.fingerprint)
    structured, grammar = inputs * 45 // 100, inputs * 35 // 100
    with _grpc_fuzz_target(model) if over_grpc else contextlib.nullcontext() as send:
        start = time.perf_counter()
        report = fuzz.run(loaded.fingerprint, seeds, structured, inputs - structured - grammar, seed, grammar=grammar,
                          kv=kv, send=send, sliding_windows=wire.sliding_windows(loaded.config))
    console.print(f"{'over gRPC' if over_grpc else 'in process'} ({model}, seed {seed}), "
                  f"{time.perf_counter() - start:.0f} s: {structured:,} mutated, {grammar:,} grammar, "
                  f"{inputs - structured - grammar:,} random-byte inputs")
    console.print(report.summary(), markup=False, soft_wrap=True)
    for crash in report.crashes[:20]:
        console.print(f"  crash: {crash}", markup=False, soft_wrap=True)
    if report.failures:
        raise typer.Exit(1)


def _grpc_fuzz_target(model: str):
    """A receiver in this process with the fuzzer's limits, and send(frames) -> "OK" or the status name its client got."""
    import contextlib
    import logging
    import threading
    import uuid

    import grpc

    from common import fuzz
    from common.proto import kvwire_pb2 as pb
    from common.proto import kvwire_pb2_grpc as pb_grpc
    from common.settings import Settings
    from receiver.server import grpc_options, start_server

    limits = fuzz.FUZZ_LIMITS
    # Short-lived sessions: accepted inputs would otherwise pile up for the default ten minutes.
    settings = Settings(max_frame_bytes=limits.max_frame_bytes, max_transfer_bytes=limits.max_transfer_bytes,
                        max_tokens=limits.max_tokens, session_ttl_s=5, token=None, tls_cert=None)
    logging.getLogger("kvwire.receiver").setLevel(logging.ERROR)  # a warning per rejected input otherwise

    def send(stub, frames: list[pb.Frame]) -> str:
        frames = [pb.Frame.FromString(frame.SerializeToString()) for frame in frames]
        for frame in frames:  # a fresh id: a repeated one would be answered from the finished transfer
            if frame.WhichOneof("kind") == "header":
                frame.header.transfer_id = uuid.uuid4().hex
        try:
            if fuzz.is_segmented(frames):
                list(stub.TransferSegments(iter(frames), timeout=60))
            else:
                stub.Transfer(iter(frames), timeout=60)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    @contextlib.contextmanager
    def target():
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        server, _, port = asyncio.run_coroutine_threadsafe(start_server("127.0.0.1", 0, model, settings), loop).result()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(settings))
        try:
            stub = pb_grpc.KVWireStub(channel)
            yield lambda frames: send(stub, frames)
        finally:
            channel.close()
            asyncio.run_coroutine_threadsafe(server.stop(grace=None), loop).result()
            loop.call_soon_threadsafe(loop.stop)

    return target()


@bench_app.command("codec")
def bench_codec(
    tokens: int = typer.Option(1024, min=16, help="Context length of the cache."),
    device: str = typer.Option("cpu", help="cpu: a real SmolLM2 cache; cuda: synthetic tensors of the same shape on the GPU."),
    profiles: Optional[str] = typer.Option(None, help="Comma-separated profiles (default: fp16 to int1, nf4 and "
                                                      "svd ranks, channel.bench.CODEC_PROFILES)."),
    repeats: int = typer.Option(3, min=1),
    zstd_level: int = typer.Option(3, min=1, max=22, help="Level of the entropy stage."),
    json_path: Optional[Path] = JsonOption(),
    model: str = ModelOption,
) -> None:
    """Encode/decode throughput of each codec, side by side with a plain copy, plus size and error."""
    import json

    import torch
    from rich.progress import Progress
    from rich.table import Table

    from channel.bench import CODEC_PROFILES, bench_codecs, real_cache, rows_as_dicts, synthetic_cache

    torch.set_num_threads(torch.get_num_threads())
    if device == "cpu":
        kv = real_cache(model, tokens)
        source = f"{model} cache of {tokens} tokens (CPU, {torch.get_num_threads()} threads)"
    else:
        kv = synthetic_cache(30, 3, tokens, 64, device)
        source = f"synthetic SmolLM2-shaped cache of {tokens} tokens on {torch.cuda.get_device_name(device)}"
    names = [p for p in (profiles or ",".join(CODEC_PROFILES)).split(",") if p]
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


@bench_app.command("frames")
def bench_frames(
    chunks: int = typer.Option(280, min=1,
                               help="Chunks (280 of 900 KB: a 32K-token pca:b0.7 cache of Llama-8B's shape)."),
    chunk_bytes: int = typer.Option(900_000, min=2048, max=1 << 20, help="Payload bytes a chunk."),
    repeats: int = typer.Option(3, min=1, help="Runs of each way, alternated; the best counts."),
    json_path: Optional[Path] = JsonOption(),
) -> None:
    """The host work between the coder and gRPC, two ways side by side on each node. The sender's: pb.Frames
    serialized by gRPC, and frames serialized as they are made (the sender's). The receiver's, from gRPC's
    message to a payload checked: a frame parsed whole, and one received with its payload left in the message
    (the receiver's)."""
    import json

    from channel.bench import frame_making

    row = frame_making(chunks, chunk_bytes, repeats)
    for way, gbps in row["gbps"].items():
        console.print(f"{way}: {row['seconds'][way]:.3f} s for {row['payload_bytes'] / 1e6:.0f} MB of payload, "
                      f"{gbps:.2f} GB/s")
    gbps = list(row["gbps"].values())
    console.print(f"sender, serialized as made: {gbps[1] / gbps[0]:.2f}x the pb.Frames' rate, the same bytes")
    console.print(f"receiver, payload a view: {gbps[3] / gbps[2]:.2f}x the rate of a frame parsed whole")
    if json_path:
        json_path.write_text(json.dumps(row, indent=2))


@bench_app.command("entropy")
def bench_entropy(
    profiles: str = typer.Option("int4:g32,int2,nf4,pca:b2,pca:b1", help="Comma-separated profiles with code symbols."),
    samples: int = typer.Option(40, min=2, help="Prompts: the first half fits the static model, the rest measure it."),
    data: Optional[Path] = typer.Option(None, exists=True, dir_okay=False),
    zstd_level: int = typer.Option(3, min=1, max=22),
    json_path: Optional[Path] = JsonOption(),
    model: str = ModelOption,
) -> None:
    """Bits per element of each profile's codes: packed, after zstd, the order-0 entropy, and a static
    per-(layer, channel) model (what rANS with shipped tables reaches)."""
    import json

    from rich.progress import Progress
    from rich.table import Table

    from channel.bench_entropy import entropy_study, verdict
    from channel.evaluation.squad import load_squad
    from common.models import load_model

    names = _parse_profiles(profiles)
    coded = [str(p) for p in names if p.entropy_coded]
    if coded:
        raise typer.BadParameter(f"{', '.join(coded)}: already range-coded (pca:...:e); this bench models "
                                 "fixed-width codes", param_hint="--profiles")
    loaded = load_model(model)
    dataset = load_squad(data, limit=samples)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("prefilling", total=len(dataset))
        rows = entropy_study(loaded, dataset, names, zstd_level, progress=lambda: progress.advance(task))
    table = Table(title=f"entropy stage: {model}, static model fitted on {rows[0]['fit_prompts']} prompts, "
                        f"measured on {rows[0]['test_prompts']} (bits per element)")
    for column in ("profile", "packed", "zstd", "order-0 entropy", "static model", "static / zstd", "zstd / order-0"):
        table.add_column(column, justify="left" if column == "profile" else "right")
    for r in rows:
        table.add_row(r["profile"], f"{r['packed_bits']:.3f}", f"{r['zstd_bits']:.3f}", f"{r['order0_bits']:.3f}",
                      f"{r['static_bits']:.3f}", f"{r['static_vs_zstd']:.3f}", f"{r['zstd_vs_order0']:.3f}")
    console.print(table)
    console.print(verdict(rows))
    if json_path:
        json_path.write_text(json.dumps({"model": model, "rows": rows, "verdict": verdict(rows)}, indent=2))


@bench_app.command("coders")
def bench_coders(
    profiles: str = typer.Option("pca:b1.7:w:e:j:i1:f3,pca:b3.05:w:e:j:i1:f3,pca:b2:w:e",
                                 help="Comma-separated range-coded pca:...:e profiles (no text stage)."),
    samples: int = typer.Option(8, min=1, help="Prompts (SQuAD contexts and questions)."),
    skip: int = typer.Option(0, min=0, help="Start this far into the questions."),
    data: Optional[Path] = typer.Option(None, exists=True, dir_okay=False),
    json_path: Optional[Path] = JsonOption(),
    model: str = ModelOption,
) -> None:
    """The entropy coders of pca:...:e side by side on real caches: the range coder (CPU) against rANS
    (pca:...:a, any device), bits per element and encode seconds, both against the model's rate."""
    import json

    from rich.progress import Progress
    from rich.table import Table

    from channel.bench_entropy import coder_study
    from channel.evaluation.squad import load_squad
    from common.models import load_model

    names = _parse_profiles(profiles)
    loaded = load_model(model)
    dataset = load_squad(data, limit=samples, skip=skip)
    if not dataset:
        raise typer.BadParameter(f"no questions left after skipping {skip}", param_hint="--skip")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("prefilling", total=len(dataset))
        try:
            rows = coder_study(loaded, dataset, names, progress=lambda: progress.advance(task))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--profiles") from None
    table = Table(title=f"entropy coders: {model}, {len(dataset)} prompts (bits per element of the cache; "
                        f"encode seconds per prompt on this machine)")
    for column in ("profile", "model rate", "range", "range / model", "rANS", "rANS / model", "rANS / range",
                   "range s", "rANS s"):
        table.add_column(column, justify="left" if column == "profile" else "right")
    for r in rows:
        table.add_row(r["profile"], f"{r['model_bits']:.4f}", f"{r['range_bits']:.4f}", f"{r['range_vs_model']:.4f}",
                      f"{r['rans_bits']:.4f}", f"{r['rans_vs_model']:.4f}", f"{r['rans_vs_range']:.4f}",
                      f"{r['range_encode_s']:.2f}", f"{r['rans_encode_s']:.2f}")
    console.print(table)
    if json_path:
        json_path.write_text(json.dumps({"model": model, "samples": len(dataset), "skip": skip, "rows": rows}, indent=2))


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
    json_path: Optional[Path] = JsonOption(),
    model: str = ModelOption,
) -> None:
    """Segmented (adaptive) against whole-cache transfers over real gRPC through the shaping relay:
    deadline hit rate and quality (F1 against the full-prompt answer, 0 when late)."""
    import json

    from rich.progress import Progress
    from rich.table import Table

    from channel.cli.app import _parse_profiles
    from channel.evaluation.haystack import needle_samples
    from channel.evaluation.segment_trials import run_trials, summarize
    from channel.nodes import local_receiver
    from common.link import parse_rate
    from common.models import load_model

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


@bench_app.command("gpu")
def bench_gpu(
    tokens: str = typer.Option("4096,32768", help="Context lengths for the codec and selection figures."),
    ask_tokens: int = typer.Option(4096, help="Context length of the asks over gRPC."),
    rates: str = typer.Option("1gbit,10gbit,25gbit", help="Relay rates for the asks and the recompute table "
                                                        "(`direct`: no relay); a rate over the relay's ceiling runs unshaped, said so."),
    profile: str = typer.Option("int8", help="Profile of the asks."),
    long_tokens: str = typer.Option("32768,131072", help="Prefill + selection lengths (peak memory); "
                                                         "one that does not fit is reported as such."),
    sections: str = typer.Option("codec,asks,selection,recompute",
                                 help="Which to run: codec (int kernels), asks, selection, recompute (KV against recompute)."),
    contexts: str = typer.Option("4096,32768,131072", help="recompute: context lengths of the table."),
    frontier: str = typer.Option("pca:b2:w:e:j,pca:b1:w:e:j", help="recompute: the frontier profiles (about 12.5% "
                                 "and 6.25% of fp16), comma-separated."),
    baseline: str = typer.Option("int4", help="recompute: the precision profile beside them ('' for none)."),
    codec_tokens: int = typer.Option(32768, help="recompute: the context whose cache the frontier codec rows code "
                                                 "(one of --contexts; 0: none)."),
    calibration_tokens: int = typer.Option(4096, help="recompute: tokens of the random model's basis fit."),
    max_row_s: float = typer.Option(60.0, help="recompute: skip a row predicted to take longer (said so)."),
    budget_s: float = typer.Option(0.0, help="recompute: start no row after this many seconds of the table (0: no limit)."),
    basis_dir: Optional[Path] = typer.Option(None, help="recompute: where the fitted basis goes (default: a temporary folder)."),
    receiver_device: Optional[str] = typer.Option(None, help="recompute: the receiver's device, e.g. cuda:1 on a machine "
                                                  "of two GPUs, as two nodes would run (default: the sender's)."),
    json_path: Optional[Path] = JsonOption(),
) -> None:
    """Codec GB/s against a device copy, ask stages and TTFT pipelined against not, long-context
    prefill memory, and KV against recompute, on CUDA, at Llama-3.1-8B's KV shape (random weights)."""
    import json

    import torch
    from rich.table import Table

    from channel import bench_gpu as gpu
    from channel.nodes import start_receiver_process
    from common.models import load_model

    if not torch.cuda.is_available():
        console.print("[red]kvwire bench gpu needs a CUDA device; this machine has none[/red]")
        raise typer.Exit(2)
    chosen = {s.strip() for s in sections.split(",") if s.strip()}
    unknown = chosen - {"codec", "asks", "selection", "recompute"}
    if unknown:
        raise typer.BadParameter(f"unknown sections {', '.join(sorted(unknown))}", param_hint="--sections")
    if receiver_device is not None:
        from common.models import DeviceError, resolve_device

        try:
            receiver_device = str(resolve_device(receiver_device))
        except DeviceError as exc:
            raise typer.BadParameter(str(exc), param_hint="--receiver-device") from None
    report = {"environment": gpu.environment(), "codec": [], "asks": [], "selection": []}
    console.print(report["environment"])

    def write() -> None:
        if json_path:
            json_path.write_text(json.dumps(report, indent=2))

    if "codec" in chosen:
        table = Table(title="codec at Llama-3.1-8B's KV shape (bf16 input): GB/s and ratio to a device copy")
        for column in ("tokens", "profile", "kernels", "launch", "copy GB/s", "encode GB/s", "x copy", "decode GB/s", "x copy"):
            table.add_column(column, justify="right")
        for n in [int(t) for t in tokens.split(",")]:
            for row in gpu.codec_throughput(n):
                report["codec"].append(row)
                table.add_row(str(n), row["profile"], row["kernels"], row["launch"], f"{row['copy_gbps']:.0f}", f"{row['encode_gbps']:.0f}",
                              f"{row['encode_vs_copy']:.2f}", f"{row['decode_gbps']:.0f}", f"{row['decode_vs_copy']:.2f}")
        console.print(table)
        report["wire_encode"] = [gpu.wire_encode(int(n)) for n in tokens.split(",")]
        for row in report["wire_encode"]:
            console.print(f"the wire's encode, {row['tokens']} tokens, {row['profile']}, {row['chunks']} chunks to host bytes: "
                          f"one range at a time {row['one_range_at_a_time_s'] * 1e3:.1f} ms, encode_chunks "
                          f"{row['encode_chunks_s'] * 1e3:.1f} ms ({row['speedup']:.1f}x); its frames with zstd on one thread "
                          f"{row['frames_zstd_serial_s'] * 1e3:.1f} ms, on {row['zstd_threads']} "
                          f"{row['frames_zstd_parallel_s'] * 1e3:.1f} ms ({row['frames_speedup']:.1f}x)")
        report["wire_roundtrip"] = [gpu.wire_roundtrip(int(n), "int4:g32", "cuda") for n in tokens.split(",")]
        for row in report["wire_roundtrip"]:
            console.print(f"the frame path both ways, {row['tokens']} tokens, {row['profile']}: encode "
                          f"{row['encode_gbps']:.2f} GB/s, decode {row['decode_gbps']:.2f} GB/s of bf16 input; "
                          "to the bytes gRPC sends (s): "
                          + ", ".join(f"{k} {v:.3f}" for k, v in row["to_bytes_s"].items())
                          + "; from them to the cache (s): "
                          + ", ".join(f"{k} {v:.3f}" for k, v in row["from_bytes_s"].items())
                          + "; stages (s): " + ", ".join(f"{k} {v:.3f}" for k, v in row["stages_s"].items()))
    report["relay_ceiling_bps"] = gpu.relay_ceiling()
    report["grpc_loopback_bps"] = {"raw bytes, 1 MiB messages": gpu.grpc_ceiling(),
                                   "kvwire Frames, 1 MiB chunks": gpu.grpc_ceiling(frames=True)}
    console.print(f"relay ceiling: {report['relay_ceiling_bps'] / 1e9:.2f} Gbit/s")
    for what, bps in report["grpc_loopback_bps"].items():
        console.print(f"gRPC on loopback without the relay ({what}): {bps / 1e9:.2f} Gbit/s")
    loaded = load_model(gpu.RANDOM_MODEL, "cuda", "bfloat16")
    question = "Who gave their name to Normandy?"
    if "asks" in chosen:
        big = str(64 << 30)
        process, target = start_receiver_process(gpu.RANDOM_MODEL, {
            "KVWIRE_DEVICE": "cuda", "KVWIRE_DTYPE": "bfloat16", "KVWIRE_MAX_TOKENS": "262144",
            "KVWIRE_MAX_TRANSFER_BYTES": big, "KVWIRE_SESSION_BUDGET_BYTES": big, "KVWIRE_MAX_FRAME_BYTES": str(16 << 20)})
        try:
            context = gpu.synthetic_context(loaded.tokenizer, ask_tokens)
            report["asks"] = gpu.ask_stages(loaded, context, question, profile, rates.split(","), target)
        finally:
            process.terminate()
            process.wait(timeout=60)
        table = Table(title=f"ask stages over gRPC through the relay, {profile}, seconds")
        for column in ("rate", "tokens", "MB", "prefill", "encode", "send", "(assemble)", "inject", "1st token", "TTFT",
                       "TTFT piped"):
            table.add_column(column, justify="right")
        for row in report["asks"]:
            table.add_row(row["rate"], str(row["tokens"]), f"{row['bytes'] / 1e6:.0f}", f"{row['prefill_s']:.3f}",
                          f"{row['encode_s']:.3f}", f"{row['send_s']:.3f}", f"{row['assemble_s']:.3f}", f"{row['inject_s']:.3f}",
                          f"{row['first_token_s']:.3f}", f"{row['ttft_unpipelined_s']:.3f}", f"{row['ttft_pipelined_s']:.3f}")
        console.print(table)
    if "selection" in chosen:
        for n in [int(t) for t in long_tokens.split(",")]:
            try:
                row = gpu.selection_memory(loaded, gpu.synthetic_context(loaded.tokenizer, n), question)
            except torch.OutOfMemoryError as exc:
                row = {"tokens": n, "error": f"out of memory: {str(exc).splitlines()[0]}"}
                torch.cuda.empty_cache()
            report["selection"].append(row)
            console.print(row)
    write()
    if "recompute" in chosen:
        _recompute_table(loaded, report, write, [int(t) for t in contexts.split(",")], rates.split(","),
                         [p for p in [baseline, *frontier.split(",")] if p.strip()], codec_tokens, calibration_tokens,
                         max_row_s, budget_s, basis_dir, receiver_device)
    if json_path:
        console.print(f"wrote {json_path}")


def _recompute_table(loaded, report: dict, write, contexts: list[int], rates: list[str], profiles: list[str],
                     codec_tokens: int, calibration_tokens: int, max_row_s: float, budget_s: float,
                     basis_dir: Optional[Path], receiver_device: Optional[str] = None) -> None:
    """`kvwire bench gpu`'s KV-against-recompute table (channel.bench_recompute), into report["recompute"]: the
    receiver on `receiver_device` (default: the sender's device)."""
    import tempfile

    from channel import bench_recompute as table
    from channel.nodes import start_receiver_process

    started = time.monotonic()

    def say(line: str) -> None:
        console.print(f"[{time.monotonic() - started:6.1f} s] {line}", highlight=False)

    folder = basis_dir or Path(tempfile.mkdtemp(prefix="kvwire-basis-"))
    basis = table.fit_random_basis(loaded, folder, calibration_tokens)
    say(f"basis {basis['digest']} fitted on {basis['tokens']} tokens in {basis['seconds']:.1f} s "
        f"(layer weights {basis['layer_weights']})")
    recomputed = table.recompute_all(loaded, contexts, say)  # before the receiver holds the GPU's memory
    receiver_device = receiver_device or str(loaded.device)
    say(f"sender on {loaded.device}, receiver on {receiver_device}")
    process, target = start_receiver_process(loaded.name, table.receiver_env(max(contexts), receiver_device,
                                                                             loaded.fingerprint.dtype))
    try:
        def checkpoint(partial: dict) -> None:
            report["recompute"] = {**partial, "basis": basis}
            write()

        result = table.kv_against_recompute(loaded, target, contexts, rates, profiles, report["relay_ceiling_bps"],
                                            max_row_s, budget_s or None, codec_tokens or None, say, checkpoint, recomputed)
    finally:
        process.terminate()
        process.wait(timeout=60)
    result.update(basis=basis, sender_device=str(loaded.device), receiver_device=receiver_device,
                  ceilings={"the relay": report["relay_ceiling_bps"],
                            **{f"gRPC on loopback ({k})": v for k, v in report["grpc_loopback_bps"].items()}})
    report["recompute"] = result
    table.print_report(console, result)
    write()


STARTUP_COMMANDS = {
    "kvwire --help": ["--help"],
    "a profile error (sender ask --profile int9)": ["sender", "ask", "--profile", "int9", "--context", "x", "--question", "x"],
    "kvwire receiver health (nothing listening)": ["receiver", "health", "--target", "127.0.0.1:9"],
}


@bench_app.command("startup")
def bench_startup(repeats: int = typer.Option(3, min=1, help="Runs of each command; the table gives their median."),
                  json_path: Optional[Path] = JsonOption()) -> None:
    """Wall time from launch to exit of the commands that must answer at once (help, bad input, health)."""
    import json
    import shutil
    import statistics
    import subprocess

    from rich.table import Table

    kvwire = shutil.which("kvwire") or str(Path(sys.executable).with_name("kvwire"))
    table = Table(title=f"start-up, wall seconds, median of {repeats} (each in a fresh process)")
    for column in ("command", "exit code", "median s", "runs s"):
        table.add_column(column, justify="left" if column == "command" else "right")
    rows = []
    for label, args in STARTUP_COMMANDS.items():
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            code = subprocess.run([kvwire, *args], capture_output=True).returncode
            runs.append(time.perf_counter() - start)
        rows.append({"command": label, "exit_code": code, "median_s": statistics.median(runs), "runs_s": runs})
        table.add_row(label, str(code), f"{statistics.median(runs):.2f}", " ".join(f"{r:.2f}" for r in runs))
    console.print(table)
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2))


@bench_app.command("soak")
def bench_soak(
    duration: float = typer.Option(300.0, min=1, help="Seconds of honest load beside the attackers."),
    baseline: float = typer.Option(120.0, min=1, help="Seconds of the same honest load alone, first."),
    model: str = ModelOption,
    profile: str = typer.Option("int8", help="The honest senders' profile."),
    concurrency: int = typer.Option(8, min=1, help="Honest senders."),
    attackers: int = typer.Option(3, min=1, help="Hostile clients, each looping over the attacks of issue 31."),
    ttl: float = typer.Option(20.0, help="The receiver's session TTL (KVWIRE_SESSION_TTL_S): the end RSS is taken after it."),
    idle: float = typer.Option(5.0, help="The receiver's stream idle timeout (KVWIRE_STREAM_IDLE_S)."),
    json_path: Optional[Path] = JsonOption("Write the figures here too."),
) -> None:
    """Honest transfers (answers checked) while hostile clients attack one receiver process on loopback:
    completion, p99 against the same load alone, worst /healthz and gRPC health latency, receiver RSS."""
    import json

    from channel.soak import run_soak

    figures = run_soak(model, profile, concurrency, attackers, duration, baseline, ttl_s=ttl, idle_s=idle,
                       progress=console.print)
    text = json.dumps(figures, indent=2)
    console.print(text, markup=False, soft_wrap=True)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
