"""Prompts: chat for instruction-tuned tokenizers (unchanged ids), completion for base models."""

import copy
import hashlib
import json

import pytest

from channel.evaluation.squad import load_squad
from common.kvstate import greedy_decode, prefill, reference_generate
from common.prompts import INSTRUCTION, build_prompt, is_chat, newline_ids, question_ids

# build_prompt(SmolLM2's tokenizer, ...) as it was before completion prompts existed
# (commit 2474a93): (sample index or (context, question), context length, question length,
# sha256[:16] of the JSON context ids, of the JSON question ids).
SMOLLM2_BEFORE = [
    (0, 215, 15, "be2e93d655a01595", "671cb31bd8ebc9a2"),
    (1, 215, 16, "be2e93d655a01595", "7f35e182f3c1507f"),
    (30, 222, 17, "3d931e15be674520", "3e0ba204647b01f5"),
    (60, 151, 23, "156948bd13fc2fd4", "9d3317f0f3cf59c1"),
    (90, 195, 20, "b3fca6acfad3a103", "0555f0569b8b2bfc"),
    (119, 146, 26, "1b26bb716748bd44", "45d1909417f70175"),
    (("", "What?"), 47, 10, "4014f62e69c92950", "8941461ffe943532"),
]
NORMANDY = ("The Normans gave their name to Normandy, a region in France.", "Where is Normandy?")
NORMANDY_IDS_BEFORE = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198,
    1, 4093, 198, 21350, 260, 1962, 1015, 260, 2468, 30, 2720, 318, 351, 253, 1890, 8715, 19309, 429, 260, 2468, 30,
    198, 198, 17548, 42, 378, 8706, 487, 4502, 480, 1462, 288, 33009, 28, 253, 2695, 281, 4649, 30, 1116, 17872, 42,
    7655, 314, 33009, 47, 2, 198, 1, 520, 9531, 198,
]


def _sha(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def test_smollm2_prompt_ids_are_unchanged(smollm2):
    samples = load_squad(limit=120)
    tokenizer = smollm2.tokenizer
    assert is_chat(tokenizer)
    for case, context_len, question_len, context_sha, question_sha in SMOLLM2_BEFORE:
        context, question = case if isinstance(case, tuple) else (samples[case].context, samples[case].question)
        prompt = build_prompt(tokenizer, context, question)
        assert (len(prompt.context_ids), len(prompt.question_ids)) == (context_len, question_len), case
        assert (_sha(prompt.context_ids), _sha(prompt.question_ids)) == (context_sha, question_sha), case
        assert question_ids(tokenizer, question) == prompt.question_ids
    assert build_prompt(tokenizer, *NORMANDY).ids == NORMANDY_IDS_BEFORE


def test_chat_models_keep_their_stop_tokens(smollm2, tiny_llama):
    """No newline stop for chat prompts: SmolLM2 (and the tiny models, on its tokenizer) stop at EOS only."""
    for loaded in (smollm2, tiny_llama):
        assert is_chat(loaded.tokenizer)
        assert loaded.stop_ids == {loaded.tokenizer.eos_token_id}


@pytest.fixture(scope="module")
def base_tokenizer(smollm2):
    """SmolLM2's tokenizer without its chat template: what a base model's tokenizer looks like here."""
    tokenizer = copy.deepcopy(smollm2.tokenizer)
    tokenizer.chat_template = None
    return tokenizer


def test_completion_prompt_for_a_tokenizer_without_chat_template(base_tokenizer):
    assert not is_chat(base_tokenizer)
    for sample in load_squad(limit=40)[::13]:
        prompt = build_prompt(base_tokenizer, sample.context, sample.question)
        text = base_tokenizer.decode(prompt.ids)
        bos = base_tokenizer.bos_token
        assert text == f"{bos}Context: {sample.context}\nQuestion: {sample.question}\nAnswer:"
        assert INSTRUCTION not in text
        assert base_tokenizer.decode(prompt.context_ids) == f"{bos}Context: {sample.context}\n"
        # What the receiver prefills on top of a query-agnostic cache is the rest of the same prompt.
        assert question_ids(base_tokenizer, sample.question) == prompt.question_ids
        assert prompt.ids[:len(prompt.context_ids)] == prompt.context_ids
        # Tokenizing the two pieces apart gives the ids of the whole text.
        assert base_tokenizer(text[len(bos):], add_special_tokens=False)["input_ids"] == prompt.ids[1:]


def test_newline_ids(base_tokenizer):
    ids = set(newline_ids(base_tokenizer))
    assert base_tokenizer.convert_tokens_to_ids("Ċ") in ids  # "\n" in byte-level BPE
    assert all("\n" in base_tokenizer.decode([i]) for i in ids)
    assert not ids & set(base_tokenizer("Paris is in France.", add_special_tokens=False)["input_ids"])


def test_stop_tokens_end_receiver_decode_and_generate_alike(tiny_llama, monkeypatch):
    """Extra stop tokens (a base model's newlines) end greedy_decode exactly where model.generate ends."""
    prompt = build_prompt(tiny_llama.tokenizer, *NORMANDY).ids
    free = reference_generate(tiny_llama.model, prompt, 12)
    stop = free[4]
    cut = free.index(stop) + 1
    eos = tiny_llama.tokenizer.eos_token_id
    monkeypatch.setattr(tiny_llama.model.generation_config, "eos_token_id", [eos, stop])
    assert tiny_llama.stop_ids == {eos, stop}
    expected = reference_generate(tiny_llama.model, prompt, 12)
    assert expected == free[:cut]
    kv = prefill(tiny_llama.model, prompt[:-1])
    assert greedy_decode(tiny_llama.model, kv.to_cache(tiny_llama.config), prompt[-1:], kv.seq_len, 12) == expected


def test_the_template_head_is_what_every_prompt_shares(smollm2, base_tokenizer):
    for tokenizer in (smollm2.tokenizer, base_tokenizer):
        prompts = [build_prompt(tokenizer, s.context, s.question) for s in load_squad(limit=40)[::13]]
        heads = {tuple(p.ids[:p.head_len]) for p in prompts}
        assert len(heads) == 1 and all(0 < p.head_len < len(p.context_ids) for p in prompts)
        # The head ends where the context begins: the next token already differs between prompts.
        assert len({p.ids[p.head_len] for p in prompts}) > 1
        assert tokenizer.decode(heads.pop()).endswith("Context:")
