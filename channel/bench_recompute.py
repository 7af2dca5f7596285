"""`kvwire bench gpu`'s "KV against recompute" table (issue 28): the time to a first token when the
receiver gets the context's cache, against recomputing it from the text on its own GPU.

For each context length and link rate, and for int4 and the frontier profiles (entropy-coded pca):
- recompute: the receiver tokenizes the prompt and prefills it; the first token comes with the prefill;
- the cache already at the sender (prefilled earlier, or stored): encode, send, the receiver's
  assembly and injection, the first token; `plain` encodes the whole cache before it sends, `streamed`
  sends each chunk as it is encoded;
- the sender prefilling on demand: `plain` is the prefill followed by the plain row above (derived,
  not run again), `pipelined` streams layer l while later layers prefill (`Sender.ask_pipelined`).

The model is `llama-3.1-8b-random`: Llama-3.1-8B's shape with RANDOM weights, and a PCA basis fitted on
that random model in seconds (`fit_random_basis`; every layer weight 1.0). Its speeds are the real
shape's; its byte ratios are not a real model's (a trained model's caches are more compressible, and
its basis is fitted on real text). Each row runs over real gRPC through the shaping relay, in a process of its
own (the sender's threads do not share its interpreter lock); a rate the relay cannot shape (above its measured
ceiling) is run unshaped and labelled so, never as that rate.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from common import wire
from common.link import parse_rate
from common.plan import CodecPlan
from common.profile import parse_profile
from common.settings import get_settings

FRONTIER = ("pca:b2:w:e:j", "pca:b1:w:e:j")  # about 12.5% and 6.25% of fp16 (bits per element of 16)
BASELINE = "int4"
CONTEXTS = (4096, 32768, 131072)
RATES = ("1gbit", "10gbit", "25gbit")
QUESTION = "Who gave their name to Normandy?"
SESSION_TTL_S = 1.0  # the receiver drops each cache a second after its answer: one 17 GB cache at a time
NOTES = ("weights are RANDOM (Llama-3.1-8B's shape, seeded): speeds and memory are the real shape's, answers mean nothing",
         "the PCA basis is fitted on the random model's own cache, every layer weight 1.0 (no KL weights)",
         "byte ratios of a random model are not a real model's: a trained model's cache, in a basis fitted on "
         "real text, codes differently (see results/frontier for SmolLM2's)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paragraphs() -> list[str]:
    """The embedded SQuAD subset's distinct paragraphs (about 11.5K tokens): varied text, so that the
    cache is not one paragraph repeated (which would code far better than any real document)."""
    from channel.evaluation.squad import load_squad

    return list(dict.fromkeys(s.context for s in load_squad(None, answerable_only=False)))


def text_of(tokenizer, tokens: int, start: int = 0) -> str:
    """At most `tokens` tokens (and nearly that many) of the paragraphs, cycled from the `start`-th."""
    parts = paragraphs()
    lengths = [len(tokenizer(text).input_ids) for text in parts]
    out, count, i = [], 0, start
    while count < tokens + 64:  # a little over (separators, merges at the joins), then cut to `tokens`
        out.append(parts[i % len(parts)])
        count += lengths[i % len(parts)] + 1
        i += 1
    ids = tokenizer("\n\n".join(out)).input_ids
    return tokenizer.decode(ids[:tokens])


PROMPT_ROOM = 128  # tokens of a context length left for the template, the question and the answer


def bench_text(tokenizer, tokens: int) -> str:
    """The benchmark's context, for a prompt of about `tokens` tokens that fits a model of that many
    positions: the paragraphs from the middle on (the basis is fitted from the first ones)."""
    return text_of(tokenizer, tokens - PROMPT_ROOM, len(paragraphs()) // 2)


def fit_random_basis(loaded, folder: Path, tokens: int = 4096, prompts: int = 2) -> dict:
    """Fit `loaded`'s PCA basis (keys RoPE-free, values, the joint transform; layer weights 1.0) on
    `prompts` prompts of `tokens` tokens in all, on its device, into `folder`, and use it: sets
    KVWIRE_BASIS_DIR for this process and the receivers it starts (common.models.load_basis)."""
    from channel.evaluation.basis import fit_unweighted
    from channel.evaluation.squad import Sample
    from common.models import fitted_basis_path

    folder.mkdir(parents=True, exist_ok=True)
    os.environ["KVWIRE_BASIS_DIR"] = str(folder)
    step = len(paragraphs()) // 2 // prompts  # each prompt its own stretch of the first half
    samples = [Sample(f"calibration-{i}", text_of(loaded.tokenizer, tokens // prompts, i * step), QUESTION, ())
               for i in range(prompts)]
    start = time.perf_counter()
    basis = fit_unweighted(loaded, samples, fitted_basis_path(loaded.name))
    sync(loaded.device)
    seconds = time.perf_counter() - start
    loaded.reload_basis()
    if loaded.codec_context.basis is None or loaded.codec_context.basis.digest != basis.digest:
        raise RuntimeError(f"the basis fitted into {folder} does not load for {loaded.name}")
    return {"digest": basis.digest, "path": str(fitted_basis_path(loaded.name)), "seconds": seconds,
            "tokens": basis.metadata["tokens"], "prompts": prompts, "layer_weights": "all 1.0 (no KL measured)",
            "joint": basis.joint is not None}


@torch.inference_mode()
def recompute(loaded, context: str, question: str, repeat: int = 1) -> dict:
    """The receiver's own way to a first token: tokenize the prompt, prefill it, take the first token
    (the prefill's last logits). The best of `repeat` runs; the peak memory of the device."""
    from common.prompts import build_prompt

    device = loaded.device
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        ids = build_prompt(loaded.tokenizer, context, question).ids
        tokenized = time.perf_counter()
        logits = loaded.model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1).logits
        int(logits[0, -1].argmax())
        sync(device)
        times.append((tokenized - start, time.perf_counter() - tokenized))
        del logits
    tokenize_s, prefill_s = min(times, key=sum)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"tokens": len(ids), "tokenize_s": tokenize_s, "prefill_first_token_s": prefill_s,
            "ttft_s": tokenize_s + prefill_s, "runs": repeat, "peak_gib": peak}


