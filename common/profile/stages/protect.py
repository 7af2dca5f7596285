"""protect:sS:rR — the first S and last R kept tokens of each layer travel at fp16, untouched by the
other stages (KVTC keeps sink and recent tokens uncompressed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from common.profile.stage import ProfileError, Stage, option

MAX_PROTECTED = 1 << 20


@dataclass(frozen=True)
class Protect(Stage):
    sink: int = option("sink tokens: the first kept tokens sent at fp16", 0, kind=int, low=0, high=MAX_PROTECTED,
                       letter="s")
    recent: int = option("recent tokens: the last kept tokens sent at fp16", 0, kind=int, low=0, high=MAX_PROTECTED,
                         letter="r")

    name: ClassVar[str] = "protect"
    summary: ClassVar[str] = "the first S and last R kept tokens of each layer travel at fp16"
    order: ClassVar[int] = 60
    examples: ClassVar[tuple[str, ...]] = ("pca:b2+protect:s4:r32", "int4+protect:r8")

    def check(self) -> None:
        if not (self.sink or self.recent):
            raise ProfileError("protect at least one token, e.g. protect:s4:r32")

    def compact(self) -> str:
        return f"protect:s{self.sink}:r{self.recent}"
