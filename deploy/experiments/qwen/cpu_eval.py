"""The CPU measurement of docs/qwen.md: `kvwire eval`'s harness on qwen2.5-coder-1.5b, one question at a
time, each question's rows appended to a JSONL as soon as they exist (a slow shared CPU must not lose a
finished question), stopping before a new question once --budget-s has passed.

    .venv/bin/python deploy/experiments/qwen/cpu_eval.py --samples 4 --budget-s 900 --out results/qwen/eval_cpu.jsonl

Then `deploy/experiments/qwen/cpu_eval.py --summarize results/qwen/eval_cpu.jsonl` prints and writes the per-profile summary
(channel.evaluation.harness.aggregate) next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--profiles", default="fp16,int8,int4:g32")
    parser.add_argument("--budget-s", type=float, default=900.0)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("results/qwen/eval_cpu.jsonl"))
    parser.add_argument("--summarize", type=Path, default=None)
    args = parser.parse_args()
    from dataclasses import fields

    from channel.evaluation.harness import EvalRow, aggregate, evaluate, rows_as_dicts
    if args.summarize:
        lines = [json.loads(line) for line in args.summarize.read_text().splitlines()]
        names = {f.name for f in fields(EvalRow)}
        rows = [EvalRow(**{k: v for k, v in line.items() if k in names}) for line in lines if "sample_id" in line]
        summary = aggregate(rows)
        meta = next(line for line in lines if "command" in line)
        target = args.summarize.with_suffix(".summary.json")
        target.write_text(json.dumps({**meta, "questions": len({r.sample_id for r in rows}), "profiles": summary},
                                     indent=2))
        for s in summary:
            print({k: s[k] for k in ("profile", "n", "f1_gold", "em_gold", "fidelity_f1", "kl_first", "kl_tf",
                                     "ratio_vs_fp16", "prefill_s", "first_token_s", "decode_s") if k in s})
        print(f"wrote {target}")
        return

    from channel.evaluation.squad import load_squad
    from common.models import load_model
    from common.profile import parse_profile

    start = time.perf_counter()
    loaded = load_model("qwen2.5-coder-1.5b", "cpu", "float32")
    profiles = [parse_profile(p) for p in args.profiles.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as out:
        out.write(json.dumps({"command": " ".join(["deploy/experiments/qwen/cpu_eval.py", f"--samples {args.samples}",
                                                   f"--profiles {args.profiles}", f"--budget-s {args.budget_s:g}",
                                                   f"--max-new-tokens {args.max_new_tokens}"]),
                              "device": f"cpu ({os.cpu_count()} cores shared with other jobs, {platform.machine()})",
                              "dtype": "float32", "model": loaded.name,
                              "fingerprint": loaded.fingerprint.weights_sha256,
                              "load_s": loaded.load_seconds}) + "\n")
        for sample in load_squad(limit=args.samples):
            if time.perf_counter() - start > args.budget_s:
                print(f"budget of {args.budget_s:g} s spent: stopping before {sample.id}", flush=True)
                break
            began = time.perf_counter()
            rows = evaluate(loaded, [sample], profiles, args.max_new_tokens)
            for row in rows_as_dicts(rows):
                out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"{sample.id}: {time.perf_counter() - began:.0f} s, "
                  + ", ".join(f"{r.profile} F1 {r.f1_gold:.2f} fid {r.fidelity_f1:.2f}" for r in rows), flush=True)


if __name__ == "__main__":
    main()
