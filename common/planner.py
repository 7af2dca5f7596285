"""Pick the profile that buys the most quality within a deadline, from a calibrated rate-distortion table.

The table (`kvwire calibrate`, one versioned JSON file per model; a default ships for the
embedded model) gives per profile the measured fidelity, the bytes per context token on
the wire, and compute seconds per token. A plan's time is

    prefill + encode + bytes / bandwidth + receiver (assemble, inject, first token)

and the chosen profile maximizes expected fidelity subject to time <= deadline and
fidelity >= floor (fewest bytes among equals).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

CALIBRATION_VERSION = 1


@dataclass(frozen=True)
class Plan:
    profile: str
    expected_fidelity: float
    expected_seconds: float
    expected_bytes: int
    reason: str


def calibration_path(model: str) -> Path:
    return Path(str(resources.files("common") / "data" / f"calibration-{model}.json"))


def load_table(model: str, path: Path | None = None) -> dict:
    path = path or calibration_path(model)
    if not path.exists():
        raise FileNotFoundError(f"no calibration for {model} at {path}; run kvwire calibrate --model {model}")
    table = json.loads(path.read_text())
    if table.get("version") != CALIBRATION_VERSION:
        raise ValueError(f"{path}: calibration version {table.get('version')}, expected {CALIBRATION_VERSION}")
    return table


def table_from_summaries(model: str, summaries: list[dict], samples: int) -> dict:
    """A calibration table from `kvwire eval` summaries (harness.aggregate)."""
    profiles = {}
    prefill = []
    for s in summaries:
        tokens = s["seq_len_mean"]
        profiles[s["profile"]] = {
            "fidelity": s["fidelity_f1"], "f1_gold": s["f1_gold"],
            "bytes_per_token": s["bytes_mean"] / max(tokens, 1),
            "encode_s_per_token": (s["select_s"] + s["encode_s"]) / max(tokens, 1),
            "receiver_s_per_token": (s["assemble_s"] + s["inject_s"]) / max(tokens, 1),
            "first_token_s": s["first_token_s"],
        }
        prefill.append(s["prefill_s"] / max(tokens, 1))
    return {"version": CALIBRATION_VERSION, "model": model, "samples": samples,
            "prefill_s_per_token": sum(prefill) / len(prefill), "profiles": profiles}


def estimate(table: dict, profile: str, tokens: int, bandwidth_bps: float) -> tuple[float, int]:
    row = table["profiles"][profile]
    nbytes = int(row["bytes_per_token"] * tokens)
    seconds = (table["prefill_s_per_token"] * tokens + row["encode_s_per_token"] * tokens + nbytes * 8 / bandwidth_bps
               + row["receiver_s_per_token"] * tokens + row["first_token_s"])
    return seconds, nbytes


def plan(table: dict, tokens: int, bandwidth_bps: float, deadline_s: float, quality_floor: float = 0.0,
         allowed: list[str] | None = None) -> Plan:
    if tokens < 1 or bandwidth_bps <= 0 or deadline_s <= 0:
        raise ValueError("planning needs tokens >= 1, a positive bandwidth and a positive deadline")
    candidates = []
    for profile, row in table["profiles"].items():
        if allowed is not None and profile not in allowed:
            continue
        seconds, nbytes = estimate(table, profile, tokens, bandwidth_bps)
        candidates.append((profile, row["fidelity"], seconds, nbytes))
    if not candidates:
        raise ValueError("no calibrated profile is allowed")
    fits = [c for c in candidates if c[2] <= deadline_s and c[1] >= quality_floor]
    if fits:
        profile, fidelity, seconds, nbytes = max(fits, key=lambda c: (c[1], -c[3]))
        reason = (f"{profile}: highest calibrated fidelity ({fidelity:.2f}) among {len(fits)} of {len(candidates)} "
                  f"profiles that fit {deadline_s:g} s at {bandwidth_bps / 1e6:g} Mbit/s (expected {seconds:.2f} s)")
    else:
        profile, fidelity, seconds, nbytes = min(candidates, key=lambda c: c[2])
        reason = (f"{profile}: no profile meets {deadline_s:g} s with fidelity >= {quality_floor:g} at "
                  f"{bandwidth_bps / 1e6:g} Mbit/s; sending the fastest (expected {seconds:.2f} s)")
    return Plan(profile, fidelity, seconds, nbytes, reason)
