"""`kvwire loadtest`: many concurrent senders against one receiver, every answer checked."""

from __future__ import annotations

import contextlib
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from channel.evaluation.squad import Sample, load_squad
from channel.nodes import start_receiver_process
from channel.relay import BackgroundRelay, RelayProcess
from common import wire
from common.kvstate import greedy_decode
from common.link import link_from_options
from common.models import LoadedModel
from common.profile import Profile
from sender.client import Client
from sender.pipeline import Sender
from sender.prefill import Prefilled, prefill_prompt, select_tokens

# Retries back off exponentially up to 5 s, so 12 attempts wait about 40 s in all: long enough for
# a killed receiver to come back (its restart takes 5-20 s on a loaded 2-core machine).
RETRY_ATTEMPTS = 12


@dataclass
class LoadReport:
    transfers: int = 0
    ok: int = 0
    wrong_answers: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    bytes_sent: int = 0
    retries: int = 0  # RPCs sent again after a retryable failure (transfers, negotiations, generations)
    resends: int = 0  # caches sent again because the receiver lost the session (it restarted)
    seconds: float = 0.0
    receiver_peak_rss: int | None = None
    receiver_rss: dict = field(default_factory=dict)  # e.g. baseline and after the load, in bytes
    faults: list[dict] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict:
        return {
            "transfers": self.transfers, "ok": self.ok, "wrong_answers": self.wrong_answers,
            "lost": self.transfers - self.ok - self.wrong_answers, "errors": dict(self.errors), "retries": self.retries,
            "resends": self.resends, "completion": self.ok / self.transfers if self.transfers else 0.0,
            "seconds": self.seconds, "transfers_per_s": self.transfers / self.seconds if self.seconds else 0.0,
            "mb_per_s": self.bytes_sent / 1e6 / self.seconds if self.seconds else 0.0,
            "p50_s": self.percentile(0.50), "p95_s": self.percentile(0.95), "p99_s": self.percentile(0.99),
            "mean_s": statistics.fmean(self.latencies) if self.latencies else float("nan"),
            "receiver_peak_rss_mib": None if self.receiver_peak_rss is None else self.receiver_peak_rss / 2**20,
            **{f"receiver_rss_{name}_mib": value / 2**20 for name, value in self.receiver_rss.items()},
            "faults": self.faults,
        }


def _status_bytes(pid: int, key: str) -> int | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss(pid: int) -> int | None:
    """VmHWM of a process: the most resident memory it ever had."""
    return _status_bytes(pid, "VmHWM")


def rss(pid: int) -> int | None:
    """VmRSS of a process: its resident memory now."""
    return _status_bytes(pid, "VmRSS")


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
        frames = wire.encode(select_tokens(loaded, pre, profile), profile, loaded.fingerprint, context=loaded.codec_context)
        received = wire.decode(frames, loaded.fingerprint, device=loaded.device, context=loaded.codec_context)
        expected = greedy_decode(loaded.model, received.to_cache(loaded.config), pre.tail_ids, received.seq_len,
                                 max_new_tokens)
        prepared.append(Prepared(sample, pre, expected))
    return prepared


def run_load(target: str, loaded: LoadedModel, profile: Profile, prepared: list[Prepared], concurrency: int,
             transfers: int, max_new_tokens: int, progress=None, chaos: ChaosMonkey | None = None) -> LoadReport:
    """`transfers` asks from `concurrency` senders, each with its own connection, through the ask pipeline;
    `chaos` injects faults as the transfers complete."""
    report = LoadReport()
    lock = threading.Lock()
    counter = iter(range(transfers))

    def worker() -> None:
        with Client(target, timeout_s=300) as client:
            sender = Sender(loaded, client, attempts=RETRY_ATTEMPTS)
            while True:
                with lock:
                    index = next(counter, None)
                    if index is None:
                        report.retries += client.retries
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
                        report.resends += sent.resends
                    done = report.transfers
                if progress:
                    progress()
                if chaos:
                    chaos.progress(done)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.seconds = time.perf_counter() - start
    if chaos:
        chaos.join()
        report.faults = chaos.log
    return report


