"""The teacher-forced KL of `kvwire eval`: the receiver's next-token distributions along the full-cache answer."""

import pytest

from channel.evaluation.harness import (
    aggregate,
    evaluate,
    kl_divergence,
    teacher_forced_logits,
)
from channel.evaluation.squad import Sample
from common.kvstate import greedy_decode
from common.profile import parse_profile
from sender.prefill import prefill_prompt

SAMPLES = [
    Sample("a", "The harbour of Veltra was rebuilt in 1821 by the engineer Mara Olsen after the great storm.",
           "Who rebuilt the harbour?", ("Mara Olsen",)),
    Sample("b", "Copper wire conducts electricity well; the mill on the river made it from 1790 to 1850.",
           "Until when did the mill make wire?", ("1850",)),
]


PROFILES = [parse_profile(p) for p in ("lossless", "int2", "h2o:0.5:layer:pyramid+lossless")]
LOSSLESS, DAMAGED, PYRAMID = (str(p) for p in PROFILES)


@pytest.fixture(scope="module")
def rows(tiny_llama):
    return evaluate(tiny_llama, SAMPLES, PROFILES, max_new_tokens=6)


def test_lossless_is_exactly_zero_and_damage_is_positive(rows):
    by_profile = {}
    for row in rows:
        by_profile.setdefault(row.profile, []).append(row)
    assert all(row.kl_tf == 0.0 and row.kl_first == 0.0 for row in by_profile[LOSSLESS])
    assert all(row.kl_tf > 0 for row in by_profile[DAMAGED])
    assert all(row.kl_tf > 0 for row in by_profile[PYRAMID])  # token-by-token path
    summary = {s["profile"]: s for s in aggregate(rows)}
    assert summary[LOSSLESS]["kl_tf"] == 0.0 and summary[DAMAGED]["kl_tf"] > 0


def test_teacher_forced_rows_are_the_decoding_distributions(tiny_llama):
    """Row j is the distribution after the tail and answer[:j]: row 0 is the first token's, and
    each row's argmax is the greedy answer's next token (the full cache, teacher-forced on its own answer)."""
    pre = prefill_prompt(tiny_llama, SAMPLES[0].context, SAMPLES[0].question)
    first: list = []
    answer = greedy_decode(tiny_llama.model, pre.kv.to_cache(tiny_llama.config), pre.tail_ids, pre.kv.seq_len, 6, first)
    forced = teacher_forced_logits(tiny_llama.model, pre.kv.to_cache(tiny_llama.config), pre.tail_ids,
                                   pre.kv.seq_len, answer)
    assert forced.shape[0] == len(answer)
    assert forced.argmax(-1).tolist() == answer
    assert kl_divergence(first[0], forced[0]) < 1e-6
