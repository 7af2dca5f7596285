"""svd:rR — rank-R factors of each layer's and head's (tokens, head_dim) matrices; the precision
stage, if any, quantizes the factors (fp16 by default): svd:r32+int8."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from common.profile.stage import ProfileError, Stage, option
from common.profile.stages.precision import MAX_GROUP

# A head's matrix has rank at most head_dim; a larger rank is min(rank, tokens, head_dim) anyway,
# so one bound (the group cap's) serves both.
MAX_RANK = MAX_GROUP
_USAGE = "svd takes exactly one option, a positive rank such as svd:r32"


@dataclass(frozen=True)
class SVD(Stage):
    rank: int = option("rank: of the factors per layer and head", kind=int, low=1, high=MAX_RANK, letter="r",
                       range_message=f"svd takes a positive rank of at most {MAX_RANK}, such as svd:r32, got {{value}}")

    name: ClassVar[str] = "svd"
    summary: ClassVar[str] = "low-rank factors per layer and head; the precision stage quantizes them (default fp16)"
    order: ClassVar[int] = 10
    examples: ClassVar[tuple[str, ...]] = ("svd:r16", "svd:r32+int8")
    no_layers_message: ClassVar[str] = _USAGE

    @classmethod
    def parse(cls, name: str, options: list[str]) -> Stage:
        if len(options) != 1 or not re.fullmatch(r"r\d+", options[0]):
            raise ProfileError(_USAGE)
        return super().parse(name, options)
