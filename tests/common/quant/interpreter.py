"""Runs a script in Triton's interpreter (TRITON_INTERPRET must be set before triton is first imported, so in a
process of its own): the kernel tests' way to run Triton kernels on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def run_interpreted(script: str, folder: Path):
    """`script` run with its report's path as argv[1], in Triton's interpreter from the repository root: the JSON it
    wrote there. Skips where triton is not installed."""
    pytest.importorskip("triton")
    report = folder / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(report)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(report.read_text())
