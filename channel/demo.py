"""`kvwire demo`: a receiver on loopback, the sender, and SQuAD questions through real gRPC."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from channel.evaluation.metrics import best_f1, f1, summarize_groups
from channel.evaluation.squad import Sample
from channel.nodes import local_receiver
from channel.relay import BackgroundRelay
from common.kvstate import reference_generate
from common.models import load_model
from common.profile import Profile, ProfileError
from common.settings import get_settings
from sender.client import Client
from sender.pipeline import Sender


@dataclass
class DemoRow:
    id: str
    profile: str
    question: str
    gold: str
    local_answer: str
    transfer_answer: str
    tokens_match: bool
    seq_len: int
    bytes_on_wire: int
    raw_fp16_bytes: int
    f1_gold: float
    fidelity_f1: float
    prefill_s: float
    encode_s: float
    transfer_s: float
    inject_s: float
    decode_s: float


def _fitting(profiles: list[Profile], loaded, console: Console) -> list[Profile]:
    """The profiles this model can take (per-layer stages on layers it has; a text head only without
    sliding-window layers); the others are left out, said so."""
    kept = []
    for profile in profiles:
        try:
            profile.check_layers(loaded.fingerprint.num_layers)
            if profile.text_head and loaded.sliding_layers:
                raise ProfileError("a text head is prefilled before the cache, and sliding-window layers keep only "
                                   "their window (send the question alone as text: text:q)")
            kept.append(profile)
        except ProfileError as error:
            console.print(f"[yellow]left out {profile}: {error}[/yellow]")
    return kept


def run_demo(samples: list[Sample], model: str, profiles: list[Profile], query_aware: bool, max_new_tokens: int,
             console: Console, link_factory=None, target: str | None = None) -> list[DemoRow]:
    """Prefill each sample once, ask under every profile, and compare with local generation.

    With `link_factory`, every transfer crosses the shaping relay (`kvwire channel`) on its way.
    With `target`, a running receiver (or relay) is used instead of a local one.
    """
    rows = []
    with contextlib.ExitStack() as stack:
        if target is None:
            target = stack.enter_context(local_receiver(model))
            if link_factory is not None:
                target = stack.enter_context(BackgroundRelay(target, link_factory)).target
        client = stack.enter_context(Client.from_settings(get_settings(), target))
        client.wait_until_serving()
        loaded = load_model(model)
        sender = Sender(loaded, client)
        profiles = _fitting(profiles, loaded, console)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("questions x profiles", total=len(samples) * len(profiles))
            for sample in samples:
                pre = sender.prefill(sample.context, sample.question, query_aware, profiles)
                local = reference_generate(loaded.model, pre.prompt.ids, max_new_tokens)
                local_text = loaded.tokenizer.decode(local, skip_special_tokens=True)
                for profile in profiles:
                    asked = sender.ask(sample.context, sample.question, profile, query_aware, max_new_tokens,
                                       prefilled=pre)
                    answer = loaded.tokenizer.decode(asked.token_ids, skip_special_tokens=True)
                    rows.append(DemoRow(
                        id=sample.id, profile=asked.profile, question=sample.question, gold=sample.answers[0],
                        local_answer=local_text, transfer_answer=answer, tokens_match=asked.token_ids == local,
                        seq_len=asked.seq_len, bytes_on_wire=asked.bytes_sent, raw_fp16_bytes=asked.fp16_bytes,
                        f1_gold=best_f1(answer, sample.answers), fidelity_f1=f1(answer, local_text),
                        prefill_s=asked.prefill_s, encode_s=asked.encode_s, transfer_s=asked.transfer_s,
                        inject_s=asked.inject_s, decode_s=asked.decode_s,
                    ))
                    progress.advance(task)
    return rows


SUMMARY_STATS = (
    ("token_match_rate", "mean", "tokens_match"), ("bytes_mean", "mean", "bytes_on_wire"),
    ("bytes_per_token", "ratio", ("bytes_on_wire", "seq_len")),
    ("ratio_vs_fp16", "ratio", ("bytes_on_wire", "raw_fp16_bytes")),
    (("f1_gold_mean", "f1_gold_ci95"), "mean_ci", "f1_gold"),
    (("fidelity_f1_mean", "fidelity_f1_ci95"), "mean_ci", "fidelity_f1"),
    *((f"{key}_mean", "mean", key) for key in ("prefill_s", "encode_s", "transfer_s", "inject_s", "decode_s")),
)


def summarize_by_profile(rows: list[DemoRow]) -> list[dict]:
    """Per profile, in first-seen order: token match, bytes, quality with 95% intervals, stage times."""
    return summarize_groups(rows, ["profile"], SUMMARY_STATS)


def _clip(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def plot(summaries: list[dict], path: Path, link: str) -> None:
    """Fidelity against bytes, and against transfer time, one point per profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for s in summaries:
        for ax, x in zip(axes, (s["ratio_vs_fp16"], s["transfer_s_mean"])):
            ax.errorbar(x, s["fidelity_f1_mean"], yerr=s["fidelity_f1_ci95"], marker="o", capsize=3, label=s["profile"])
    axes[0].set_xlabel("bytes on the wire / fp16 KV bytes")
    axes[1].set_xlabel(f"transfer time (s), {link}")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_ylabel("fidelity F1 (vs local full-prompt answer)")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    rows = -(-len(labels) // 2)
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)  # below the plots: long specs cover no point
    fig.suptitle("kvwire demo: accuracy against bytes and time")
    fig.tight_layout(rect=(0, min(0.5, 0.045 * rows + 0.01), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows: list[DemoRow], console: Console, json_path: Path | None, plot_path: Path | None = None,
           link: str = "loopback") -> dict:
    summaries = summarize_by_profile(rows)
    first = [r for r in rows if r.profile == summaries[0]["profile"]]
    table = Table(title=f"kvwire demo: {summaries[0]['profile']} over gRPC ({link}), answer via transfer vs local generate")
    for column in ("question", "gold", "local answer", "via transfer", "match", "bytes", "prefill s", "encode+send s", "decode s"):
        table.add_column(column)
    for r in first:
        table.add_row(_clip(r.question, 40), _clip(r.gold, 24), _clip(r.local_answer), _clip(r.transfer_answer),
                      "yes" if r.tokens_match else "NO", f"{r.bytes_on_wire:,}", f"{r.prefill_s:.2f}",
                      f"{r.encode_s + r.transfer_s:.3f}", f"{r.inject_s + r.decode_s:.2f}")
    console.print(table)
    fp16_per_token = first[0].raw_fp16_bytes / first[0].seq_len
    table = Table(title=f"accuracy against bytes and time ({summaries[0]['n']} questions over {link}; "
                        f"raw fp16 KV is {fp16_per_token:,.0f} B/token)")
    for column in ("profile", "token match", "fidelity F1", "F1 vs gold", "B/token", "vs fp16", "encode s", "send s", "decode s"):
        table.add_column(column, justify="left" if column == "profile" else "right")
    for s in summaries:
        table.add_row(s["profile"], f"{s['token_match_rate']:.0%}", f"{s['fidelity_f1_mean']:.3f} ± {s['fidelity_f1_ci95']:.3f}",
                      f"{s['f1_gold_mean']:.3f} ± {s['f1_gold_ci95']:.3f}", f"{s['bytes_per_token']:,.0f}",
                      f"{s['ratio_vs_fp16']:.3f}", f"{s['encode_s_mean']:.3f}", f"{s['transfer_s_mean']:.3f}",
                      f"{s['inject_s_mean'] + s['decode_s_mean']:.2f}")
    console.print(table)
    result = {**summaries[0], "link": link, "profiles": summaries, "samples": [asdict(r) for r in rows]}
    if plot_path:
        plot(summaries, plot_path, link)
        console.print(f"wrote {plot_path}")
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {json_path}")
    return result