def links(rates: list[str], ceiling_bps: float) -> list[dict]:
    """The links to run, fastest first (the bytes of a profile are known before its slow rows are
    predicted): each rate the relay can shape, and one unshaped row for all the rates above its
    ceiling, labelled so. `direct` skips the relay."""
    out, above = [], []
    for rate in rates:
        if rate == "direct":
            out.append({"label": "direct (no relay)", "rate": None, "bps": None, "relay": False})
        elif parse_rate(rate) > ceiling_bps:
            above.append(rate)
        else:
            out.append({"label": rate, "rate": rate, "bps": parse_rate(rate), "relay": True})
    if above:
        out.append({"label": f"{'/'.join(above)} > ceiling: unshaped", "rate": "1000gbit", "bps": None, "relay": True,
                    "asked": above, "note": f"{', '.join(above)} exceed{'s' if len(above) == 1 else ''} the relay's measured ceiling of "
                                            f"{ceiling_bps / 1e9:.2f} Gbit/s: run unshaped, at what the relay carries"})
    return sorted(out, key=lambda link: -(link["bps"] or float("inf")))


def _failure(exc: BaseException) -> str:
    import grpc

    if isinstance(exc, torch.OutOfMemoryError):
        return f"out of memory: {str(exc).splitlines()[0][:160]}"
    if isinstance(exc, grpc.RpcError):
        return f"error: {exc.code().name}: {(exc.details() or '')[:200]}"
    return f"error: {type(exc).__name__}: {str(exc)[:200]}"


def at_sender_plain(asker, pre, question: str, profile: str) -> dict:
    """The cache at the sender: encode it whole, then send; the receiver assembles, injects, answers."""
    r = asker.ask("", question, profile, max_new_tokens=1, prefilled=pre)
    return {"agreed": r.profile, "bytes": r.bytes_sent, "fp16_bytes": r.fp16_bytes, "encode_s": r.encode_s,
            "send_s": r.transfer_s, "assemble_s": r.assemble_s, "inject_s": r.inject_s, "first_token_s": r.decode_s,
            "ttft_s": r.encode_s + r.transfer_s + r.inject_s + r.decode_s}


