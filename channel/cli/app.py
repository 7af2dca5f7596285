"""The Typer application, its sub-commands' groups, and helpers the command modules share."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local packages; never wait on the hub

app = typer.Typer(help="Send an LLM's KV cache between machines, and measure what each byte buys.", no_args_is_help=True)
receiver_app = typer.Typer(help="The receiving node.", no_args_is_help=True)
sender_app = typer.Typer(help="The sending node.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print figures.", no_args_is_help=True)
study_app = typer.Typer(help="Reproduce the research claims kvwire starts from, with a verdict.", no_args_is_help=True)
app.add_typer(receiver_app, name="receiver")
app.add_typer(sender_app, name="sender")
app.add_typer(bench_app, name="bench")
app.add_typer(study_app, name="study")
console = Console(width=None if sys.stdout.isatty() else 160, emoji=False)  # wide tables in logs and CI; no
# emoji codes: a profile such as pca:b1:w:e:j:a:i1 holds ":a:"


DeviceOption = typer.Option(None, "--device", help="auto (cuda when there is one), cpu, cuda or cuda:N "
                                                  "(KVWIRE_DEVICE).")
DtypeOption = typer.Option(None, "--dtype", help="auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16 "
                                                "or float16 (KVWIRE_DTYPE).")


def use_device(device: Optional[str], dtype: Optional[str]) -> None:
    """Check --device/--dtype here and export them, so that every model this process loads, and
    every receiver it starts, uses them; a device this machine does not have is a clear error."""
    from common.models import DeviceError, resolve_device, resolve_dtype

    if device:
        os.environ["KVWIRE_DEVICE"] = device
    if dtype:
        os.environ["KVWIRE_DTYPE"] = dtype
    try:
        resolve_dtype(dtype, resolve_device(device))
    except DeviceError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _configured_model() -> str:
    from common.settings import get_settings

    return get_settings().model


# Every command's --model: the settings' model (KVWIRE_MODEL) unless given.
ModelOption = typer.Option(..., "--model", default_factory=_configured_model, show_default="KVWIRE_MODEL, else smollm2-135m",
                           help="smollm2-135m, gemma3-270m, tiny-llama, tiny-gemma3, a HF id or a directory.")


LinkOptions = dict(
    rate=typer.Option(None, help="Link rate, e.g. 20mbit (constant trace). Default: KVWIRE_CHANNEL_RATE, else 100mbit."),
    trace=typer.Option("constant", help="constant, markov, step:RATE1:RATE2:AT (e.g. step:100mbit:10mbit:1s) or a CSV of time,rate."),
    delay=typer.Option(None, help="One-way delay. Default: KVWIRE_CHANNEL_DELAY, else 0ms."),
    jitter=typer.Option("0ms", help="Extra delay, uniform in [0, jitter]."),
    stall_rate=typer.Option(0.0, help="Stalls (retransmission timeouts) per second of transmission."),
    stall=typer.Option("200ms", help="Length of one stall."),
    seed=typer.Option(0, help="Seed for the Markov trace, jitter and stalls."),
)


def _evaluate(model: str, data: Optional[Path], samples: int, names: list[str], max_new_tokens: int = 24,
              skip: int = 0):
    """Run the eval harness with a progress bar; returns (rows, dataset)."""
    from rich.progress import Progress

    from channel.evaluation.harness import evaluate
    from channel.evaluation.squad import load_squad
    from common.models import load_model

    loaded = load_model(model)
    dataset = load_squad(data, limit=samples, skip=skip)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("samples x profiles", total=len(dataset) * len(names))
        rows = evaluate(loaded, dataset, names, max_new_tokens, progress=lambda: progress.advance(task))
    return rows, dataset


def _parse_profiles(text: str, model: Optional[str] = None, option: str = "--profiles") -> list:
    """The CLI's edge: comma-separated specs or presets become `Profile`s here, once (presets for `model`,
    default KVWIRE_MODEL). A bad one is a usage error (exit 2) naming `option`."""
    from common.profile import ProfileError
    from common.profile.presets import resolve

    names = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [resolve(name, model or _configured_model()) for name in names]
    except ProfileError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _profile_option(profile: str, profile_file: Optional[Path], model: str, allow_auto: bool = True):
    """`--profile` (a preset, compact text or JSON long form) or `--profile-file` (the long form as a JSON
    file) -> a Profile, or "auto"; a bad one is a usage error (exit 2) naming the option and the field."""
    import json

    from common.profile import ProfileError, parse_profile
    from common.profile.presets import AUTO

    if profile_file is not None:
        try:
            return parse_profile(json.loads(profile_file.read_text()))
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"{profile_file} is not JSON: {exc}", param_hint="--profile-file") from None
        except ProfileError as exc:
            raise typer.BadParameter(f"{profile_file}: {exc}", param_hint="--profile-file") from None
    if allow_auto and profile.strip().lower() == AUTO:
        return AUTO
    if profile.strip().startswith(("{", "[")):
        try:
            return parse_profile(profile)
        except ProfileError as exc:
            raise typer.BadParameter(str(exc), param_hint="--profile") from None
    return _parse_profiles(profile, model, "--profile")[0]


def _output(path: Optional[Path]) -> Optional[Path]:
    """A --json path's folder, made before any model work, so that a long run's results have somewhere to go."""
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise typer.BadParameter(f"cannot write {path}: {error}") from None
    return path


def JsonOption(help: str = "Write the results as JSON here.") -> Optional[Path]:  # noqa: N802 (an Option, as the others)
    return typer.Option(None, "--json", help=help + " Its folder is made if missing.", dir_okay=False, callback=_output)


ProfileFileOption = typer.Option(None, "--profile-file", exists=True, dir_okay=False,
                                 help="The profile's JSON long form ({\"stages\": [{\"stage\": \"int\", \"bits\": 4}]}), "
                                      "instead of --profile; `kvwire profiles` lists the stages and their fields.")
