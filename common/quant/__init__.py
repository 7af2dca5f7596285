"""Quantizers and bit packing. Each quantizer maps a 2-D float tensor to bytes and back.

QUANTIZERS is the registry of stage quantizers, the ones the profile grammar names; a new
one is its own module (the `StageQuantizer` protocol of `common.quant.base`) plus a line here.
"""

from __future__ import annotations

from common.quant.base import StageQuantizer
from common.quant.cast import Cast
from common.quant.nf4 import NF4
from common.quant.uniform import Uniform

QUANTIZERS: tuple[type[StageQuantizer], ...] = (Cast, Uniform, NF4)
STAGE_NAMES = tuple(name for quantizer in QUANTIZERS for name in quantizer.stage_names)


def quantizer_for(name: str, options: list[str]) -> StageQuantizer | None:
    """The stage quantizer that `name` names, built from its options (QuantError if it refuses
    them); None if no quantizer has that name."""
    for quantizer in QUANTIZERS:
        parsed = quantizer.from_stage(name, options)
        if parsed is not None:
            return parsed
    return None
