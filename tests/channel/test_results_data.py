"""results/ is data: a manifest names how every file was made, no scripts live there, and every plot
redraws from the data beside it (`make figures`)."""

import json
from pathlib import Path

from channel import figures, results_manifest

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {"file", "command", "device", "commit", "date", "commit_subject", "last_commit", "sources"}


def test_the_manifest_lists_every_file_in_results():
    manifest = json.loads((ROOT / "results" / "MANIFEST.json").read_text())
    listed = [entry["file"] for entry in manifest]
    assert len(listed) == len(set(listed))
    missing = sorted(set(results_manifest.tracked_results()) - set(listed))
    assert missing == [], "run: .venv/bin/python -m channel.results_manifest"
    for entry in manifest:
        assert set(entry) == FIELDS, entry["file"]
        assert entry["command"] and entry["device"] and entry["commit"]  # "unknown" where nothing says


def test_results_holds_no_scripts():
    assert [p for p in (ROOT / "results").rglob("*") if p.suffix in (".py", ".sh")] == []


def test_every_plot_in_results_redraws_from_its_data(tmp_path):
    written = {p.relative_to(tmp_path) for p in figures.redraw(tmp_path)}
    shown = {p.relative_to(ROOT / "results") for p in (ROOT / "results").rglob("*.png")}
    assert written == shown
    assert all((tmp_path / p).stat().st_size > 10_000 for p in written)