def at_sender_streamed(asker, pre, question: str, profile: str) -> dict:
    """The cache at the sender, each chunk sent as soon as it is encoded (encode inside send)."""
    from sender.prefill import select_tokens

    agreed, _ = asker.negotiate(profile)
    start = time.perf_counter()
    kv = select_tokens(asker.loaded, pre, agreed)
    frames = wire.encode(kv, agreed, asker.loaded.fingerprint, uuid.uuid4().hex, asker.zstd_level,
                         asker.loaded.codec_context, pre.head_ids, serialized=True)
    sent = asker.client.send_frames(frames)
    send_s = time.perf_counter() - start
    reply = asker.generate(sent.session_id, pre, question, True, 1, kv.seq_len)
    return {"agreed": str(agreed), "bytes": sent.bytes_sent, "fp16_bytes": pre.kv.fp16_nbytes, "encode_s": None,
            "send_s": send_s, "assemble_s": sent.assemble_s, "inject_s": reply.inject_seconds,
            "first_token_s": reply.decode_seconds, "ttft_s": send_s + reply.inject_seconds + reply.decode_seconds,
            "stream_s": sent.stream_s}


def on_demand_pipelined(asker, context: str, question: str, profile: str) -> dict:
    """The sender prefills on demand, layer l streaming while later layers prefill (Sender.ask_pipelined)."""
    try:
        r = asker.ask_pipelined(context, question, parse_profile(profile), max_new_tokens=1)
    except ValueError as exc:  # a profile the pipelined ask does not take
        return {"status": f"refused: {str(exc)[:200]}"}
    return {"agreed": r.profile, "bytes": r.bytes_sent, "fp16_bytes": r.fp16_bytes, "prefill_s": r.prefill_s,
            "encode_s": None, "send_s": r.transfer_s, "assemble_s": r.assemble_s, "inject_s": r.inject_s,
            "first_token_s": r.decode_s, "ttft_s": r.transfer_s + r.inject_s + r.decode_s, "stream_s": r.stream_s}


CASES = {"at sender, plain": at_sender_plain, "at sender, streamed": at_sender_streamed,
         "on demand, pipelined": on_demand_pipelined}


def _timed(fn, device: torch.device, repeat: int = 1):
    """fn()'s result and its wall time (the best of `repeat`), the device synchronized around it."""
    best, result = float("inf"), None
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return result, best


