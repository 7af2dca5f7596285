"""A receiver without the rANS kernels (a CPU) decoding pca:...:a: tier by tier (RANS_DECODE_BATCH = 0, as
before commit "uncode_many") against the complete tiers of several layers in one call, side by side, in
alternating runs. SmolLM2 in float32 with its shipped basis, the first SQuAD prompts of the embedded subset.

    .venv/bin/python deploy/experiments/rans_cpu_decode.py OUT.json [prompts] [profile]
"""

import json
import sys
import time

from channel.evaluation.squad import load_squad
from common import wire
from common.models import load_model
from common.profile import parse_profile
from sender.prefill import prefill_prompt

out = sys.argv[1]
prompts = int(sys.argv[2]) if len(sys.argv) > 2 else 3
spec = sys.argv[3] if len(sys.argv) > 3 else "pca:b1.7:w:e:j:a:i1:f3"
loaded = load_model("smollm2-135m", "cpu", "float32")
profile = parse_profile(spec).bind(loaded.codec_context)
limits = wire.Limits(max_frame_bytes=64 << 20, max_transfer_bytes=1 << 40, max_tokens=1 << 20)
batch = wire.RANS_DECODE_BATCH
rows = []
for sample in load_squad(limit=prompts):
    pre = prefill_prompt(loaded, sample.context, sample.question, profiles=[profile])
    frames = list(wire.encode(pre.kv, profile, loaded.fingerprint, None, 1, loaded.codec_context))
    row = {"sample": sample.id, "tokens": pre.kv.seq_len, "tier_by_tier_s": [], "together_s": []}
    caches = {}
    for mode in ("tier_by_tier_s", "together_s", "together_s", "tier_by_tier_s"):
        wire.RANS_DECODE_BATCH = 0 if mode == "tier_by_tier_s" else batch
        start = time.perf_counter()
        caches[mode] = wire.decode(frames, loaded.fingerprint, limits, wire.sliding_windows(loaded.config), "cpu",
                                   loaded.codec_context)
        row[mode].append(time.perf_counter() - start)
    row["same_cache"] = all(bool((a == b).all()) for a, b in zip(caches["tier_by_tier_s"].keys + caches["tier_by_tier_s"].values,
                                                                  caches["together_s"].keys + caches["together_s"].values))
    print(row, flush=True)
    rows.append(row)
with open(out, "w") as file:
    json.dump({"command": f".venv/bin/python deploy/experiments/rans_cpu_decode.py OUT.json {prompts} {spec}",
               "environment": {"device": "CPU (the 2-core development machine)", "dtype": "float32"},
               "profile": spec, "rows": rows}, file, indent=1)
