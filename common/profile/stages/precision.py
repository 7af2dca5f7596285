"""Precision stages: how each number of a layer's keys and values is written.

`raw` (alias `lossless`): the model's dtype, bit for bit; `fp16`, `bf16`: a cast; `intN`: uniform
N-bit codes per group; `nf4`: 4-bit NormalFloat per group. A precision stage with `@A-B` applies
to layers A..B only (mixed precision: int2+int8@0-3). The quantizers themselves live in
common.quant; `quantizer` builds one (importing torch only then).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from common.profile.stage import ProfileError, Stage, option

MAX_GROUP = 4096  # common.quant.base.MAX_GROUP: the largest useful group (see there)
AXES = ("channel", "token")
LAYERS_DOC = "layers: the first and last layer (inclusive) this stage codes; absent: every other layer"
_GROUP_RANGE = f"group size must be positive and at most {MAX_GROUP}, got {{value}}"


@dataclass(frozen=True)
class Precision(Stage):
    """A stage that picks the quantizer of a layer's numbers."""

    order: ClassVar[int] = 20
    layered: ClassVar[bool] = True
    layer_order: ClassVar[int] = 1
    exclusive: ClassVar[str] = "precision"
    grouped: ClassVar[bool] = False  # groups run along an axis: k= and v= apply

    @property
    def quantizer(self):
        """The common.quant quantizer this stage names."""
        raise NotImplementedError

    @property
    def is_raw(self) -> bool:
        return False

    @classmethod
    def parse_options(cls, name: str, options: list[str]) -> dict:
        if not cls.grouped and any(re.fullmatch(r"[kv]=.*", o) for o in options):
            raise ProfileError(f"{name} takes no k= or v= options: it has no groups")
        return super().parse_options(name, options)

    def _axes(self) -> list[str]:  # grouped stages have the fields key_axis and value_axis
        return ([f"k={self.key_axis}"] * (self.key_axis != "channel") + [f"v={self.value_axis}"] * (self.value_axis != "token"))


@dataclass(frozen=True)
class Raw(Precision):
    layers: tuple[int, int] | None = option(LAYERS_DOC, None)

    name: ClassVar[str] = "raw"
    summary: ClassVar[str] = "the model's dtype, bit for bit (alias lossless); the default"
    examples: ClassVar[tuple[str, ...]] = ("raw", "int4+raw@0-1")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return ("raw", "lossless")

    @property
    def is_raw(self) -> bool:
        return True

    @property
    def key_axis(self) -> str:
        return "channel"

    @property
    def value_axis(self) -> str:
        return "token"

    @property
    def quantizer(self):
        from common.quant.cast import Cast

        return Cast()


@dataclass(frozen=True)
class Cast(Precision):
    to: str = option("dtype: the wire dtype", "fp16", kind=str, choices=("fp16", "bf16"), in_name=True)
    layers: tuple[int, int] | None = option(LAYERS_DOC, None)

    name: ClassVar[str] = "cast"
    summary: ClassVar[str] = "a cast of every number to fp16 or bf16"
    examples: ClassVar[tuple[str, ...]] = ("fp16", "bf16")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return ("fp16", "bf16")

    @classmethod
    def parse(cls, name: str, options: list[str]) -> Stage:
        return cls.from_values({"to": name, **cls.parse_options(name, options)})

    def compact_name(self) -> str:
        return self.to

    @property
    def key_axis(self) -> str:
        return "channel"

    @property
    def value_axis(self) -> str:
        return "token"

    @property
    def quantizer(self):
        import torch

        from common.quant.cast import Cast as CastQuantizer

        return CastQuantizer({"fp16": torch.float16, "bf16": torch.bfloat16}[self.to])


@dataclass(frozen=True)
class Grouped(Precision):
    grouped: ClassVar[bool] = True

    def _layout(self) -> list[str]:
        return self._axes()


@dataclass(frozen=True)
class Int(Grouped):
    bits: int = option("bits: per code", kind=int, low=1, high=8, in_name=True,
                       range_message="uniform quantization takes 1 to 8 bits, got {value}")
    group: int = option("group size: numbers sharing a scale", 32, kind=int, low=1, high=MAX_GROUP, letter="g",
                        range_message=_GROUP_RANGE)
    symmetric: bool | None = option("symmetric: codes around zero (scale only) instead of scale and offset; "
                                    "default: int1 symmetric, the others not", None, kind=bool,
                                    words={"sym": True, "asym": False})
    key_axis: str = option("key axis: the axis the keys' groups run along", "channel", kind=str,
                            choices=AXES, assign="k")
    value_axis: str = option("value axis: the axis the values' groups run along", "token", kind=str,
                              choices=AXES, assign="v")
    layers: tuple[int, int] | None = option(LAYERS_DOC, None)

    name: ClassVar[str] = "int"
    summary: ClassVar[str] = "uniform N-bit quantization (intN, N in 1..8) per group (KIVI axes by default)"
    examples: ClassVar[tuple[str, ...]] = ("int8", "int4:g32", "int3:g64:sym", "int1:asym", "int4:k=token:v=channel")

    def __post_init__(self):
        if self.symmetric is None:  # the default depends on the bits: one spelling for one stage
            object.__setattr__(self, "symmetric", self.bits == 1 if isinstance(self.bits, int) else False)
        super().__post_init__()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return ("int1..int8",)

    @classmethod
    def matches(cls, name: str) -> bool:
        return re.fullmatch(r"int\d+", name) is not None

    @classmethod
    def parse(cls, name: str, options: list[str]) -> Stage:
        values = cls.parse_options(name, options)
        return cls.from_values({"bits": name[3:], **values})

    def compact(self) -> str:
        parts = [f"int{self.bits}", f"g{self.group}"]
        if self.symmetric != (self.bits == 1):
            parts.append("sym" if self.symmetric else "asym")
        return ":".join(parts + self._axes()) + self.layer_suffix()

    def long_form(self) -> dict:
        out = super().long_form()
        if self.symmetric == (self.bits == 1):
            out.pop("symmetric", None)
        return out

    @property
    def quantizer(self):
        from common.quant.uniform import Uniform

        return Uniform(self.bits, self.group, self.symmetric)


@dataclass(frozen=True)
class NF4(Grouped):
    group: int = option("group size: numbers sharing a scale", 64, kind=int, low=1, high=MAX_GROUP, letter="g",
                        range_message=_GROUP_RANGE)
    symmetric: bool = option("symmetric: always (NormalFloat codes are symmetric)", True, kind=bool,
                             words={"sym": True, "asym": False})
    key_axis: str = option("key axis: the axis the keys' groups run along", "channel", kind=str,
                            choices=AXES, assign="k")
    value_axis: str = option("value axis: the axis the values' groups run along", "token", kind=str,
                              choices=AXES, assign="v")
    layers: tuple[int, int] | None = option(LAYERS_DOC, None)

    name: ClassVar[str] = "nf4"
    summary: ClassVar[str] = "4-bit NormalFloat, absmax per group"
    examples: ClassVar[tuple[str, ...]] = ("nf4", "nf4:g16", "nf4:k=token")

    def check(self) -> None:
        if not self.symmetric:
            raise ProfileError("nf4 is symmetric by construction")

    def compact(self) -> str:
        return ":".join([f"nf4:g{self.group}"] + self._axes()) + self.layer_suffix()

    @property
    def quantizer(self):
        from common.quant.nf4 import NF4 as NF4Quantizer

        return NF4Quantizer(self.group)