@torch.inference_mode()
def frontier_codec(loaded, kv, profiles: list[str], repeat: int = 2) -> list[dict]:
    """Encode and decode GB/s of the model's own cache `kv` (its dtype, bf16 on a GPU) under each
    profile, and the ratio to a device copy of the same tensors: `per layer`, each layer's codec in one
    call (the transform and quantization on the device, without entropy coding); `wire`, the frames
    (`wire.encode`: codes, entropy coding or zstd, CRC, host bytes) and their decoding onto the device
    (`wire.decode`, as a receiver assembles)."""
    device, context = loaded.device, loaded.codec_context
    nbytes = sum(k.nbytes + v.nbytes for k, v in zip(kv.keys, kv.values))
    _, copy_s = _timed(lambda: [(k.clone(), v.clone()) for k, v in zip(kv.keys, kv.values)], device, 3)
    limits = wire.Limits(max_frame_bytes=64 << 20, max_transfer_bytes=1 << 40, max_tokens=1 << 20)
    rows = []
    for spec in profiles:
        profile = parse_profile(spec).bind(context)
        base = {"tokens": kv.seq_len, "profile": str(profile), "input_bytes": nbytes, "dtype": str(kv.keys[0].dtype),
                "copy_gbps": nbytes / copy_s / 1e9}

        def row(launch, payload_bytes, encode_s, decode_s, **extra):
            rows.append({**base, "launch": launch, "payload_bytes": payload_bytes, "ratio_vs_fp16": payload_bytes / nbytes,
                         "encode_s": encode_s, "decode_s": decode_s, "encode_gbps": nbytes / encode_s / 1e9,
                         "decode_gbps": nbytes / decode_s / 1e9, "encode_vs_copy": copy_s / encode_s,
                         "decode_vs_copy": copy_s / decode_s, **extra})

        try:
            plan = CodecPlan.build(profile, context, kv.num_layers)
            layers = [(plan.codecs[i], k, v, p) for i, (k, v, p) in enumerate(zip(kv.keys, kv.values, kv.positions))]
            payloads, encode_s = _timed(lambda: [c.encode(k, v, p) for c, k, v, p in layers], device, repeat)
            _, decode_s = _timed(lambda: [c.decode(x, tuple(k.shape), p, k.dtype)
                                          for (c, k, v, p), x in zip(layers, payloads)], device, repeat)
            row("per layer", sum(x.numel() for x in payloads), encode_s, decode_s,
                note="transform + quantization on the device, no entropy coding" if plan.entropy_coded else "")
            del payloads
        except Exception as exc:  # noqa: BLE001 - a codec that cannot run here is a row, not the end of the bench
            rows.append({**base, "launch": "per layer", "status": _failure(exc)})
        try:
            frames, encode_s = _timed(lambda: list(wire.encode(kv, profile, loaded.fingerprint, None, 1, context)), device)
            decoded, decode_s = _timed(lambda: wire.decode(frames, loaded.fingerprint, limits,
                                                           wire.sliding_windows(loaded.config), device, context), device)
            row("wire", sum(wire.wire_bytes(f) for f in frames), encode_s, decode_s, frames=len(frames))
            del frames, decoded
        except Exception as exc:  # noqa: BLE001
            rows.append({**base, "launch": "wire", "status": _failure(exc)})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def receiver_env(max_tokens: int, device: str, dtype: str) -> dict:
    """A receiver for the table: room for the longest context, and each cache dropped a second after
    its answer (two 128K-token caches of an 8B model do not fit beside the sender's on one GPU)."""
    big = str(1 << 40)
    return {"KVWIRE_DEVICE": device, "KVWIRE_DTYPE": dtype, "KVWIRE_MAX_TOKENS": str(max(max_tokens + 1024, 32768)),
            "KVWIRE_MAX_TRANSFER_BYTES": big, "KVWIRE_SESSION_BUDGET_BYTES": big,
            "KVWIRE_MAX_FRAME_BYTES": str(16 << 20), "KVWIRE_SESSION_TTL_S": str(SESSION_TTL_S),
            **({"KVWIRE_BASIS_DIR": str(get_settings().basis_dir)} if get_settings().basis_dir else {})}


