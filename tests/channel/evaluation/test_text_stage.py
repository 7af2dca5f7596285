"""The text stage: the template's head and the question travel as token ids, which the receiver prefills."""

import pytest

from channel.evaluation.harness import evaluate
from channel.evaluation.squad import Sample
from common.profile import parse_profile

SAMPLES = [
    Sample("a", "The harbour of Veltra was rebuilt in 1821 by the engineer Mara Olsen after the great storm.",
           "Who rebuilt the harbour?", ("Mara Olsen",)),
    Sample("b", "Copper wire conducts electricity well; the mill on the river made it from 1790 to 1850.",
           "Until when did the mill make wire?", ("1850",)),
]
PROFILES = ("raw", "raw+text", "int4", "int4+text:q", "q2c:0.5+int4+tier:0.2:int8", "q2c:0.5+int4+tier:0.2:int8+text:q")


@pytest.fixture(scope="module")
def rows(tiny_llama):
    rows = evaluate(tiny_llama, SAMPLES, [parse_profile(p) for p in PROFILES], max_new_tokens=6)
    by_profile = {}
    for row in rows:
        by_profile.setdefault(row.profile, []).append(row)
    return {str(parse_profile(p)): by_profile[str(parse_profile(p))] for p in PROFILES}


def test_a_raw_cache_with_its_text_parts_prefilled_by_the_receiver_answers_as_the_full_cache(rows):
    for whole, text in zip(rows["raw"], rows["raw+text:h:q"]):
        assert text.token_match and text.kl_tf < 1e-6
        # Only the context travels as cache; the head and the question's ids are a few bytes.
        assert text.bytes < whole.bytes * (text.kept_tokens - 5) / whole.seq_len


@pytest.mark.parametrize("profile", ["int4", "q2c:0.5+int4+tier:0.2:int8"])
def test_the_question_as_text_saves_its_cache_and_counts_its_ids(rows, profile):
    cache, text = rows[str(parse_profile(profile))], rows[str(parse_profile(profile + "+text:q"))]
    for a, b in zip(cache, text):
        assert b.kept_tokens < a.kept_tokens and b.bytes < a.bytes
