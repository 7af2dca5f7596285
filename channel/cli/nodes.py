"""Commands that run the nodes: receiver, sender, demo, the channel relay, load tests."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Optional

import typer

from channel.cli.app import (
    DeviceOption,
    DtypeOption,
    JsonOption,
    LinkOptions,
    ModelOption,
    ProfileFileOption,
    _parse_profiles,
    _profile_option,
    app,
    console,
    receiver_app,
    sender_app,
    use_device,
)


@receiver_app.command("serve")
def receiver_serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind (gRPC and HTTP)."),
    port: int = typer.Option(50051, help="gRPC port."),
    http_port: int = typer.Option(8080, help="HTTP port (health, metrics, sessions, dashboard); 0 for none."),
    model: str = ModelOption,
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = DtypeOption,
) -> None:
    """Serve the KVWire gRPC service (health, reflection) and its HTTP side in one process."""
    use_device(device, dtype)
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
    import time

    import grpc

    from receiver.probe import check  # grpc and the health stubs only: answers in well under a second

    deadline = time.monotonic() + wait
    while True:
        try:
            status = check(target, timeout_s=2.0)
        except grpc.RpcError as error:
            status = f"{error.code().name}: {error.details()}"
        if status == "SERVING":
            console.print(f"{target} SERVING")
            return
        if time.monotonic() >= deadline:
            console.print(f"receiver at {target} not SERVING after {wait:.0f} s ({status})")
            raise typer.Exit(1)
        time.sleep(0.2)


@sender_app.command("serve")
def sender_serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8081, help="HTTP port."),
    target: Optional[str] = typer.Option(None, help="Receiver host:port (default: KVWIRE_RECEIVER_TARGET)."),
    model: str = ModelOption,
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = DtypeOption,
) -> None:
    """The sender's HTTP API: POST /v1/ask, /metrics, the OpenAPI schema at /openapi.json."""
    use_device(device, dtype)
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
    profile: str = typer.Option("balanced", help="A preset (lossless, int8, balanced, compact, auto: the receiver "
                                                 "plans for --bandwidth and --deadline), a profile such as int4:g32, "
                                                 "or its JSON long form; `kvwire profiles` lists them."),
    profile_file: Optional[Path] = ProfileFileOption,
    query_agnostic: bool = typer.Option(False, help="Send only the context as KV; the question travels as text."),
    max_new_tokens: int = typer.Option(64, min=1, max=512),
    zstd_level: int = typer.Option(3, min=1, max=22, help="Level of the entropy stage."),
    segments: int = typer.Option(0, min=0, help="Send in segments of this many tokens (e.g. 512), each planned "
                                                "for --deadline: a precision profile, or text the receiver prefills."),
    deadline: float = typer.Option(2.0, min=0.0, help="With --segments or auto: seconds until the cache is in place."),
    bandwidth: Optional[str] = typer.Option(None, help="With auto: the rate to plan for (default: what this client "
                                                       "measured). With --segments: the rate to plan the first "
                                                       "segment with (default: send it as a probe, the smallest cache)."),
    calibration: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                               help="With --segments: the table to plan with (default: the model's)."),
    pipelined: bool = typer.Option(False, help="Stream each layer as the prefill produces it (query-aware; the "
                                               "same bytes as without; any profile but a selection or auto)."),
    model: str = ModelOption,
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = DtypeOption,
) -> None:
    """Prefill a context, stream its KV cache to a receiver and print the answer."""
    # Bad arguments are answered before torch and the model stack are imported (start-up is seconds).
    if (context is None) == (context_file is None):
        raise typer.BadParameter("give exactly one of --context and --context-file")
    if pipelined and (segments or query_agnostic):
        raise typer.BadParameter("--pipelined streams the whole query-aware cache: not with --segments or "
                                 "--query-agnostic", param_hint="--pipelined")
    chosen = _profile_option(profile, profile_file, model)
    if pipelined and (isinstance(chosen, str) or chosen.selection is not None):  # a str is auto
        raise typer.BadParameter(f"{chosen}: a selection (which auto may plan) ranks the whole cache, so it cannot "
                                 "pipeline; name a profile without one", param_hint="--pipelined")
    use_device(device, dtype)
    import grpc

    from common.link import parse_rate
    from common.models import ContextTooLong, load_model
    from common.planner import load_table
    from common.settings import get_settings
    from sender.client import Client
    from sender.pipeline import AUTO, Sender

    text = context if context is not None else context_file.read_text()
    loaded = load_model(model)
    try:
        bandwidth_bps = parse_rate(bandwidth) if bandwidth else None
        table = load_table(loaded.name, calibration) if segments else None
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        with Client.from_settings(get_settings(), target) as client:
            sender = Sender(loaded, client, zstd_level)
            if segments:
                result = sender.ask_segments(text, question, None, deadline, segments, bandwidth_bps, max_new_tokens,
                                             table)
            elif pipelined:
                result = sender.ask_pipelined(text, question, chosen, max_new_tokens)
            else:
                result = sender.ask(text, question, chosen, not query_agnostic, max_new_tokens, bandwidth_bps,
                                    deadline if chosen == AUTO else None)
    except ContextTooLong as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    except grpc.RpcError as error:
        console.print(f"[red]receiver at {target} refused: {error.code().name}: {error.details()}[/red]")
        raise typer.Exit(1) from None
    if result.segments:
        _print_segments(result, deadline)
    elif result.plan:
        console.print(f"plan: {result.plan}")
    console.print(f"[bold]{result.answer}[/bold]")
    console.print(f"{result.bytes_sent:,} bytes in {result.frames} frames for {result.seq_len} tokens as "
                  f"{result.profile}; prefill "
                  f"{result.prefill_s:.2f} s, transfer {result.transfer_s:.2f} s"
                  + (" (pipelined: from the prefill's start)" if pipelined else "")
                  + (f" ({'met' if result.transfer_s <= deadline else 'missed'} the deadline)" if segments else "")
                  + f", decode {result.decode_s:.2f} s")