class Runner:
    """Runs the rows, skipping one whose predicted time passes `max_row_s` or the overall `deadline`
    (time.monotonic()); the prediction scales the same row's time at a shorter context, and takes
    the link time of the profile's bytes at this context where a faster row has measured them."""

    def __init__(self, loaded, target: str, max_row_s: float, deadline: float | None, say: Callable[[str], None]):
        self.loaded, self.target, self.max_row_s, self.deadline, self.say = loaded, target, max_row_s, deadline, say
        self.walls: dict[tuple, tuple[int, float]] = {}
        self.bytes: dict[tuple[str, int], int] = {}
        self.last_reply = 0.0

    def predict(self, key: tuple, profile: str, tokens: int, link: dict) -> float | None:
        guesses = []
        if key in self.walls:
            shorter, wall = self.walls[key]
            guesses.append(wall * tokens / shorter)
        if (profile, tokens) in self.bytes and link["bps"]:
            guesses.append(self.bytes[profile, tokens] * 8 / link["bps"])
        return max(guesses) if guesses else None

    def run(self, case: str, profile: str, tokens: int, link: dict, call: Callable, recompute_s: float) -> dict:
        from channel.relay import RelayProcess
        from sender.client import Client
        from sender.pipeline import Sender

        key = (case, profile, link["label"])
        row = {"tokens": tokens, "case": case, "profile": profile, "link": link["label"], "rate_bps": link["bps"],
               "recompute_s": recompute_s}
        predicted = self.predict(key, profile, tokens, link)
        if self.deadline is not None and time.monotonic() + (predicted or 0.0) > self.deadline:
            return {**row, "status": "not run: the bench's time budget (--budget-s) is spent"}
        if predicted is not None and predicted > self.max_row_s:
            return {**row, "status": f"skipped: predicted {predicted:.0f} s > --max-row-s {self.max_row_s:g}",
                    "predicted_s": predicted}
        # The receiver drops the last row's cache SESSION_TTL_S after its answer; wait for that at scale.
        if tokens >= 16384:
            time.sleep(max(0.0, self.last_reply + SESSION_TTL_S + 0.2 - time.monotonic()))
        start = time.perf_counter()
        try:
            relay = RelayProcess(self.target, rate=link["rate"]) if link["relay"] else None
            try:
                with Client(relay.target if relay else self.target, timeout_s=max(300.0, 3 * self.max_row_s)) as client:
                    result = call(Sender(self.loaded, client, zstd_level=1, attempts=1))
            finally:
                if relay:
                    relay.close()
        except Exception as exc:  # noqa: BLE001 - a row that fails is reported, and the table goes on
            result = {"status": _failure(exc)}
            if self.loaded.device.type == "cuda":
                torch.cuda.empty_cache()
        self.last_reply = time.monotonic()
        row.update(wall_s=time.perf_counter() - start, **result)
        if "status" not in row:
            row["status"] = "ok"
            row["ratio_vs_fp16"] = row["bytes"] / row["fp16_bytes"]
            row["vs_recompute"] = recompute_s / row["ttft_s"]
            if link["bps"]:
                row["link_s"] = row["bytes"] * 8 / link["bps"]
            self.bytes.setdefault((profile, tokens), row["bytes"])
        self.walls[key] = (tokens, row["wall_s"])
        self.say(describe(row))
        return row


def describe(row: dict) -> str:
    head = f"{row['tokens']} tokens, {row['case']}, {row['profile']}, {row['link']}: "
    if row["status"] != "ok":
        return head + row["status"]
    stages = ", ".join(f"{name} {row[key]:.3f}" for name, key in (
        ("prefill", "prefill_s"), ("encode", "encode_s"), ("send", "send_s"), ("assemble (in send)", "assemble_s"),
        ("inject", "inject_s"), ("1st token", "first_token_s")) if row.get(key) is not None)
    return head + (f"TTFT {row['ttft_s']:.3f} s ({row['vs_recompute']:.2f}x recompute's {row['recompute_s']:.3f} s), "
                   f"{row['bytes'] / 1e6:.1f} MB ({row['ratio_vs_fp16']:.2%} of fp16); {stages}; wall {row['wall_s']:.1f} s")


def recompute_all(loaded, contexts: list[int], say: Callable[[str], None] = print) -> dict[int, dict]:
    """Recompute's TTFT at each context length, from the bench's text. Run it before the receiver starts
    on the same GPU: a 128K-token prefill of the 8B shape peaks near 45 GiB, which does not fit beside a
    receiver that has already held a cache (issue 28's first H100 run ran out of memory there)."""
    recompute(loaded, text_of(loaded.tokenizer, 256), QUESTION)  # warm-up
    out = {}
    for tokens in contexts:
        rec = {"context": tokens, **recompute(loaded, bench_text(loaded.tokenizer, tokens), QUESTION,
                                              repeat=2 if tokens <= 32768 else 1)}
        say(f"{tokens} tokens: recompute from text {rec['ttft_s']:.3f} s (tokenize {rec['tokenize_s']:.3f}, "
            f"prefill + first token {rec['prefill_first_token_s']:.3f}; peak {rec['peak_gib'] or 0:.1f} GiB)")
        out[tokens] = rec
    return out


