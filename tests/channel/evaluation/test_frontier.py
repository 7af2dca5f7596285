from channel.evaluation.frontier import frontier_table, pick


def summary(profile, fidelity, kl, ratio, n=10):
    return {"profile": profile, "fidelity_f1": fidelity, "fidelity_f1_ci95": 0.1, "kl_tf": kl, "kl_tf_ci95": 0.01,
            "ratio_vs_fp16": ratio, "token_match_rate": 0.5, "f1_gold": 0.2, "n": n}


def test_pick_takes_the_best_fidelity_within_each_budget():
    tuned = [summary("a", 0.5, 0.2, 0.05), summary("b", 0.7, 0.1, 0.07), summary("c", 0.7, 0.05, 0.11),
             summary("d", 0.9, 0.01, 0.3)]
    chosen = pick(tuned, (0.03, 0.0625, 0.125, 0.25))
    assert chosen[0.03] is None
    assert chosen[0.0625]["profile"] == "a"
    assert chosen[0.125]["profile"] == "c"  # ties on fidelity go to the lower KL
    assert chosen[0.25]["profile"] == "c"  # d does not fit


def test_the_table_reports_held_out_figures_and_flags_a_budget_overrun():
    chosen = pick([summary("a", 0.5, 0.2, 0.06)], (0.0625,))
    table = frontier_table("m", chosen, [summary("a", 0.4, 0.3, 0.064, n=100)], {"questions": 10})
    row = table["frontier"][0]
    assert (row["profile"], row["fidelity"], row["tuning_fidelity"], row["n"]) == ("a", 0.4, 0.5, 100)
    assert row["within_budget"] is False


def test_the_plot_shows_picks_baselines_and_candidates(tmp_path):
    """A budget with no pick is left out of the curve, not an error; the PNG is written where asked."""
    from channel.evaluation.report import plot_frontier

    tuned = [summary("a", 0.5, 0.2, 0.05), summary("b", 0.9, 0.01, 0.2)]
    chosen = pick(tuned, (0.03125, 0.0625, 0.25))
    measured = [summary("a", 0.45, 0.3, 0.052, n=100), summary("b", 0.85, 0.02, 0.21, n=100)]
    document = frontier_table("m", chosen, measured, {"questions": 2, "summaries": tuned})
    fp16 = dict(summary("fp16", 1.0, 0.0, 0.77, n=100), f1_gold_ci95=0.05)
    document["baselines"] = [fp16]
    assert document["frontier"][0]["profile"] is None
    path = plot_frontier(document, tmp_path / "frontier.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_the_frontier_command_writes_its_json_and_plot_into_a_new_folder(tmp_path):
    import json

    from typer.testing import CliRunner

    from channel.cli import app

    out = tmp_path / "not-yet" / "frontier.json"
    result = CliRunner().invoke(app, ["frontier", "--model", "tiny-llama", "--profiles", "int4:g32,int2:g32",
                                      "--budgets", "0.2,0.5", "--baselines", "fp16", "--tune-samples", "2",
                                      "--samples", "2", "--max-new-tokens", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert [r["budget"] for r in document["frontier"]] == [0.2, 0.5]
    assert [b["profile"] for b in document["baselines"]] == ["fp16"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