def _print_segments(result, deadline: float) -> None:
    from rich.table import Table

    table = Table(title=f"{len(result.segments)} segments, deadline {deadline:g} s")
    for column in ("tokens", "profile", "bytes", "planned at Mbit/s", "budget s", "sent s", "in place s"):
        table.add_column(column, justify="right")
    for s in result.segments:
        planned_at = "probe" if s.estimate_bps is None else f"{s.estimate_bps / 1e6:.1f}"
        table.add_row(f"{s.start}-{s.end}", s.profile, f"{s.bytes:,}", planned_at, f"{s.budget_s:.2f}",
                      f"{s.sent_s:.2f}", f"{s.acked_s:.2f}")
    console.print(table)


@app.command()
def demo(
    samples: int = typer.Option(20, min=1, help="Number of answerable questions."),
    data: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="A SQuAD-format JSON file (default: the embedded subset)."),
    profiles: str = typer.Option("raw,int8,int4:g32,q2c:0.5+int4:g32,pca:b4.8:w:e+text,pca:b3.05:w:e:j:i1:f3+text,"
                                 "pca:b1.7:w:e:j:i1:f3+text",
                                 help="Comma-separated profiles; the first gets the per-question table."),
    rate: str = typer.Option("50mbit", help="Rate of the emulated link every transfer crosses (the relay); 'none' for plain loopback."),
    delay: str = typer.Option("10ms", help="One-way delay of the emulated link."),
    query_agnostic: bool = typer.Option(False, help="Send only the context as KV; the question travels as text."),
    max_new_tokens: int = typer.Option(32, min=1, max=512),
    json_path: Optional[Path] = JsonOption("Also write the results as JSON."),
    plot_path: Optional[Path] = typer.Option(Path("kvwire-demo.png"), "--plot", help="Accuracy against bytes and time (PNG)."),
    target: Optional[str] = typer.Option(None, help="Use this running receiver (or relay) instead of starting one."),
    model: str = ModelOption,
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = DtypeOption,
) -> None:
    """Run a receiver on loopback behind an emulated link; send SQuAD questions under several profiles."""
    use_device(device, dtype)
    from channel.demo import report, run_demo
    from channel.evaluation.squad import load_squad
    from common.link import link_from_options

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


