"""Where the receiver's first token goes (issue 28): at 32K tokens it took 0.073 s after the cache arrived, at 128K
0.116 s, so about 0.06 s of it does not grow with the context. For each context length, a prefilled cache is
injected (`KVState.to_cache`, a copy of every layer) and one greedy token decoded on top of the question
(`kvstate.greedy_decode`), as the receiver's Generate runs them: each step timed, the device synchronized around it,
`repeats` times, then once under torch.profiler (on a GPU, its kernels by device time and its operators by host
time). llama-3.1-8b-random (Llama-3.1-8B's shape, RANDOM weights) in bf16 on CUDA; on a machine without CUDA,
tiny-llama on the CPU, a check of the script itself.

    python3 deploy/gpu/first_token.py OUT.json [tokens ...]     (default: 32768 131072)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from channel import bench_recompute as table
from channel.bench_gpu import environment
from common.kvstate import greedy_decode
from common.models import load_model
from sender.prefill import prefill_prompt

TOP = 20


def timed(fn, device: torch.device) -> tuple[object, float]:
    table.sync(device)
    start = time.perf_counter()
    out = fn()
    table.sync(device)
    return out, time.perf_counter() - start


def main(path: str, contexts: tuple[int, ...] = (32768, 131072), repeats: int = 3) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    loaded = load_model("llama-3.1-8b-random" if cuda else "tiny-llama", str(device), "bfloat16" if cuda else "float32")
    tail = loaded.tokenizer(table.QUESTION, add_special_tokens=False)["input_ids"]
    rows = []
    for tokens in contexts:
        kv = prefill_prompt(loaded, table.bench_text(loaded.tokenizer, tokens), table.QUESTION).kv
        row = {"tokens": kv.seq_len, "tail_tokens": len(tail), "to_cache_s": [], "first_token_s": []}
        for _ in range(repeats):
            cache, seconds = timed(lambda: kv.to_cache(loaded.config), device)
            row["to_cache_s"].append(seconds)
            _, seconds = timed(lambda: greedy_decode(loaded.model, cache, tail, kv.seq_len, 1), device)
            row["first_token_s"].append(seconds)
            del cache
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as profiled:
            cache = kv.to_cache(loaded.config)
            greedy_decode(loaded.model, cache, tail, kv.seq_len, 1)
            table.sync(device)
        averages = profiled.key_averages()
        row["profile"] = ((averages.table(sort_by="self_device_time_total", row_limit=TOP) if cuda else "")
                          + averages.table(sort_by="self_cpu_time_total", row_limit=TOP))
        rows.append(row)
        print(f"{row['tokens']} tokens: to_cache {' '.join(f'{s:.4f}' for s in row['to_cache_s'])} s; first token "
              f"({len(tail)} tail tokens) {' '.join(f'{s:.4f}' for s in row['first_token_s'])} s", flush=True)
        print(row["profile"])
        del kv, cache
    command = f"python3 deploy/gpu/first_token.py OUT.json {' '.join(map(str, contexts))}"
    env = environment() if cuda else {"device": "CPU", "torch": torch.__version__, "model": loaded.name}
    Path(path).write_text(json.dumps({"command": command, "environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], *([tuple(int(n) for n in sys.argv[2:])] if len(sys.argv) > 2 else []))
