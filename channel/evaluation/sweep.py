"""`kvwire sweep`: profiles x links x samples, resumable, with the link time from the channel model.

Model work (prefill, select, encode, assemble, decode) runs once per (sample, profile);
every link point reuses it and adds the modeled transfer time of the same frames.
Points go to a JSONL file as they are made; a rerun skips (sample, profile) pairs whose
points are all there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from channel.evaluation.harness import EvalRow, evaluate
from channel.evaluation.metrics import summarize_groups
from channel.evaluation.squad import Sample
from common.link import link_from_options
from common.profile import Profile


def link_key(spec: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(spec.items()))


def link_specs(bandwidths: list[str], traces: list[str], delay: str) -> list[dict]:
    specs = [{"rate": b, "trace": "constant", "delay": delay} for b in bandwidths]
    specs += [{"rate": "", "trace": t, "delay": delay} for t in traces]
    return specs


def points_for(row: EvalRow, links: list[dict]) -> list[dict]:
    """One JSONL point per link: the row's model figures plus modeled link times and TTFT."""
    base = asdict(row)
    frames = base.pop("frame_bytes")
    points = []
    for spec in links:
        link = link_from_options(spec["rate"] or None, spec["trace"], spec["delay"])
        link_s = link.transfer_time(frames)
        text_link_s = link.transfer_time([row.text_bytes])
        receiver_s = row.assemble_s + row.inject_s + row.first_token_s
        points.append({
            **base, "link": link_key(spec), "rate": spec["rate"], "trace": spec["trace"],
            "link_s": link_s,
            # From the question to the first answer token, sender prefill included:
            "ttft_s": row.prefill_s + row.select_s + row.encode_s + link_s + receiver_s,
            # The same when the edge already holds the prefilled cache (a reused context):
            "ttft_cached_s": row.select_s + row.encode_s + link_s + receiver_s,
            "text_ttft_s": text_link_s + row.text_prefill_s,
        })
    return points


def load_done(path: Path) -> dict[tuple[str, str], set[str]]:
    done: dict[tuple[str, str], set[str]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                point = json.loads(line)
                done.setdefault((point["sample_id"], point["profile"]), set()).add(point["link"])
    return done


def _evaluate_one(args) -> list[EvalRow]:
    model, sample, profiles, max_new_tokens = args
    from common.models import load_model

    return evaluate(load_model(model), [sample], profiles, max_new_tokens)


def run_sweep(model: str, samples: list[Sample], profiles: list[Profile], links: list[dict], out: Path,
              max_new_tokens: int = 24, workers: int = 1, runner: str = "local",
              progress: Callable[[int], None] | None = None) -> int:
    """Append missing points to `out`; returns how many (sample, profile) pairs were computed."""
    done = load_done(out)
    wanted = {link_key(s) for s in links}
    jobs = []
    for sample in samples:
        todo = [p for p in profiles if not wanted <= done.get((sample.id, str(p)), set())]  # keyed by canonical names
        if todo:
            jobs.append((model, sample, todo, max_new_tokens))
    computed = 0
    with out.open("a") as handle:
        for rows in _run_jobs(jobs, workers, runner):
            for row in rows:
                missing = [s for s in links if link_key(s) not in done.get((row.sample_id, row.profile), set())]
                for point in points_for(row, missing):
                    handle.write(json.dumps(point) + "\n")
                computed += 1
            handle.flush()
            if progress:
                progress(len(rows))
    return computed


def _run_jobs(jobs: list, workers: int, runner: str):
    """Each job's rows as soon as it is done (any order), so points are written as they come."""
    if runner == "ray":
        yield from _ray_results(jobs, workers)
    elif workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            yield from pool.map(_evaluate_one, jobs)
    else:
        yield from map(_evaluate_one, jobs)


def _ray_results(jobs: list, workers: int):
    """Jobs as Ray tasks: on the cluster at RAY_ADDRESS if set, else on a local one of `workers` CPUs."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--runner ray needs the optional extra: pip install 'kvwire[ray]'") from None
    if not jobs:
        return
    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:  # "local": a fresh cluster, never one some other process started on this machine
            ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        evaluate_one = ray.remote(_evaluate_one)
        pending = [evaluate_one.remote(job) for job in jobs]
        while pending:
            (ready,), pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready)
    finally:
        if started:
            ray.shutdown()


def summarize(points: list[dict]) -> list[dict]:
    """Per (profile, link): means and 95% CIs of quality and time."""
    return summarize_groups(points, ["profile", "link"], [
        ("rate", "first", "rate"), ("trace", "first", "trace"),
        *((key, "mean_ci", key) for key in ("f1_gold", "fidelity_f1", "kl_first", "ttft_s", "ttft_cached_s",
                                             "text_ttft_s", "link_s")),
        ("bytes_mean", "mean", "bytes"), ("ratio_vs_fp16", "ratio", ("bytes", "fp16_bytes")),
        ("top1_agree", "mean", "top1_agree")])


def pareto_front(summaries: list[dict]) -> list[str]:
    """Profiles no other profile beats on both bytes and fidelity (first link's figures)."""
    by_profile = {}
    for s in summaries:
        by_profile.setdefault(s["profile"], s)
    front = []
    for name, s in by_profile.items():
        dominated = any(o["ratio_vs_fp16"] <= s["ratio_vs_fp16"] and o["fidelity_f1"] >= s["fidelity_f1"]
                        and (o["ratio_vs_fp16"], o["fidelity_f1"]) != (s["ratio_vs_fp16"], s["fidelity_f1"])
                        for o in by_profile.values())
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: by_profile[n]["ratio_vs_fp16"])


def best_at(summaries: list[dict], rate: str, deadline_s: float = 1.0) -> dict | None:
    """At a constant `rate`: the most faithful profile whose modeled link time meets `deadline_s`."""
    fits = [s for s in summaries if s["rate"] == rate and s["trace"] == "constant" and s["link_s"] <= deadline_s]
    return max(fits, key=lambda s: (s["fidelity_f1"], -s["bytes_mean"]), default=None)


def best_per_rate(summaries: list[dict], rates: list[str], deadline_s: float = 1.0) -> list[dict]:
    """One row per requested constant `rates` entry: `best_at`'s pick, or a row with an empty profile
    and the `reason` there is none (no points at that rate, or nothing fits `deadline_s`)."""
    rows = []
    for rate in rates:
        best = best_at(summaries, rate, deadline_s)
        at_rate = [s for s in summaries if s["rate"] == rate and s["trace"] == "constant"]
        if best is not None:
            rows.append({**best, "reason": ""})
        elif not at_rate:
            rows.append({"rate": rate, "profile": "", "reason": f"no points at {rate}"})
        else:
            quickest = min(at_rate, key=lambda s: s["link_s"])
            rows.append({"rate": rate, "profile": "",
                         "reason": f"no profile's transfer fits {deadline_s:g} s; the quickest, {quickest['profile']} "
                                   f"({quickest['bytes_mean']:,.0f} bytes), takes {quickest['link_s']:.2f} s"})
    return rows


def model_points(points: list[dict]) -> dict[tuple[str, str], dict]:
    """One point per (sample, profile): the model-side figures, the same for every link."""
    return {(p["sample_id"], p["profile"]): p for p in points}