class ChaosMonkey:
    """Faults at given fractions of the transfers done: the receiver killed (and restarted by
    `restart`), and every connection through the relay reset mid-stream (`reset`). Each fault
    runs in its own thread, so the load goes on meanwhile."""

    def __init__(self, transfers: int, restart: Callable[[], None], reset: Callable[[], int],
                 kills_at: tuple[float, ...] = (0.3, 0.65), resets_at: tuple[float, ...] = (0.15, 0.5, 0.85)):
        self.restart, self.reset = restart, reset
        self.pending = sorted([(round(f * transfers), "kill") for f in kills_at]
                              + [(round(f * transfers), "reset") for f in resets_at])
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def progress(self, done: int) -> None:
        with self.lock:
            while self.pending and done >= self.pending[0][0]:
                thread = threading.Thread(target=self._fire, args=self.pending.pop(0))
                thread.start()
                self.threads.append(thread)

    def _fire(self, after: int, fault: str) -> None:
        start = time.perf_counter()
        detail = self.restart() if fault == "kill" else self.reset()
        with self.lock:
            self.log.append({"after_transfers": after, "fault": fault, "seconds": time.perf_counter() - start,
                             "detail": detail})

    def join(self) -> None:
        for thread in self.threads:
            thread.join()


class RestartableReceiver:
    """A receiver process on a fixed port that can be killed (SIGKILL) and started again."""

    def __init__(self, model: str, env: dict):
        self.model, self.env = model, env
        self.process, self.target = start_receiver_process(model, env, quiet=True)
        self.port = int(self.target.rsplit(":", 1)[1])
        self.restarts = 0

    def kill_and_restart(self) -> str:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process, _ = start_receiver_process(self.model, self.env, quiet=True, port=self.port)
        self.restarts += 1
        return f"pid {self.process.pid}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def run_chaos(model: str, loaded: LoadedModel, profile: Profile, prepared: list[Prepared], concurrency: int,
              transfers: int, max_new_tokens: int, env: dict, rate: str | None = None, ttl_s: float = 30.0,
              progress=None) -> LoadReport:
    """The load through the relay while the receiver is killed and restarted twice and the relay resets
    every connection three times; then the receiver's memory against its baseline.

    The baseline is the first receiver's resident memory after one ask; "after" is the last
    receiver's once the load is over and its sessions have expired (`ttl_s`).
    """
    env = {**env, "KVWIRE_SESSION_TTL_S": str(ttl_s)}
    receiver = RestartableReceiver(model, env)
    try:
        with BackgroundRelay(receiver.target, lambda: link_from_options(rate or "10gbit")) as relay, \
                Client(relay.target, timeout_s=300) as client:
            sender = Sender(loaded, client, attempts=RETRY_ATTEMPTS)
            probe = prepared[0]

            def ask_once() -> None:
                sender.ask(probe.sample.context, probe.sample.question, profile, True, max_new_tokens,
                           prefilled=probe.prefilled)

            ask_once()
            baseline = rss(receiver.process.pid)
            chaos = ChaosMonkey(transfers, receiver.kill_and_restart, relay.reset)
            report = run_load(relay.target, loaded, profile, prepared, concurrency, transfers, max_new_tokens,
                              progress, chaos)
            time.sleep(ttl_s + 1.0)
            ask_once()  # a transfer makes the store drop what expired
            report.receiver_rss = {"baseline": baseline, "after": rss(receiver.process.pid)}
            report.receiver_peak_rss = peak_rss(receiver.process.pid)
    finally:
        receiver.stop()
    return report


def run_plain(model: str, loaded: LoadedModel, profile: Profile, prepared: list[Prepared], concurrency: int,
              transfers: int, max_new_tokens: int, env: dict, rate: str | None = None, target: str | None = None,
              progress=None) -> LoadReport:
    """The load against `target`, or against a receiver process started for it; through the relay at `rate`."""
    process = None
    if target is None:
        process, target = start_receiver_process(model, env, quiet=True)
    try:
        with contextlib.ExitStack() as stack:
            if rate:
                # in a process of its own: the senders' threads would share this one's interpreter lock with its loop
                target = stack.enter_context(RelayProcess(target, rate=rate)).target
            report = run_load(target, loaded, profile, prepared, concurrency, transfers, max_new_tokens, progress)
        if process:
            report.receiver_peak_rss = peak_rss(process.pid)
    finally:
        if process:
            process.terminate()
            process.wait(timeout=30)
    return report
