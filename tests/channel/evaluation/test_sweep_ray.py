"""`kvwire sweep --runner ray` on a local Ray cluster of two workers gives the local runner's points.

Ray is a CI dependency here (pip install -e '.[dev,ray]'): without it this test fails, it does not skip.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys

import torch

from channel.evaluation import sweep
from channel.evaluation.squad import load_squad
from common.profile import parse_profile

PROFILES = ["fp16", "q2c:0.5+int4:g32"]
# Measured wall-clock times differ from run to run; everything else in a point must not.
TIMINGS = {"prefill_s", "select_s", "encode_s", "assemble_s", "inject_s", "first_token_s", "decode_s",
           "text_prefill_s", "ttft_s", "ttft_cached_s", "text_ttft_s"}


def by_key(path):
    points = [json.loads(line) for line in path.read_text().splitlines()]
    keyed = {(p["sample_id"], p["profile"], p["link"]): {k: v for k, v in p.items() if k not in TIMINGS}
             for p in points}
    assert len(keyed) == len(points)
    return keyed


def test_ray_runner_matches_the_local_runner(tmp_path):
    import ray  # noqa: F401  (fails, rather than skips, where the extra is missing)

    # A Ray task of one CPU runs torch on one thread; so does this run, or float32 sums (kl_first) differ at 1e-7.
    local = tmp_path / "local.jsonl"
    links = sweep.link_specs(["10mbit"], ["step:100mbit:10mbit:0.5s"], "0ms")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert sweep.run_sweep("tiny-llama", load_squad(limit=2), [parse_profile(p) for p in PROFILES], links, local,
                               max_new_tokens=4) == 4
    finally:
        torch.set_num_threads(threads)

    # The CLI in a child process of its own session: on a hang, the child and the Ray processes it started are killed.
    remote = tmp_path / "ray.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local cluster, not the caller's
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    child = subprocess.Popen(
        [sys.executable, "-m", "channel.cli", "sweep", "--runner", "ray", "--workers", "2", "--model", "tiny-llama",
         "--samples", "2", "--profiles", ",".join(PROFILES), "--bandwidths", "10mbit",
         "--traces", "step:100mbit:10mbit:0.5s", "--delay", "0ms", "--max-new-tokens", "4",
         "--out", str(remote), "--report-dir", str(tmp_path / "report")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing is left after a clean exit
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == 0, output
    assert "4 (sample, profile) pairs computed" in output

    expected, got = by_key(local), by_key(remote)
    assert len(expected) == 2 * 2 * 2  # samples x profiles x links
    assert got == expected
