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
