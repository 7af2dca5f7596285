"""Static profiles against the planners on a varying link: deadline hit rate and quality.

Uses the model work a sweep measured (per sample and profile: compute times, bytes and
fidelity) and replays transfers along a bandwidth trace: a long trace (Markov, CSV) is
entered at many points, and a step trace is seen from its start by every transfer (the
link drops mid-transfer). Two planners run next to the static profiles:

- `auto`: the profile negotiated for the whole transfer (common.planner, any calibrated
  profile, selection included), planned with the EWMA of earlier transfers.
- `auto-segments`: the segment planner (sender.adaptive) with its text fallback. SQuAD
  contexts fit one segment, so this is one decision per transfer among the precision
  profiles, or text when none fits; a text answer is the full-prompt answer (fidelity 1,
  as tests/e2e/test_segments.py asserts), delivered after the receiver prefills it.

Quality counts the fidelity of answers that arrive in time, 0 for late ones.
"""

from __future__ import annotations

import random
from collections import Counter

from common.link import Link, Trace
from common.planner import plan
from sender.adaptive import TEXT, SegmentPlanner
from sender.bandwidth import BandwidthEstimator

INITIAL_BPS = 20e6  # what `auto` assumes before its first acknowledged transfer
TRANSFERS, GAP_S = 400, 2.0  # transfers replayed, and the mean gap between their starts


def replay_span(deadlines: list[float], transfers: int = TRANSFERS, gap_s: float = GAP_S) -> float:
    """Seconds of trace a replay reads: every transfer's start, plus the longest deadline."""
    return transfers * gap_s + max(deadlines)


def shifted(trace: Trace, offset: float) -> Trace:
    """The trace as seen by a transfer that starts `offset` seconds in."""
    index = max(i for i, t in enumerate(trace.times) if t <= offset)
    duration = None if trace.duration_s is None else trace.duration_s - offset
    return Trace([0.0] + [t - offset for t in trace.times[index + 1:]], trace.rates[index:], duration)


def replay(points: dict[tuple[str, str], dict], samples: list[str], statics: list[str], table: dict,
           trace: Trace, delay_s: float, deadlines: list[float], transfers: int = TRANSFERS, gap_s: float = GAP_S,
           seed: int = 0, enter_at_random: bool = True) -> list[dict]:
    """points[(sample_id, profile)] -> one sweep point (compute times, bytes, fidelity, text baseline).

    Transfers start every `gap_s` seconds (plus jitter) along the trace, each on a random sample;
    with enter_at_random=False every transfer sees the trace from its start. A trace that ends
    (`duration_s`) must cover every start plus the longest deadline (see `replay_span`).
    """
    rng = random.Random(seed)
    starts = [i * gap_s + rng.uniform(0, gap_s) for i in range(transfers)]
    span = max(starts) + max(deadlines) if enter_at_random else max(deadlines)
    if trace.duration_s is not None and span > trace.duration_s:
        raise ValueError(f"the trace ends at {trace.duration_s:g} s, but the replay reads it until {span:.0f} s: "
                         f"make it at least replay_span() long")
    chosen_samples = [rng.choice(samples) for _ in starts]
    segments = SegmentPlanner(table)
    results = []
    for deadline in deadlines:
        outcomes = {name: [] for name in statics + ["auto", "auto-segments"]}
        choices = {"auto": Counter(), "auto-segments": Counter()}
        whole_estimator, segment_estimator = BandwidthEstimator(), BandwidthEstimator()
        for start, sample in zip(starts, chosen_samples):
            link = Link(shifted(trace, start) if enter_at_random else trace, delay_s)
            compute = {}
            for profile in set(statics) | set(table["profiles"]):
                point = points.get((sample, profile))
                if point is None:
                    continue
                link_s = link.transfer_time([point["bytes"]])
                compute[profile] = (point["prefill_s"] + point["select_s"] + point["encode_s"] + link_s
                                    + point["assemble_s"] + point["inject_s"] + point["first_token_s"],
                                    point["fidelity_f1"], point["bytes"], link_s)

            def record(name: str, ttft: float, fidelity: float) -> None:
                outcomes[name].append((ttft <= deadline, fidelity if ttft <= deadline else 0.0))

            for profile in statics:
                record(profile, *compute[profile][:2])
            allowed = [p for p in table["profiles"] if p in compute]
            first = points[(sample, allowed[0])]
            picked = plan(table, first["seq_len"], whole_estimator.estimate(start) or INITIAL_BPS, deadline,
                          allowed=allowed).profile
            ttft, fidelity, nbytes, link_s = compute[picked]
            record("auto", ttft, fidelity)
            choices["auto"][picked] += 1
            whole_estimator.update(nbytes, link_s, start)  # the acknowledged transfer feeds the estimate

            ladder = [p for p in segments.ladder if p in compute]
            # The sender plans text with the rate of its own prefill of this context.
            planner = SegmentPlanner(table, ladder, first["prefill_s"] / first["seq_len"])
            budget = deadline - planner.first_token_s - first["prefill_s"]
            sizes = {p: compute[p][2] for p in ladder}
            estimate = segment_estimator.cautious_estimate(start)
            choice = (planner.probe(sizes) if estimate is None
                      else planner.choose(first["seq_len"], sizes, first["text_bytes"], estimate, budget))
            choices["auto-segments"][choice.profile] += 1
            if choice.profile == TEXT:
                link_s = link.transfer_time([first["text_bytes"]])
                record("auto-segments", first["prefill_s"] + link_s + first["text_prefill_s"], 1.0)
            else:
                ttft, fidelity, nbytes, link_s = compute[choice.profile]
                record("auto-segments", ttft, fidelity)
                segment_estimator.update(nbytes, link_s, start)
        for name, rows in outcomes.items():
            results.append({"deadline_s": deadline, "profile": name, "transfers": len(rows),
                            "hit_rate": sum(h for h, _ in rows) / len(rows),
                            "mean_quality": sum(q for _, q in rows) / len(rows),
                            "choices": dict(choices[name].most_common()) if name in choices else {name: len(rows)}})
    return results
