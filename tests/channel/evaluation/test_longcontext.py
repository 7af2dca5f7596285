"""The long-context generator: lengths, depths, determinism, multi-key needles, the scorer, and a run on tiny-llama."""

import pytest

from channel.evaluation.harness import evaluate
from channel.evaluation.longcontext import (
    Haystack,
    contains_score,
    multikey_samples,
    needle_samples,
    summarize,
)
from common.models import load_model
from common.profile import parse_profile


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny-llama", "cpu", "float32")


@pytest.fixture(scope="module")
def haystack(loaded):
    return Haystack(loaded.tokenizer)


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("tokens", [512, 4096])
def test_contexts_have_the_asked_length(haystack, tokens):
    for sample in needle_samples(haystack, tokens, [0.0, 0.5, 1.0]) + multikey_samples(haystack, tokens, 2):
        assert abs(token_count(haystack.tokenizer, sample.context) - tokens) <= 4


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_the_needle_sits_at_its_depth(haystack, depth):
    tokens = 2048
    (sample,) = needle_samples(haystack, tokens, [depth])
    at = sample.context.index(f"is: {sample.answers[0]}.")
    sentence_start = sample.context.rindex("One of the special magic numbers", 0, at)
    before = token_count(haystack.tokenizer, sample.context[:sentence_start])
    assert abs(before / tokens - depth) < 0.05  # moved forward to a sentence end: a few tokens at most
    assert sample.context.count("special magic number") == 1
    key = sample.question.split(" for ")[1].split(" mentioned")[0]
    assert f"magic numbers for {key} is: {sample.answers[0]}." in sample.context


def test_same_arguments_same_samples_another_seed_others(haystack):
    first = needle_samples(haystack, 1024, [0.25, 0.75], seed=3) + multikey_samples(haystack, 1024, 2, seed=3)
    again = needle_samples(haystack, 1024, [0.25, 0.75], seed=3) + multikey_samples(haystack, 1024, 2, seed=3)
    other = needle_samples(haystack, 1024, [0.25, 0.75], seed=4)
    assert first == again
    assert [s.answers for s in other] != [s.answers for s in first[:2]]
    assert len({s.id for s in first}) == 4


def test_multikey_holds_every_needle_and_asks_one(haystack):
    for sample in multikey_samples(haystack, 2048, 3, keys=5):
        assert sample.context.count("One of the special magic numbers for") == 5
        key = sample.question.split(" for ")[1].split(" mentioned")[0]
        assert f"magic numbers for {key} is: {sample.answers[0]}." in sample.context


def test_bad_arguments_are_refused(haystack):
    with pytest.raises(ValueError, match="depth 1.5"):
        needle_samples(haystack, 1024, [1.5])
    with pytest.raises(ValueError, match="keys is 1"):
        multikey_samples(haystack, 1024, 1, keys=1)
    with pytest.raises(ValueError, match="too few for a 10000000-token context"):
        needle_samples(haystack, 10_000_000, [0.5])


def test_the_score_is_containment_of_the_value():
    assert contains_score("The number is 4821937.", ("4821937",)) == 1.0
    assert contains_score("4821937", ("1111111", "4821937")) == 1.0
    assert contains_score("482193", ("4821937",)) == 0.0
    assert contains_score("", ("4821937",)) == 0.0


def test_end_to_end_on_tiny_llama(loaded, haystack):
    """The suite through the eval harness: a lossless profile scores as the full cache does."""
    samples = needle_samples(haystack, 256, [0.0, 1.0]) + multikey_samples(haystack, 256, 1)
    raw, int2 = parse_profile("raw"), parse_profile("int2")
    rows = evaluate(loaded, samples, [raw, int2], max_new_tokens=8)
    table = {(r["task"], r["profile"]): r for r in summarize(rows, samples)}
    int2 = str(int2)
    assert set(table) == {("niah", "raw"), ("niah", int2), ("mk4", "raw"), ("mk4", int2)}
    for (task, profile), row in table.items():
        assert row["tokens"] == 256 and row["samples"] == (2 if task == "niah" else 1)
        assert 0.0 <= row["accuracy"] <= 1.0
    assert table["niah", "raw"]["accuracy"] == table["niah", "raw"]["full_cache_accuracy"]
    assert table["niah", "raw"]["fidelity_f1"] == 1.0
    assert table["niah", int2]["ratio_vs_fp16"] < 0.25


def test_the_command_refuses_a_length_past_the_models_positions():
    from typer.testing import CliRunner

    from channel.cli import app

    result = CliRunner().invoke(app, ["longcontext", "--model", "tiny-llama", "--lengths", "1024,5000"])
    assert result.exit_code == 2
    message = " ".join(result.output.replace("│", " ").split())  # rich wraps the message in a box
    assert "4096 positions" in message and "at most 3840" in message
