"""Chat prompts split at the boundary between context and question.

The prompt is tokenized as two pieces, `context_ids + question_ids`, so that the
sender can prefill the context alone (query-agnostic) and the receiver can add the
question on top of the received cache and get exactly the same token ids as a
prefill of the whole prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

INSTRUCTION = "Answer the question using the context. Reply with a short phrase copied from the context."
_SPLIT = "\x00KVWIRE_SPLIT\x00"


@dataclass(frozen=True)
class Prompt:
    context_ids: list[int]
    question_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return self.context_ids + self.question_ids


def _render(tokenizer, context: str, question: str) -> tuple[str, str]:
    content = f"{INSTRUCTION}\n\nContext: {context}\n\n{_SPLIT}Question: {question}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    head, tail = text.split(_SPLIT)
    return head, tail


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_prompt(tokenizer, context: str, question: str) -> Prompt:
    head, tail = _render(tokenizer, context, question)
    return Prompt(_encode(tokenizer, head), _encode(tokenizer, tail))


def question_ids(tokenizer, question: str) -> list[int]:
    """The question part of the prompt alone, as the receiver builds it from text."""
    return _encode(tokenizer, _render(tokenizer, "", question)[1])
