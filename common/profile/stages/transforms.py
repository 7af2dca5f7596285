"""Transforms before the precision stage, undone by the receiver: prerope and rot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from common.profile.stage import Stage, option

MAX_SEED = 2**32 - 1  # common.quant.rotation.MAX_SEED


def _on_raw(profile) -> str | None:
    if profile.precision is None and profile.rank is None and not profile.overrides:
        return ("rot and prerope change nothing on a raw cache (sent bit for bit); add a precision stage, "
                "e.g. int4+rot")
    return None


@dataclass(frozen=True)
class PreRoPE(Stage):
    name: ClassVar[str] = "prerope"
    summary: ClassVar[str] = ("keys coded with RoPE removed at their positions; the receiver re-applies it (KVQuant); "
                              "a no-op where a layer is sent raw")
    order: ClassVar[int] = 40
    examples: ClassVar[tuple[str, ...]] = ("int4+prerope",)
    needs_rope: ClassVar[bool] = True

    def conflict(self, profile) -> str | None:
        return _on_raw(profile)


@dataclass(frozen=True)
class Rotation(Stage):
    seed: int = option("seed: of the randomized Hadamard rotation", 0, kind=int, low=0, high=MAX_SEED, letter="seed",
                       range_message=f"rotation seed must lie in [0, {MAX_SEED}], got {{value}}")

    name: ClassVar[str] = "rot"
    summary: ClassVar[str] = ("a seeded randomized Hadamard rotation of each head's keys and values before the "
                              "precision stage, inverted by the receiver (QuaRot)")
    order: ClassVar[int] = 50
    examples: ClassVar[tuple[str, ...]] = ("int4+rot", "int4+rot:seed7")
    needs_rope: ClassVar[bool] = False

    def conflict(self, profile) -> str | None:
        return _on_raw(profile)
