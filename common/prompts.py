"""Prompts split at the boundary between context and question.

The prompt is tokenized as two pieces, `context_ids + question_ids`, so that the
sender can prefill the context alone (query-agnostic) and the receiver can add the
question on top of the received cache (`question_ids`, from the question's text) and
get exactly the same token ids as a prefill of the whole prompt.

Two kinds, chosen by the tokenizer:
- chat: a tokenizer with a chat template (an instruction-tuned model such as
  SmolLM2-135M-Instruct) gets one user turn with an instruction, through that template;
- completion: a tokenizer without one (a base model such as Gemma-3-270m, which would
  only continue a chat turn, instruction included) gets a plain completion prompt,
  `Context: …\\nQuestion: …\\nAnswer:`, and its answer ends at the end of that line
  (`newline_ids`: common.models adds them to the model's stop tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

INSTRUCTION = "Answer the question using the context. Reply with a short phrase copied from the context."
_SPLIT = "\x00KVWIRE_SPLIT\x00"


@dataclass(frozen=True)
class Prompt:
    context_ids: list[int]
    question_ids: list[int]
    head_len: int = 0  # context_ids[:head_len] are the template's head: the same whatever the context

    @property
    def ids(self) -> list[int]:
        return self.context_ids + self.question_ids


def is_chat(tokenizer) -> bool:
    """Whether prompts for this tokenizer go through its chat template (else: a completion prompt)."""
    return getattr(tokenizer, "chat_template", None) is not None


def _render(tokenizer, context: str, question: str) -> tuple[str, str]:
    if not is_chat(tokenizer):
        return f"Context: {context}\n", f"Question: {question}\nAnswer:"
    content = f"{INSTRUCTION}\n\nContext: {context}\n\n{_SPLIT}Question: {question}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    head, tail = text.split(_SPLIT)
    return head, tail


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _head_ids(tokenizer, head: str) -> list[int]:
    ids = _encode(tokenizer, head)
    if not is_chat(tokenizer) and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids  # a chat template writes its own
    return ids


def build_prompt(tokenizer, context: str, question: str) -> Prompt:
    head, tail = _render(tokenizer, context, question)
    context_ids = _head_ids(tokenizer, head)
    # The template's head: the tokens this prompt shares with one of an empty context.
    empty = _head_ids(tokenizer, _render(tokenizer, "", "")[0])
    head_len = next((i for i, (a, b) in enumerate(zip(context_ids, empty)) if a != b), min(len(context_ids), len(empty)))
    return Prompt(context_ids, _encode(tokenizer, tail), head_len)


def question_ids(tokenizer, question: str) -> list[int]:
    """The question part of the prompt alone, as the receiver builds it from text."""
    return _encode(tokenizer, _render(tokenizer, "", question)[1])


def newline_ids(tokenizer) -> list[int]:
    """Token ids whose text holds a line break: a completion prompt's answer ends at the first."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    special = set(tokenizer.all_special_ids)
    return [i for i, text in enumerate(texts) if "\n" in text and i not in special]
