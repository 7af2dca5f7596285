"""The read-ahead side by side on the CPU: SmolLM2 in float32, a 2,048-token cache at the sender, streamed
through the relay at RATES (and the other cases of channel.bench_recompute), against a receiver process.

    PYTHONPATH=TREE .venv/bin/python deploy/experiments/read_ahead_cpu.py OUT.json 200mbit int4,pca:b1.7:w:e:j

Run it from a worktree of each commit to compare (docs/gpu.md; results/read_ahead_cpu.json).
"""

import json
import sys

from channel import bench_recompute as table
from channel.nodes import start_receiver_process
from common.models import load_model

out, rates, profiles = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
loaded = load_model("smollm2-135m", "cpu", "float32")
process, target = start_receiver_process("smollm2-135m", table.receiver_env(4096, "cpu", "float32"), quiet=True)
try:
    # a ceiling far above the rates: every rate is shaped by the relay
    report = table.kv_against_recompute(loaded, target, [2048], rates, profiles, 1e10, max_row_s=120,
                                        say=lambda line: print(line, flush=True))
finally:
    process.terminate()
    process.wait(timeout=60)
with open(out, "w") as file:
    json.dump(report, file, indent=1)