def kv_against_recompute(loaded, target: str, contexts: list[int], rates: list[str], profiles: list[str],
                         ceiling_bps: float, max_row_s: float = 60.0, budget_s: float | None = None,
                         codec_tokens: int | None = None, say: Callable[[str], None] = print,
                         checkpoint: Callable[[dict], None] | None = None,
                         recomputed: dict[int, dict] | None = None) -> dict:
    """The table, against a receiver at `target` (started with `receiver_env`, on the same device or another).
    `recomputed`: `recompute_all`'s records, taken before the receiver started (else measured here).
    `checkpoint(report)` after each row, so that a run cut short still leaves its rows."""
    from sender.prefill import prefill_prompt

    deadline = time.monotonic() + budget_s if budget_s else None
    runner = Runner(loaded, target, max_row_s, deadline, say)
    chosen = links(rates, ceiling_bps)
    report = {"notes": list(NOTES), "profiles": profiles, "contexts": contexts, "relay_ceiling_bps": ceiling_bps,
              "links": chosen, "question": QUESTION, "recompute": [], "rows": [], "codec": []}
    recomputed = recomputed or recompute_all(loaded, contexts, say)
    warm = prefill_prompt(loaded, text_of(loaded.tokenizer, 256), QUESTION)  # compile kernels, build tables
    direct = {"label": "warm-up", "rate": None, "bps": None, "relay": False}
    for profile in profiles:
        for case, call in CASES.items():
            args = (warm, QUESTION, profile) if case.startswith("at sender") else (text_of(loaded.tokenizer, 256),
                                                                                   QUESTION, profile)
            runner.run(case, profile, 256, direct, lambda asker, f=call, a=args: f(asker, *a), 1.0)
    runner.walls.clear()
    del warm
    for tokens in contexts:
        context = bench_text(loaded.tokenizer, tokens)
        rec = recomputed[tokens]
        report["recompute"].append(rec)
        recompute_s = rec["ttft_s"]
        pre = prefill_prompt(loaded, context, QUESTION)
        if loaded.device.type == "cuda":  # the prefill's working memory back, for the receiver on the same GPU
            torch.cuda.empty_cache()
        say(f"{tokens} tokens: the sender's prefill {pre.seconds:.3f} s ({pre.kv.seq_len} tokens cached)")
        if codec_tokens == tokens:
            for row in frontier_codec(loaded, pre.kv, profiles):
                report["codec"].append(row)
                say(f"codec {row['profile']} {row['launch']}: " + (row.get("status") or
                    f"encode {row['encode_gbps']:.1f} GB/s ({row['encode_vs_copy']:.3f}x copy), decode "
                    f"{row['decode_gbps']:.1f} GB/s ({row['decode_vs_copy']:.3f}x copy)"))
        plain = []
        for case in ("at sender, plain", "at sender, streamed"):
            for profile in profiles:
                for link in chosen:
                    row = runner.run(case, profile, tokens, link,
                                     lambda asker, c=CASES[case], p=profile: c(asker, pre, QUESTION, p), recompute_s)
                    report["rows"].append(row)
                    if checkpoint:
                        checkpoint(report)
                    if case == "at sender, plain":
                        plain.append(row)
        for row in plain:  # the prefill, then the plain transfer: sequential, so derived rather than run again
            derived = {**row, "case": "on demand, plain (derived)", "prefill_s": pre.seconds}
            if row["status"] == "ok":
                derived.update(ttft_s=pre.seconds + row["ttft_s"], vs_recompute=recompute_s / (pre.seconds + row["ttft_s"]))
            report["rows"].append(derived)
        del pre
        if loaded.device.type == "cuda":
            torch.cuda.empty_cache()
        for profile in profiles:
            for link in chosen:
                report["rows"].append(runner.run(
                    "on demand, pipelined", profile, tokens, link,
                    lambda asker, p=profile: on_demand_pipelined(asker, context, QUESTION, p), recompute_s))
                if checkpoint:
                    checkpoint(report)
    against_link_and_prefill(report["rows"], ceiling_bps)
    return report


