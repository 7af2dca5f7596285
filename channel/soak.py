"""`kvwire bench soak`: honest transfers at a fixed concurrency while hostile clients loop over the
attacks of issue 31, against one receiver process on loopback.

Two phases in one run: the honest load alone (the baseline), then the same load beside the
attackers. Every honest answer is checked against the one its cache gives in process. A monitor
process probes `/healthz` and the gRPC health service throughout, and samples the receiver's
resident memory (at the end, once the sessions have expired, it is compared with the start) and
the machine's load average (other work on the cores stretches every latency). The attackers and
the monitor run in processes of their own, so neither shares the honest clients' interpreter lock
(their latencies would be the client's, not the receiver's).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from channel import hostile
from channel.loadtest import RETRY_ATTEMPTS, peak_rss, prepare, rss
from channel.nodes import free_port

PROBE_EVERY_S = 0.25


@dataclass
class Phase:
    """One phase's honest asks: latencies of the correct ones, and every other outcome by name."""

    name: str
    latencies: list[float] = field(default_factory=list)
    outcomes: dict = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def summary(self) -> dict:
        ordered = sorted(self.latencies)
        asks = sum(self.outcomes.values())

        def at(q: float) -> float | None:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

        return {"asks": asks, "correct": self.outcomes.get("ok", 0), "outcomes": dict(self.outcomes),
                "completion": self.outcomes.get("ok", 0) / asks if asks else 0.0,
                "p50_s": at(0.50), "p99_s": at(0.99), "max_s": ordered[-1] if ordered else None}


