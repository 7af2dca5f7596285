"""Segmented against whole-cache transfers of long contexts, over real gRPC through the shaping relay.

Each trial prefills one context at the edge, then sends its cache under every method across
a fresh connection whose link follows the same seeded trace (so methods are compared on the
same network). The deadline counts from the first frame to the cache being in place at the
receiver: the edge already holds the prefilled cache, as in CacheGen's setting. A transfer
still running at the deadline is cancelled (gRPC deadline) and scores 0; one in time scores
the F1 of its answer against the full-prompt answer.
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Callable

import grpc

from channel.evaluation.metrics import f1, summarize_groups
from channel.evaluation.squad import Sample
from channel.relay import BackgroundRelay
from common.kvstate import reference_generate
from common.link import link_from_options
from common.models import LoadedModel
from common.planner import load_table
from common.profile import Profile
from sender.adaptive import SegmentPlanner
from sender.client import Client
from sender.pipeline import Sender
from sender.prefill import prefill_prompt

SEGMENTS = "segments"


def run_trials(loaded: LoadedModel, target: str, samples: list[Sample], statics: list[Profile], deadlines: list[float],
               trials: int, segment_tokens: int, trace: str = "markov", delay: str = "10ms",
               initial_bps: float | None = None, max_new_tokens: int = 16, table: dict | None = None,
               progress: Callable[[], None] = lambda: None) -> list[dict]:
    table = table or load_table(loaded.name)
    rows = []
    for trial in range(trials):
        sample = samples[trial % len(samples)]
        pre = prefill_prompt(loaded, sample.context, sample.question, True, statics)  # once: every method sends it
        planner = SegmentPlanner(table, text_s_per_token=pre.seconds_per_token)
        full = loaded.tokenizer.decode(reference_generate(loaded.model, pre.prompt.ids, max_new_tokens),
                                       skip_special_tokens=True)
        for deadline in deadlines:
            for method in statics + [SEGMENTS]:
                make_link = functools.partial(link_from_options, None, trace, delay, seed=trial)
                with BackgroundRelay(target, make_link) as relay, Client(relay.target, timeout_s=deadline) as client:
                    sender = Sender(loaded, client)
                    start = time.perf_counter()
                    records, nbytes = [], 0
                    try:
                        if method == SEGMENTS:
                            sent = sender.transfer_segments(pre, planner, deadline, segment_tokens, initial_bps,
                                                            started=start, records=records)
                        else:
                            sent = sender.transfer(pre.kv, method)
                        seconds, nbytes, session = time.perf_counter() - start, sent.bytes_sent, sent.session_id
                    except grpc.RpcError as error:
                        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                            raise
                        seconds, session = time.perf_counter() - start, None
                    hit = session is not None and seconds <= deadline
                    fidelity = 0.0
                    if hit:
                        client.timeout_s = 300.0
                        answer = sender.generate(session, pre, sample.question, True, max_new_tokens).text
                        fidelity = f1(answer, full)
                rows.append({"trial": trial, "sample_id": sample.id, "tokens": pre.kv.seq_len, "deadline_s": deadline,
                             "method": str(method), "hit": hit, "fidelity": fidelity, "seconds": seconds, "bytes": nbytes,
                             # segments: what each was sent as (those planned before a miss, too)
                             "profiles": [r.profile for r in records] if method == SEGMENTS else [str(method)]})
                progress()
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (deadline, method): trials, hit rate, mean quality, bytes of the transfers that finished, and
    what the segments were sent as."""
    summaries = summarize_groups(rows, ["deadline_s", "method"],
                                 [("hit_rate", "mean", "hit"), ("mean_quality", "mean", "fidelity")])
    for summary in summaries:
        group = [r for r in rows if (r["deadline_s"], r["method"]) == (summary["deadline_s"], summary["method"])]
        summary["trials"] = summary.pop("n")
        sent_as = collections.Counter(profile for row in group for profile in row["profiles"])
        done = [r for r in group if r["bytes"]]
        summary["bytes_mean"] = sum(r["bytes"] for r in done) / max(1, len(done))
        summary["sent_as"] = {name: count / sum(sent_as.values()) for name, count in sent_as.most_common()}
    return summaries
