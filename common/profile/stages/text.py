"""text[:h][:q] — parts of the prompt travel as token ids, prefilled by the receiver, not as cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from common.profile.stage import ProfileError, Stage, option

_USAGE = "text takes h (the template's head) and q (the question), each at most once: text:h, text:q, text:h:q"


@dataclass(frozen=True)
class Text(Stage):
    head: bool = option("head: the template's tokens before the context (the same in every prompt) travel as text; "
                        "the cache after it travels as a segment, so it takes no selection", False, kind=bool, flag="h")
    question: bool = option("question: the tokens after the context travel as text, after the cache (query-aware "
                            "selection still reads them at the sender)", False, kind=bool, flag="q")

    name: ClassVar[str] = "text"
    summary: ClassVar[str] = "parts of the prompt travel as token ids for the receiver to prefill (bare text: text:h:q)"
    order: ClassVar[int] = 80
    examples: ClassVar[tuple[str, ...]] = ("pca:b2.8:w+text", "int8+text:q")
    no_layers_message: ClassVar[str] = "one text stage per profile, for every layer (text:h, text:q or text:h:q)"
    once_message: ClassVar[str] = no_layers_message

    @classmethod
    def parse(cls, name: str, options: list[str]) -> Stage:
        if len(set(options)) != len(options) or not set(options) <= {"h", "q"}:
            raise ProfileError(_USAGE)
        return super().parse(name, options or ["h", "q"])

    def check(self) -> None:
        if not (self.head or self.question):
            raise ProfileError("text sends the head (h), the question (q) or both; give at least one")

    def conflict(self, profile) -> str | None:
        if self.head and profile.selection is not None:
            return ("with text:h the cache after the template's head travels as a segment, and segments carry no "
                    "selection; drop the selection stage, or send only the question as text (text:q)")
        return None