def honest_load(target: str, token: str, loaded, profile, prepared, concurrency: int, seconds: float,
                phase: Phase) -> None:
    """`concurrency` senders asking until `seconds` have passed, each answer checked."""
    from sender.client import Client
    from sender.pipeline import Sender

    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker(offset: int) -> None:
        import grpc

        with Client(target, timeout_s=120, token=token) as client:
            sender = Sender(loaded, client, attempts=RETRY_ATTEMPTS)
            index = offset
            while time.monotonic() < stop_at:
                job = prepared[index % len(prepared)]
                index += 1
                start = time.perf_counter()
                try:
                    result = sender.ask(job.sample.context, job.sample.question, profile, True, len(job.expected),
                                        prefilled=job.prefilled)
                    outcome = "ok" if result.token_ids == job.expected else "wrong_answer"
                except grpc.RpcError as error:
                    outcome = error.code().name
                elapsed = time.perf_counter() - start
                with lock:
                    phase.count(outcome)
                    if outcome == "ok":
                        phase.latencies.append(elapsed)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def monitor(pid: int, http_port: int, target: str, phases, results) -> None:
    """In its own process: probe health over HTTP and gRPC and sample the receiver's RSS until told to stop.
    `phases` (a shared string array) names the current phase; results gets per phase the worst figures."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    worst: dict[str, dict] = {}
    channel = grpc.insecure_channel(target)
    health = health_pb2_grpc.HealthStub(channel)
    url = f"http://127.0.0.1:{http_port}/healthz"
    while True:
        phase = phases.value.decode()
        if phase == "stop":
            break
        row = worst.setdefault(phase, {"healthz_max_s": 0.0, "grpc_health_max_s": 0.0, "probes": 0, "failed": 0,
                                       "rss_max_bytes": 0, "load1_max": 0.0})
        start = time.perf_counter()
        try:
            urllib.request.urlopen(url, timeout=5).read()
        except OSError:
            row["failed"] += 1
        row["healthz_max_s"] = max(row["healthz_max_s"], time.perf_counter() - start)
        start = time.perf_counter()
        try:
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            row["failed"] += 1
        row["grpc_health_max_s"] = max(row["grpc_health_max_s"], time.perf_counter() - start)
        row["rss_max_bytes"] = max(row["rss_max_bytes"], rss(pid) or 0)
        row["load1_max"] = max(row["load1_max"], os.getloadavg()[0])
        row["probes"] += 1
        time.sleep(PROBE_EVERY_S)
    channel.close()
    results.put(worst)


def start_receiver(model: str, env: dict) -> tuple[subprocess.Popen, str, int]:
    """`kvwire receiver serve` (gRPC and HTTP in one process) on free loopback ports."""
    from sender.client import Client

    port, http_port = free_port(), free_port()
    process = subprocess.Popen([sys.executable, "-m", "channel.cli", "receiver", "serve", "--host", "127.0.0.1",
                                "--port", str(port), "--http-port", str(http_port), "--model", model],
                               env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    try:
        with Client(target, token=env["KVWIRE_TOKEN"]) as client:
            client.wait_until_serving(600)
    except BaseException:
        process.kill()
        raise
    return process, target, http_port


def environment() -> dict:
    """Where and when the figures were taken: CPU, versions, date and commit."""
    import datetime
    import platform
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    return {"command": " ".join(["kvwire", *sys.argv[1:]]),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "device": "cpu", "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            **{name: version(name) for name in ("torch", "transformers", "grpcio", "protobuf")}}


def expire_sessions(http_port: int, token: str) -> int:
    """Ask the receiver for its sessions (which drops the expired ones); how many are left."""
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/sessions",
                                     headers={"authorization": f"Bearer {token}"})
    left = len(json.loads(urllib.request.urlopen(request, timeout=30).read())["sessions"])
    time.sleep(2.0)  # the memory is given back in a thread of the receiver's own
    return left


def run_soak(model: str = "smollm2-135m", profile_spec: str = "int8", concurrency: int = 8, attackers: int = 3,
             duration_s: float = 300.0, baseline_s: float = 120.0, samples: int = 8, max_new_tokens: int = 8,
             ttl_s: float = 20.0, idle_s: float = 5.0, budget_bytes: int = 1 << 30, progress=print) -> dict:
    """The soak's figures (see the module docstring); `progress(text)` hears each step."""
    from common.models import load_model
    from common.profile import parse_profile

    loaded = load_model(model)
    profile = parse_profile(profile_spec)
    progress(f"preparing {samples} honest prompts and their expected answers ({model}, {profile_spec})")
    prepared = prepare(loaded, profile, samples, max_new_tokens)
    token = secrets.token_hex(16)
    env = {"KVWIRE_TOKEN": token, "KVWIRE_SESSION_TTL_S": str(ttl_s), "KVWIRE_STREAM_IDLE_S": str(idle_s),
           "KVWIRE_SESSION_BUDGET_BYTES": str(budget_bytes)}
    process, target, http_port = start_receiver(model, env)
    context = multiprocessing.get_context("spawn")
    phases, results = context.Array("c", 16), context.Queue()
    phases.value = b"warmup"
    watcher = context.Process(target=monitor, args=(process.pid, http_port, target, phases, results), daemon=True)
    watcher.start()
    try:
        # The start: after the same honest load has run a while and its sessions expired (as at the end).
        honest_load(target, token, loaded, profile, prepared, concurrency, 20.0, Phase("warmup"))
        time.sleep(ttl_s + idle_s + 2)
        expire_sessions(http_port, token)
        rss_start = rss(process.pid)
        progress(f"baseline: {concurrency} honest senders for {baseline_s:.0f} s")
        baseline = Phase("baseline")
        phases.value = b"baseline"
        honest_load(target, token, loaded, profile, prepared, concurrency, baseline_s, baseline)
        progress(f"hostile: the same load beside {attackers} attackers for {duration_s:.0f} s")
        attacked = Phase("hostile")
        phases.value = b"hostile"
        materials = hostile.materials(loaded, target, token, idle_s)
        counts = context.Queue()
        attack = context.Process(target=hostile.attack, args=(materials, attackers, duration_s, counts), daemon=True)
        attack.start()
        honest_load(target, token, loaded, profile, prepared, concurrency, duration_s, attacked)
        attack.join(timeout=idle_s + 120)
        attacks = counts.get(timeout=30) if not attack.is_alive() else {"error": "attackers did not stop"}
        progress(f"waiting {ttl_s + idle_s + 2:.0f} s for the sessions to expire")
        phases.value = b"expiry"
        time.sleep(ttl_s + idle_s + 2)
        left = expire_sessions(http_port, token)
        rss_end = rss(process.pid)
        phases.value = b"stop"
        watcher.join(timeout=30)
        health = results.get(timeout=30)
        peak = peak_rss(process.pid)
    finally:
        phases.value = b"stop"
        process.terminate()
        process.wait(timeout=30)
    base, hot = baseline.summary(), attacked.summary()
    worst = health.get("hostile", {})
    return {
        "environment": environment(), "model": model, "profile": profile_spec, "concurrency": concurrency, "attackers": attackers,
        "duration_s": duration_s, "baseline_s": baseline_s, "session_ttl_s": ttl_s, "stream_idle_s": idle_s,
        "session_budget_bytes": budget_bytes, "baseline": base, "hostile": hot, "attacks": attacks,
        "health": health, "sessions_left_after_expiry": left,
        "rss_mib": {"start": rss_start / 2**20, "peak": peak / 2**20, "end": rss_end / 2**20},
        "goals": {
            "completion_100pct": hot["completion"] == 1.0 and base["completion"] == 1.0,
            "p99_ratio": (hot["p99_s"] / base["p99_s"]) if base["p99_s"] and hot["p99_s"] else None,
            "p99_within_2x": bool(base["p99_s"] and hot["p99_s"] and hot["p99_s"] <= 2 * base["p99_s"]),
            "worst_healthz_s": worst.get("healthz_max_s"), "worst_grpc_health_s": worst.get("grpc_health_max_s"),
            "health_within_250ms": max(worst.get("healthz_max_s", 1e9), worst.get("grpc_health_max_s", 1e9)) <= 0.25,
            "rss_end_vs_start": rss_end / rss_start,
            "rss_back_within_10pct": rss_end <= 1.10 * rss_start,
            "attacks_unknown_or_internal": sum(n for by_code in attacks.get("codes", {}).values()
                                               for code, n in by_code.items() if code in ("UNKNOWN", "INTERNAL")),
        },
    }
