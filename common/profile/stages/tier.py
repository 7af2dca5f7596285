"""tier:F:PRECISION — importance-aware precision (ZipCache): the selection's top F of each layer's
kept tokens (the question and template first, the first 4 (attention sinks) next, then the context
by score) travel at PRECISION; tiers stack in the order given, the rest take the profile's
precision: q2c:1+int2+tier:0.1:int8+tier:0.2:int4. Needs a selection stage; not with protect or svd."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from common.profile.stage import ProfileError, Stage, exact, option
from common.profile.stages.precision import Precision

_USAGE = "a tier is tier:FRACTION:PRECISION, e.g. tier:0.1:int8"


@dataclass(frozen=True)
class Tier(Stage):
    fraction: float = option("fraction: of each layer's kept tokens in this tier", kind=float, low=0, high=1,
                             positional=True, range_message="tier fraction must lie in [0, 1], got {value}")
    precision: Any = option("precision: the precision stage of the tier's tokens (a compact precision stage, "
                            "or its long form)", kind=object, positional=True)

    name: ClassVar[str] = "tier"
    summary: ClassVar[str] = "the selection's top fraction of each layer's kept tokens travels at its own precision"
    order: ClassVar[int] = 70
    repeatable: ClassVar[bool] = True
    examples: ClassVar[tuple[str, ...]] = ("q2c:1+int2+tier:0.1:int8+tier:0.2:int4",)
    no_layers_message: ClassVar[str] = _USAGE

    @classmethod
    def parse(cls, name: str, options: list[str]) -> Stage:
        if len(options) < 2:
            raise ProfileError(_USAGE)
        from common.profile.grammar import parse_precision

        return cls.from_values({"fraction": options[0], "precision": parse_precision(options[1], options[2:])})

    @classmethod
    def from_values(cls, values: dict) -> Stage:
        precision = values.get("precision")
        if isinstance(precision, (dict, str)):
            from common.profile.grammar import precision_from_json

            values = {**values, "precision": precision_from_json(precision)}
        elif "precision" in values and not isinstance(precision, Precision):
            raise ProfileError(f"precision (the tier's precision stage) takes a precision stage, got {precision!r}")
        return super().from_values(values)

    def check(self) -> None:
        if getattr(self.precision, "layers", None) is not None:
            raise ProfileError("a tier's precision takes no layer range")

    def compact(self) -> str:
        return f"tier:{exact(self.fraction)}:{self.precision.compact()}"

    def long_form(self) -> dict:
        return {"stage": self.name, "fraction": self.fraction, "precision": self.precision.long_form()}

    def conflict(self, profile) -> str | None:
        if profile.selection is None or profile.protect is not None or profile.rank is not None:
            return ("tiers rank the tokens a selection stage scores (add one, e.g. q2c:1), and take no protect or svd "
                    "stage")
        if sum(tier.fraction for tier in profile.tiers) > 1:
            return "the tiers hold more than all the kept tokens"
        return None