@app.command("channel")
def channel(
    listen: str = typer.Option("127.0.0.1:50052", help="Address the relay accepts connections on."),
    upstream: str = typer.Option("127.0.0.1:50051", help="The receiver's address."),
    rate: Optional[str] = LinkOptions["rate"], trace: str = LinkOptions["trace"], delay: Optional[str] = LinkOptions["delay"],
    jitter: str = LinkOptions["jitter"], stall_rate: float = LinkOptions["stall_rate"], stall: str = LinkOptions["stall"],
    seed: int = LinkOptions["seed"],
    corrupt_per_mb: float = typer.Option(0.0, help="Fault injection: flip a random bit this often per MB sent upstream."),
) -> None:
    """A TCP relay that shapes the real bytes of the gRPC connection (rate, delay, jitter, stalls)."""
    from channel.relay import run_relay
    from common.link import link_from_options
    from common.settings import get_settings

    settings = get_settings()
    rate, delay = rate or settings.channel_rate, delay or settings.channel_delay
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        link_from_options(rate, trace, delay, jitter, stall_rate, stall, seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    asyncio.run(run_relay(listen, upstream, lambda: link_from_options(rate, trace, delay, jitter, stall_rate, stall, seed),
                          corrupt_per_mb))


@app.command("prepare")
def prepare(model: str = ModelOption, device: Optional[str] = DeviceOption,
            dtype: Optional[str] = DtypeOption) -> None:
    """Convert and cache a model's weights now (a Docker build step), and print its fingerprint."""
    use_device(device, dtype)
    from common.models import load_model

    loaded = load_model(model)
    console.print(f"{model}: ready in {loaded.load_seconds:.1f} s; weights sha256 {loaded.fingerprint.weights_sha256}")


@app.command("loadtest")
def loadtest(
    concurrency: int = typer.Option(16, min=1),
    transfers: int = typer.Option(200, min=1),
    profile: str = typer.Option("raw", help="A preset or profile (see `kvwire profiles`)."),
    profile_file: Optional[Path] = ProfileFileOption,
    rate: Optional[str] = typer.Option(None, help="Put every transfer through the shaping relay at this rate."),
    samples: int = typer.Option(8, min=1, help="Distinct contexts, cycled."),
    max_new_tokens: int = typer.Option(4, min=1, max=512),
    budget: str = typer.Option("1gib", help="The receiver's session byte budget (e.g. 512mib, 1gib)."),
    target: Optional[str] = typer.Option(None, help="Load this running receiver instead of starting one."),
    chaos: bool = typer.Option(False, help="Kill the receiver (SIGKILL) and restart it twice, and reset every "
                                           "connection through the relay three times, during the load; then "
                                           "compare the receiver's memory with its baseline."),
    json_path: Optional[Path] = JsonOption(),
    model: str = ModelOption,
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = DtypeOption,
) -> None:
    """N concurrent senders against one receiver: throughput, latency percentiles, errors, peak memory;
    every answer is checked against the one the same profile gives in process."""
    use_device(device, dtype)
    import json

    from rich.progress import Progress

    from channel import loadtest as lt
    from common.models import load_model

    names = [_profile_option(profile, profile_file, model, allow_auto=False)]
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30}
    match = re.fullmatch(r"(\d+)(kib|mib|gib)", budget.lower())
    if not match:
        raise typer.BadParameter("budget like 512mib or 1gib", param_hint="--budget")
    if chaos and target:
        raise typer.BadParameter("--chaos kills and restarts its own receiver: leave out --target")
    env = {"KVWIRE_SESSION_BUDGET_BYTES": str(int(match.group(1)) * units[match.group(2)])}
    loaded = load_model(model)
    prepared = lt.prepare(loaded, names[0], samples, max_new_tokens)
    with Progress(console=console) as progress:
        task = progress.add_task("transfers", total=transfers)
        advance = lambda: progress.advance(task)  # noqa: E731
        if chaos:
            report = lt.run_chaos(model, loaded, names[0], prepared, concurrency, transfers, max_new_tokens, env,
                                  rate, progress=advance)
        else:
            report = lt.run_plain(model, loaded, names[0], prepared, concurrency, transfers, max_new_tokens, env,
                                  rate, target, progress=advance)
    summary = report.summary()
    console.print(
        f"{summary['transfers']} transfers of {names[0]} at concurrency {concurrency}{f' over {rate}' if rate else ''}"
        f"{' with chaos' if chaos else ''}: {summary['ok']} answers right ({summary['completion']:.1%}), "
        f"{summary['wrong_answers']} wrong, {summary['lost']} lost; errors {summary['errors']}; retries "
        f"{summary['retries']}, caches sent again {summary['resends']}\n{summary['transfers_per_s']:.2f} transfers/s, "
        f"{summary['mb_per_s']:.1f} MB/s; latency p50 {summary['p50_s']:.3f} s, p95 {summary['p95_s']:.3f} s, "
        f"p99 {summary['p99_s']:.3f} s; receiver peak RSS {summary['receiver_peak_rss_mib'] or float('nan'):.0f} MiB")
    for fault in report.faults:
        console.print(f"  {fault['fault']} after {fault['after_transfers']} transfers ({fault['seconds']:.1f} s): "
                      f"{fault['detail']}")
    if report.receiver_rss:
        console.print(f"receiver memory: baseline {summary['receiver_rss_baseline_mib']:.0f} MiB, after the load "
                      f"{summary['receiver_rss_after_mib']:.0f} MiB")
    if json_path:
        json_path.write_text(json.dumps({"profile": str(names[0]), "concurrency": concurrency, "rate": rate,
                                         "chaos": chaos, **summary}, indent=2))
    if summary["wrong_answers"] or summary["lost"]:
        raise typer.Exit(1)

