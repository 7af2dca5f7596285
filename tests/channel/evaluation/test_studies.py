import math

import pytest

from channel.evaluation import studies


def test_power_law_fit_recovers_the_exponent():
    xs = [8, 16, 32, 64, 128]
    a, alpha = studies._fit(xs, [3.0 * x ** -0.7 for x in xs], "power")
    assert alpha == pytest.approx(0.7) and math.exp(a) == pytest.approx(3.0)
    a, rate = studies._fit(xs, [2.0 * math.exp(-x / 50) for x in xs], "exponential")
    assert 1 / rate == pytest.approx(50)
    assert studies._predict(a, rate, 100, "exponential") == pytest.approx(2.0 * math.exp(-2))


def summaries(values):
    return [{"profile": p, "fidelity_f1": v, "kl_tf": 0.1, "ratio_vs_fp16": 0.5} for p, v in values.items()]


def test_cliff_verdicts():
    order = ["fp16", "int8", "int4", "int2"]
    held = studies._cliff(summaries({"fp16": 1.0, "int8:g32": 0.98, "int4:g32": 0.93, "int2:g32": 0.2}), order, "q")
    assert held["verdict"] == "holds" and "int4:g32 to int2:g32" in held["evidence"]
    gradual = studies._cliff(summaries({"fp16": 1.0, "int8:g32": 0.8, "int4:g32": 0.6, "int2:g32": 0.4}), order, "q")
    assert gradual["verdict"] == "does not hold here"


def test_study_cli_writes_a_verdict(tmp_path):
    import json

    from typer.testing import CliRunner

    from channel.cli import app

    out = tmp_path / "hybrid.json"
    result = CliRunner().invoke(app, ["study", "hybrid", "--samples", "1", "--model", "tiny-llama", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["verdict"] in ("holds", "does not hold here") and "fidelity" in report["evidence"]
    assert {s["profile"] for s in report["summaries"]} >= {"q2c:0.5+int4:g32", "int2:g32"}