def against_link_and_prefill(rows: list[dict], ceiling_bps: float | None) -> None:
    """Each on-demand row's TTFT against its bytes' time on the link plus the sender's prefill (issue 28's int4
    goal: within 1.2x), as `vs_link_plus_prefill`, with `link_gbps`: the shaped rate, or the relay's ceiling for a
    row the relay ran unshaped."""
    for row in rows:
        rate = row.get("rate_bps") or ceiling_bps
        if row["status"] == "ok" and row.get("prefill_s") is not None and rate:
            row["link_gbps"] = rate / 1e9
            row["vs_link_plus_prefill"] = row["ttft_s"] / (row["bytes"] * 8 / rate + row["prefill_s"])


def _s(value) -> str:
    return "" if value is None else f"{value:.3f}"


def print_report(console, report: dict) -> None:
    """The table as a person reads it: per context, recompute, then each case, profile and link."""
    from rich.table import Table

    for note in report["notes"]:
        console.print(f"[bold]note:[/bold] {note}")
    if report.get("receiver_device"):
        sender, receiver = report["sender_device"], report["receiver_device"]
        console.print(f"nodes: the sender on {sender}, the receiver on {receiver}"
                      + (" (one device for both)" if sender == receiver else ""))
    ceilings = report.get("ceilings", {})
    for name, bps in ceilings.items():
        console.print(f"ceiling: {name} {bps / 1e9:.2f} Gbit/s")
    for link in report.get("links", []):
        if link.get("note"):
            console.print(f"[bold]link:[/bold] {link['note']}")
    if report.get("basis"):
        b = report["basis"]
        console.print(f"basis {b['digest']}: fitted on {b['tokens']} tokens of the random model's cache in "
                      f"{b['seconds']:.1f} s; layer weights {b['layer_weights']}; joint transform {b['joint']}")
    if report["codec"]:
        table = Table(title="frontier codec on the model's own cache (bf16 on a GPU): GB/s of input, and x a device copy")
        for column in ("tokens", "profile", "launch", "% fp16", "copy GB/s", "encode GB/s", "x copy", "decode GB/s",
                       "x copy"):
            table.add_column(column, justify="right")
        for r in report["codec"]:
            if "status" in r:
                table.add_row(str(r["tokens"]), r["profile"], r["launch"], r["status"], *[""] * 5)
                continue
            table.add_row(str(r["tokens"]), r["profile"], r["launch"], f"{r['ratio_vs_fp16']:.2%}", f"{r['copy_gbps']:.0f}",
                          f"{r['encode_gbps']:.2f}", f"{r['encode_vs_copy']:.3f}", f"{r['decode_gbps']:.2f}",
                          f"{r['decode_vs_copy']:.3f}")
        console.print(table)
    for rec in report["recompute"]:
        rows = [r for r in report["rows"] if r["tokens"] == rec["context"]]
        table = Table(title=f"KV against recompute, {rec['tokens']} tokens: recompute from text "
                            f"{rec['ttft_s']:.3f} s (prefill + first token; seconds below)")
        for column in ("case", "profile", "link", "MB", "% fp16", "prefill", "encode", "send", "(assemble)", "inject",
                       "1st token", "TTFT", "x faster"):
            table.add_column(column, justify="right")
        for r in rows:
            if r["status"] != "ok":
                table.add_row(r["case"], r["profile"], r["link"], r["status"], *[""] * 9)
                continue
            table.add_row(r["case"], r["profile"], r["link"], f"{r['bytes'] / 1e6:.1f}", f"{r['ratio_vs_fp16']:.2%}",
                          _s(r.get("prefill_s")), _s(r.get("encode_s")) or "(in send)", _s(r["send_s"]),
                          _s(r["assemble_s"]), _s(r["inject_s"]), _s(r["first_token_s"]), _s(r["ttft_s"]),
                          f"{r['vs_recompute']:.2f}")
        console.print(table)
        for r in rows:
            if "vs_link_plus_prefill" in r:
                console.print(f"{r['case']}, {r['profile']}, {r['link']}: TTFT {r['vs_link_plus_prefill']:.2f}x its "
                              f"bytes' time at {r['link_gbps']:.2f} Gbit/s plus the sender's prefill")
