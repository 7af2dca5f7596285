"""`kvwire longcontext`: needle-in-a-haystack and multi-key retrieval at set context lengths, per profile."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from channel.cli.app import (
    DeviceOption,
    DtypeOption,
    JsonOption,
    ModelOption,
    _parse_profiles,
    app,
    console,
    use_device,
)


def _numbers(text: str, kind, option: str) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=option) from None


@app.command("longcontext")
def longcontext_command(
    lengths: str = typer.Option("4096,16384,32768", help="Context lengths in the model's tokens."),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="Needle depths (fraction of the context before it)."),
    multikey: int = typer.Option(5, min=0, help="Multi-key retrieval samples per length."),
    keys: int = typer.Option(4, min=2, help="Needles per multi-key sample (one is asked)."),
    profiles: str = typer.Option("fp16,int4:g32,snapkv:0.25+fp16,q2c:0.25+fp16", help="Comma-separated profiles."),
    seed: int = typer.Option(0, help="Seeds the needles' keys, values, places and the filler's start."),
    max_new_tokens: int = typer.Option(16, min=1, max=512),
    json_path: Optional[Path] = JsonOption("Write the summary and per-sample rows."),
    model: str = ModelOption,
    device: Optional[str] = DeviceOption,
    dtype: Optional[str] = DtypeOption,
) -> None:
    """Long-context retrieval generated locally (no download): accuracy is the share of answers holding the
    needle's value, for each profile and for the full cache, per task and context length."""
    use_device(device, dtype)
    import json

    from rich.progress import Progress
    from rich.table import Table

    from channel.evaluation.harness import evaluate, rows_as_dicts
    from channel.evaluation.longcontext import Haystack, multikey_samples, needle_samples, summarize
    from common.models import load_model

    parsed = _parse_profiles(profiles)
    token_lengths = _numbers(lengths, int, "--lengths")
    needle_depths = _numbers(depths, float, "--depths")
    loaded = load_model(model)
    positions = getattr(loaded.config.get_text_config(), "max_position_embeddings", None)
    if positions and max(token_lengths) + 256 > positions:  # the prompt's template, question and answer need room
        raise typer.BadParameter(f"{max(token_lengths)} tokens of context leave no room in {model}'s "
                                 f"{positions} positions (max_position_embeddings): give at most {positions - 256}",
                                 param_hint="--lengths")
    haystack = Haystack(loaded.tokenizer)
    try:
        samples = [s for tokens in token_lengths for s in needle_samples(haystack, tokens, needle_depths, seed)
                   + multikey_samples(haystack, tokens, multikey, keys, seed)]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("samples x profiles", total=len(samples) * len(parsed))
        rows = evaluate(loaded, samples, parsed, max_new_tokens, progress=lambda: progress.advance(task))
    summary = summarize(rows, samples)
    table = Table(title=f"{model}: long-context retrieval, accuracy = answer holds the needle's value")
    for column in ("task", "tokens", "profile", "n", "accuracy", "full cache", "fidelity F1", "bytes / fp16"):
        table.add_column(column, justify="right")
    for row in summary:
        table.add_row(row["task"], str(row["tokens"]), row["profile"], str(row["samples"]), f"{row['accuracy']:.3f}",
                      f"{row['full_cache_accuracy']:.3f}", f"{row['fidelity_f1']:.3f}", f"{row['ratio_vs_fp16']:.4f}")
    console.print(table)
    if json_path:
        json_path.write_text(json.dumps({"model": model, "device": str(loaded.device), "dtype": str(loaded.model.dtype),
                                         "lengths": token_lengths, "depths": needle_depths, "multikey": multikey,
                                         "keys": keys, "seed": seed, "summary": summary,
                                         "samples": rows_as_dicts(rows)}, indent=2))
        console.print(f"wrote {json_path}")
