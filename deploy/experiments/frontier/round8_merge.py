"""Round 8's results/frontier.json: round 7's document with the 6.25% and 12.5% rows replaced.

Run from the repository root: .venv/bin/python deploy/experiments/frontier/round8_merge.py
The picks are the frontier's rule (`channel.evaluation.frontier.pick`: the best tuning fidelity within
the budget) over round 8's candidates (the joint stage, 48 tuning questions); their held-out figures
pool the 200 held-out questions measured on the GPU (round8_heldout_{a,b}: questions 0-99 and 100-199
of the embedded subset; round8_heldout_c: pca:b1.65:w:e:j:i1:f3 on 0-199).
"""

import json
from pathlib import Path

from channel.evaluation.frontier import frontier_table, pick
from channel.evaluation.harness import aggregate

HERE = Path("results/frontier")
previous = json.loads((HERE / "round7_smollm2.json").read_text())
tuning = json.loads((HERE / "round8_tuning_smollm2.json").read_text())["profiles"]
held = [row for name in ("a", "b", "c") for row in json.loads((HERE / f"round8_heldout_{name}_smollm2.json").read_text())["samples"]]
chosen = {budget: choice for budget, choice in pick(tuning, (0.0625, 0.125)).items()}
new = frontier_table(previous["model"], chosen, aggregate(held), {})["frontier"]
rows = {row["budget"]: row for row in previous["frontier"]}
for row in new:
    rows[row["budget"]] = {**row, "tuning_n": 48, "round": 8}
document = {**previous, "frontier": [rows[b] for b in sorted(rows)], "tuning_round8": tuning,
            "heldout_round8": aggregate(held), "basis": "58d5654f79a20fab (56ffe751de6b99d1 with a joint transform)",
            "previous_round": "results/frontier/round7_smollm2.json",
            "run": "NVIDIA H200, torch 2.11.0+cu130, transformers 5.24.0, --dtype float32. Round 8 replaces the 6.25% "
                   "and 12.5% rows: keys and values in one joint transform per layer (pca:bB:w:e:j:i1:f3), tuned on 48 "
                   "questions (TUNE=48 deploy/gpu/run.sh eval; round8_tuning_smollm2.*), picked by tuning fidelity within "
                   "the budget among them, held out on 200 questions of the embedded subset (HELD_OUT=100 SKIP=0 and "
                   "SKIP=100, and HELD_OUT=200 for pca:b1.65; round8_heldout_{a,b,c}_smollm2.*; merged by "
                   "results/frontier/round8_merge.py). The 3.125% and 25% rows are round 6's."}
Path("results/frontier.json").write_text(json.dumps(document, indent=1) + "\n")
for row in document["frontier"]:
    print(row["budget"], row["profile"], round(row["fidelity"], 4), round(row["fidelity_ci95"], 4), round(row["kl"], 6),
          round(row["bytes_vs_fp16"], 4), row["n"], row.get("round"))
