import json

import pytest

from common.profile import parse_profile
from channel.evaluation import sweep
from channel.evaluation.squad import load_squad


def profiles(*specs):
    return [parse_profile(spec) for spec in specs]


def test_points_use_the_link_model():
    from channel.evaluation.harness import EvalRow

    row = EvalRow("s", "int8", "a", "a", 1, 1, 1, True, 0.0, True, bytes=2_000_000, fp16_bytes=4_000_000, seq_len=100,
                  kept_tokens=100, prefill_s=0.5, select_s=0.0, encode_s=0.1, assemble_s=0.05, inject_s=0.01,
                  first_token_s=0.2, decode_s=1.0, frame_bytes=[1_000_000, 1_000_000], text_bytes=1000,
                  text_prefill_s=0.6)
    links = sweep.link_specs(["8mbit"], [], "10ms")
    (point,) = sweep.points_for(row, links)
    assert point["link_s"] == 2.0 + 0.010  # 16 Mbit at 8 Mbit/s plus the delay
    assert point["ttft_s"] == pytest.approx(0.5 + 0.0 + 0.1 + 2.010 + 0.05 + 0.01 + 0.2)
    assert point["ttft_cached_s"] == pytest.approx(0.1 + 2.010 + 0.05 + 0.01 + 0.2)
    assert point["text_ttft_s"] == pytest.approx(1000 * 8 / 8e6 + 0.010 + 0.6)
    assert "frame_bytes" not in point


def test_sweep_resumes_without_recomputing(tmp_path, monkeypatch):
    samples = load_squad(limit=2)
    out = tmp_path / "points.jsonl"
    links = sweep.link_specs(["10mbit", "100mbit"], ["step:100mbit:10mbit:0.5s"], "0ms")
    calls = []
    real = sweep._evaluate_one

    def counting(args):
        calls.append((args[1].id, tuple(map(str, args[2]))))
        return real(args)

    monkeypatch.setattr(sweep, "_evaluate_one", counting)
    assert sweep.run_sweep("tiny-llama", samples[:1], profiles("fp16", "int4"), links, out, max_new_tokens=4) == 2
    assert len(out.read_text().splitlines()) == 2 * 3
    # Rerun with one more sample and profile: only the missing pairs are computed.
    calls.clear()
    assert sweep.run_sweep("tiny-llama", samples, profiles("fp16", "int4", "int8"), links, out, max_new_tokens=4) == 4
    assert sorted(calls) == sorted([(samples[0].id, ("int8:g32",)), (samples[1].id, ("fp16", "int4:g32", "int8:g32"))])
    points = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(points) == 6 * 3
    assert len({(p["sample_id"], p["profile"], p["link"]) for p in points}) == len(points)
    summaries = sweep.summarize(points)
    assert {s["n"] for s in summaries} == {2}
    front = sweep.pareto_front(summaries)
    smallest = min(summaries, key=lambda s: s["ratio_vs_fp16"])["profile"]
    assert smallest == "int4:g32" and front[0] == smallest  # the fewest bytes is never dominated
    assert set(front) <= {"fp16", "int4:g32", "int8:g32"}


def test_best_at_respects_the_deadline():
    summaries = [
        {"profile": "fp16", "rate": "5mbit", "trace": "constant", "link_s": 8.0, "fidelity_f1": 1.0, "bytes_mean": 5e6},
        {"profile": "int4", "rate": "5mbit", "trace": "constant", "link_s": 0.9, "fidelity_f1": 0.7, "bytes_mean": 5e5},
        {"profile": "int2", "rate": "5mbit", "trace": "constant", "link_s": 0.5, "fidelity_f1": 0.3, "bytes_mean": 3e5},
    ]
    assert sweep.best_at(summaries, "5mbit")["profile"] == "int4"
    assert sweep.best_at(summaries, "1mbit") is None


def test_families_keep_the_text_stage_apart():
    """The plots draw one curve per family: a profile with a text stage is not on pca's curve."""
    from channel.evaluation.report import family

    assert [family(s) for s in ("pca:b1+protect:s4", "pca:b1:w+text", "q2c:1+pca:b0.5+tier:0.1:int4+text:q",
                                "q2c:0.5+int4", "int4+prerope+rot", "fp16")] == [
        "pca", "pca+text", "pca+tiers+text", "q2c+quant", "quantization+rot", "full"]


def test_best_per_rate_ranks_the_requested_rates_and_says_why_a_row_is_empty():
    summaries = [
        {"profile": "fp16", "rate": "5mbit", "trace": "constant", "link_s": 8.0, "fidelity_f1": 1.0, "bytes_mean": 5e6},
        {"profile": "int4", "rate": "5mbit", "trace": "constant", "link_s": 0.9, "fidelity_f1": 0.7, "bytes_mean": 5e5},
        {"profile": "fp16", "rate": "1mbit", "trace": "constant", "link_s": 40.0, "fidelity_f1": 1.0, "bytes_mean": 5e6},
        {"profile": "int4", "rate": "1mbit", "trace": "constant", "link_s": 4.0, "fidelity_f1": 0.7, "bytes_mean": 5e5},
    ]
    rows = sweep.best_per_rate(summaries, ["1mbit", "5mbit", "7mbit"])
    assert [(r["rate"], r["profile"]) for r in rows] == [("1mbit", ""), ("5mbit", "int4"), ("7mbit", "")]
    assert rows[0]["reason"] == "no profile's transfer fits 1 s; the quickest, int4 (500,000 bytes), takes 4.00 s"
    assert rows[2]["reason"] == "no points at 7mbit"
    assert sweep.best_per_rate(summaries, ["1mbit"], deadline_s=5.0)[0]["profile"] == "int4"


def test_the_sweep_command_writes_outside_results_and_reports_only_the_links_asked_for(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from channel.cli import app

    monkeypatch.chdir(tmp_path)
    common = ["sweep", "--model", "tiny-llama", "--samples", "1", "--profiles", "int8", "--traces", "",
              "--max-new-tokens", "4"]
    first = CliRunner().invoke(app, [*common, "--bandwidths", "100mbit,1kbit"])
    assert first.exit_code == 0, first.output
    assert "none: no profile's transfer fits 1 s; the quickest, int8:g32" in first.output  # 1 kbit/s: minutes
    report = tmp_path / "kvwire-sweep"
    assert len((report / "sweep.jsonl").read_text().splitlines()) == 2
    assert {p.name for p in report.iterdir()} >= {"summary.json", "report.html", "rate_distortion.png"}
    # Rerun asking for one of the two links: the file keeps both, the summary holds only the one asked for.
    second = CliRunner().invoke(app, [*common, "--bandwidths", "100mbit", "--fit-s", "2"])
    assert second.exit_code == 0, second.output
    summary = json.loads((report / "summary.json").read_text())
    assert [s["rate"] for s in summary["summaries"]] == ["100mbit"]
    assert [(b["rate"], b["profile"]) for b in summary["best"]] == [("100mbit", "int8:g32")]
    assert not (tmp_path / "results").exists()
