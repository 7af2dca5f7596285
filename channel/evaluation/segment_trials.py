"""Segmented against whole-cache transfers of long contexts, over real gRPC through the shaping relay.

Each trial prefills one context at the edge, then sends its cache under every method across
a fresh connection whose link follows the same seeded trace (so methods are compared on the
same network). The deadline counts from the first frame to the cache being in place at the
receiver: the edge already holds the prefilled cache, as in CacheGen's setting. A transfer
still running at the deadline is cancelled (gRPC deadline) and scores 0; one in time scores
the F1 of its answer against the full-prompt answer.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import grpc

from common.link import link_from_options
from channel.evaluation.metrics import f1
from channel.evaluation.squad import Sample
from common.kvstate import reference_generate
from common.models import LoadedModel
from common.planner import load_table
from channel.relay import BackgroundRelay
from sender.adaptive import SegmentPlanner, send_segments
from sender.client import Client
from sender.prefill import prefill_prompt

SEGMENTS = "segments"


def run_trials(loaded: LoadedModel, target: str, samples: list[Sample], statics: list[str], deadlines: list[float],
               trials: int, segment_tokens: int, trace: str = "markov", delay: str = "10ms",
               initial_bps: float | None = None, max_new_tokens: int = 16, table: dict | None = None,
               progress: Callable[[], None] = lambda: None) -> list[dict]:
    table = table or load_table(loaded.name)
    rows = []
    for trial in range(trials):
        sample = samples[trial % len(samples)]
        pre = prefill_prompt(loaded, sample.context, sample.question)
        planner = SegmentPlanner(table, text_s_per_token=pre.seconds_per_token)
        full = loaded.tokenizer.decode(reference_generate(loaded.model, pre.prompt.ids, max_new_tokens),
                                       skip_special_tokens=True)
        for deadline in deadlines:
            for method in statics + [SEGMENTS]:
                make_link = functools.partial(link_from_options, None, trace, delay, seed=trial)
                with BackgroundRelay(target, make_link) as relay, Client(relay.target, timeout_s=deadline) as client:
                    start = time.perf_counter()
                    records, nbytes = [], 0
                    try:
                        if method == SEGMENTS:
                            sent = send_segments(client, pre.kv, pre.cache_ids, loaded.fingerprint, planner, deadline,
                                                 segment_tokens, initial_bps, started=start, records=records)
                        else:
                            sent = client.transfer(pre.kv, method, loaded.fingerprint)
                        seconds, nbytes, session = time.perf_counter() - start, sent.bytes_sent, sent.session_id
                    except grpc.RpcError as error:
                        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                            raise
                        seconds, session = time.perf_counter() - start, None
                    hit = session is not None and seconds <= deadline
                    fidelity = 0.0
                    if hit:
                        client.timeout_s = 300.0
                        answer = client.generate(session, token_ids=pre.tail_ids, max_new_tokens=max_new_tokens).text
                        fidelity = f1(answer, full)
                rows.append({"trial": trial, "sample_id": sample.id, "tokens": pre.kv.seq_len, "deadline_s": deadline,
                             "method": method, "hit": hit, "fidelity": fidelity, "seconds": seconds, "bytes": nbytes,
                             # segments: what each was sent as (those planned before a miss, too)
                             "profiles": [r.profile for r in records] if method == SEGMENTS else [method]})
                progress()
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[float, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["deadline_s"], row["method"]), []).append(row)
    summary = []
    for (deadline, method), group in groups.items():
        sent_as: dict[str, int] = {}
        for row in group:
            for profile in row["profiles"]:
                sent_as[profile] = sent_as.get(profile, 0) + 1
        total = sum(sent_as.values())
        done = [r for r in group if r["bytes"]]
        summary.append({"deadline_s": deadline, "method": method, "trials": len(group),
                        "hit_rate": sum(r["hit"] for r in group) / len(group),
                        "mean_quality": sum(r["fidelity"] for r in group) / len(group),
                        "bytes_mean": sum(r["bytes"] for r in done) / max(1, len(done)),  # transfers that finished
                        "sent_as": {k: v / total for k, v in sorted(sent_as.items(), key=lambda kv: -kv[1])}})
    return summary
