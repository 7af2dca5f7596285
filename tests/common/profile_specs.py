"""Every profile spec the repository stores: in results/**/*.json and the shipped calibration tables.

The grammar's compatibility test (tests/common/test_profile_registry.py) parses each of them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A spec's characters; anything else (sentences, paths, numbers alone) is not a profile.
_SPEC = re.compile(r"[a-z][a-z0-9:.@+=\-]*")


def _strings(node, key: str = ""):
    """(key, string) pairs of a JSON document: every string value, and every key of a `profiles`-like map."""
    if isinstance(node, dict):
        for k, v in node.items():
            if "profile" in key.lower() or "profile" in k.lower() or k in ("schedule", "picks"):
                yield k, k
            yield from _strings(v, k)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item, key)
    elif isinstance(node, str):
        yield key, node


def stored_specs() -> list[str]:
    """The distinct strings under a profile-named key of the stored JSON that look like specs."""
    files = sorted((ROOT / "results").rglob("*.json")) + sorted((ROOT / "common" / "data").glob("calibration-*.json"))
    found = set()
    for path in files:
        try:
            document = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        for key, text in _strings(document):
            if "profile" in key.lower() and len(text) < 400 and _SPEC.fullmatch(text):
                found.add(text)
    return sorted(found)
