"""Static profiles against `auto` on a varying link: deadline hit rate and quality.

Uses the model work a sweep measured (per sample and profile: compute times, bytes and
fidelity) and replays transfers that start at many points of a bandwidth trace. `auto`
plans each transfer with the calibrated table and the bandwidth the sender has seen so
far (EWMA over its previous transfers, as `sender.bandwidth` does). Quality counts the
fidelity of answers that arrive in time, 0 for late ones.
"""

from __future__ import annotations

import random

from common.channel import Link, Trace
from common.planner import plan
from sender.bandwidth import BandwidthEstimator


def shifted(trace: Trace, offset: float) -> Trace:
    """The trace as seen by a transfer that starts `offset` seconds in."""
    index = max(i for i, t in enumerate(trace.times) if t <= offset)
    return Trace([0.0] + [t - offset for t in trace.times[index + 1:]], trace.rates[index:])


def replay(points: dict[tuple[str, str], dict], samples: list[str], statics: list[str], table: dict,
           trace: Trace, delay_s: float, deadlines: list[float], transfers: int = 400, gap_s: float = 2.0,
           seed: int = 0) -> list[dict]:
    """points[(sample_id, profile)] -> one sweep point (compute times, bytes, fidelity).

    Transfers start every `gap_s` seconds (plus jitter) along the trace, each on a random sample.
    """
    rng = random.Random(seed)
    starts = [i * gap_s + rng.uniform(0, gap_s) for i in range(transfers)]
    chosen_samples = [rng.choice(samples) for _ in starts]
    results = []
    for deadline in deadlines:
        outcomes = {name: [] for name in statics + ["auto"]}
        estimator = BandwidthEstimator()
        for start, sample in zip(starts, chosen_samples):
            link = Link(shifted(trace, start), delay_s)
            compute = {}
            for profile in set(statics) | set(table["profiles"]):
                point = points.get((sample, profile))
                if point is None:
                    continue
                link_s = link.transfer_time([point["bytes"]])
                compute[profile] = (point["prefill_s"] + point["select_s"] + point["encode_s"] + link_s
                                    + point["assemble_s"] + point["inject_s"] + point["first_token_s"],
                                    point["fidelity_f1"], point["bytes"], link_s)
            for profile in statics:
                ttft, fidelity, _, _ = compute[profile]
                outcomes[profile].append((ttft <= deadline, fidelity if ttft <= deadline else 0.0))
            allowed = [p for p in table["profiles"] if p in compute]
            tokens = points[(sample, allowed[0])]["seq_len"]
            picked = plan(table, tokens, estimator.estimate() or 20e6, deadline, allowed=allowed).profile
            ttft, fidelity, nbytes, link_s = compute[picked]
            outcomes["auto"].append((ttft <= deadline, fidelity if ttft <= deadline else 0.0))
            estimator.update(nbytes, link_s)  # the acknowledged transfer feeds the estimate
        for name, rows in outcomes.items():
            results.append({"deadline_s": deadline, "profile": name, "transfers": len(rows),
                            "hit_rate": sum(h for h, _ in rows) / len(rows),
                            "mean_quality": sum(q for _, q in rows) / len(rows)})
    return results
