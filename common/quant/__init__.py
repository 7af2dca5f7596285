"""Quantizers and bit packing. Each quantizer maps a 2-D float tensor to bytes and back.

QUANTIZERS lists the stage quantizers, the ones the profile grammar names; a new one is its
own module (the `StageQuantizer` protocol of `common.quant.base`), a line here, and its stage
in common.profile.stages.precision.
"""

from __future__ import annotations

from common.quant.base import StageQuantizer
from common.quant.cast import Cast
from common.quant.nf4 import NF4
from common.quant.uniform import Uniform

QUANTIZERS: tuple[type[StageQuantizer], ...] = (Cast, Uniform, NF4)
