"""`kvwire loadtest`: many concurrent senders against one receiver, every answer checked."""

from __future__ import annotations

import statistics
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from channel.evaluation.squad import Sample, load_squad
from channel.nodes import start_receiver_process
from common import wire
from common.kvstate import greedy_decode
from common.models import LoadedModel
from common.profile import Profile
from sender.client import Client
from sender.pipeline import Sender
from sender.prefill import Prefilled, prefill_prompt, select_tokens


@dataclass
class LoadReport:
    transfers: int = 0
    ok: int = 0
    wrong_answers: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    bytes_sent: int = 0
    retries: int = 0
    seconds: float = 0.0
    receiver_peak_rss: int | None = None

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict:
        return {
            "transfers": self.transfers, "ok": self.ok, "wrong_answers": self.wrong_answers,
            "lost": self.transfers - self.ok - self.wrong_answers, "errors": dict(self.errors), "retries": self.retries,
            "seconds": self.seconds, "transfers_per_s": self.transfers / self.seconds if self.seconds else 0.0,
            "mb_per_s": self.bytes_sent / 1e6 / self.seconds if self.seconds else 0.0,
            "p50_s": self.percentile(0.50), "p95_s": self.percentile(0.95), "p99_s": self.percentile(0.99),
            "mean_s": statistics.fmean(self.latencies) if self.latencies else float("nan"),
            "receiver_peak_rss_mib": None if self.receiver_peak_rss is None else self.receiver_peak_rss / 2**20,
        }


def peak_rss(pid: int) -> int | None:
    """VmHWM of a process: the most resident memory it ever had."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Prepared:
    sample: Sample
    prefilled: Prefilled
    expected: list[int]  # the answer this profile gives in process


def prepare(loaded: LoadedModel, profile: Profile, samples: int, max_new_tokens: int) -> list[Prepared]:
    """Each sample's prefill and the answer tokens its compressed cache gives in process, computed once."""
    prepared = []
    for sample in load_squad(limit=samples):
        pre = prefill_prompt(loaded, sample.context, sample.question, True, [profile])
        frames = wire.encode(select_tokens(loaded, pre, profile), profile, loaded.fingerprint)
        received = wire.decode(frames, loaded.fingerprint)
        expected = greedy_decode(loaded.model, received.to_cache(loaded.config), pre.tail_ids, received.seq_len,
                                 max_new_tokens)
        prepared.append(Prepared(sample, pre, expected))
    return prepared


def run_load(target: str, loaded: LoadedModel, profile: Profile, prepared: list[Prepared], concurrency: int,
             transfers: int, max_new_tokens: int, progress=None) -> LoadReport:
    """`transfers` asks from `concurrency` senders, each with its own connection, through the ask pipeline."""
    report = LoadReport()
    lock = threading.Lock()
    counter = iter(range(transfers))

    def worker() -> None:
        with Client(target, timeout_s=300) as client:
            sender = Sender(loaded, client, attempts=8)
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                job = prepared[index % len(prepared)]
                start = time.perf_counter()
                try:
                    sent = sender.ask(job.sample.context, job.sample.question, profile, True, max_new_tokens,
                                      prefilled=job.prefilled)
                    outcome = "ok" if sent.token_ids == job.expected else "wrong"
                except grpc.RpcError as error:
                    outcome, sent = error.code().name, None
                elapsed = time.perf_counter() - start
                with lock:
                    report.transfers += 1
                    if outcome == "ok":
                        report.ok += 1
                        report.latencies.append(elapsed)
                    elif outcome == "wrong":
                        report.wrong_answers += 1
                    else:
                        report.errors[outcome] += 1
                    if sent is not None:
                        report.bytes_sent += sent.bytes_sent
                        report.retries += sent.attempts - 1
                if progress:
                    progress()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.seconds = time.perf_counter() - start
    return report


def start_receiver(model: str, budget_bytes: int) -> tuple[subprocess.Popen, str]:
    return start_receiver_process(model, {"KVWIRE_SESSION_BUDGET_BYTES": str(budget_bytes)}, quiet=True)
