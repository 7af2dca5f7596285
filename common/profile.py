"""The profile grammar: how a KV cache is compressed for the wire.

A profile is stages joined by `+`; each stage is a name with `:`-separated options.

    PRECISION[:OPTIONS][:k=channel|token][:v=channel|token]
                           a quantizer of common.quant.QUANTIZERS, which parses its own options:
      raw | lossless       the model's dtype, bit for bit (the default)
      fp16 | bf16          cast
      intN[:gG][:sym|asym] uniform N-bit quantization, N in 1..8, groups of G (default 32);
                           asymmetric by default (int1: symmetric, sign x mean|x|)
      nf4[:gG]             4-bit NormalFloat, absmax per group of G (default 64)
                           k= and v= (grouped quantizers only) pick the axis groups run along:
                           keys per channel and values per token by default (KIVI)
    svd:rR                 rank-R factors per layer and head; the precision stage, if any,
                           quantizes the factors (default fp16): svd:r32+int8
    PRECISION@A-B          per-layer override: layers A..B (inclusive) use PRECISION,
                           e.g. int2+int8@0-3 (mixed precision)
    METHOD:KEEP[:GRANULARITY][:BUDGET][:OPTIONS]
                           token selection, applied by the sender before the codec.
                           METHOD: a selector of common.select.METHODS: q2c, q2c-last, snapkv,
                           h2o, sink, window, random, knorm, capkv.
                           KEEP: a fraction of the context (0.5) or a count (256t).
                           GRANULARITY: global, layer or head (default depends on the method).
                           BUDGET: uniform (default), pyramid or adaptive.
                           OPTIONS: the selector's grammar_options: snapkv wN kN max|avg; h2o rF;
                           sink sN; random seedN; capkv and capkv-q sN tauF; capkv-leverage ridgeF.

Examples: int8, int4:g32, nf4, svd:r16, svd:r32+int8, int3:g64:sym, int2+int8@0-1,
q2c:0.5+int4:g32, snapkv:256t:w16, h2o:0.25:layer:pyramid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from common.quant import STAGE_NAMES, quantizer_for
from common.quant.base import MAX_GROUP, QuantError, StageQuantizer
from common.quant.cast import Cast
from common.quant.kv import CHANNEL, TOKEN, KVCodec
from common.quant.lowrank import LowRank
from common.select import GRANULARITIES, METHODS, Selection
from common.select.budgets import BUDGETS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# A header's profile is untrusted text. Long enough for a per-layer override on each of 80
# layers, and short enough that no number in it reaches Python's int() digit limit (4300).
MAX_PROFILE_CHARS = 2048
# The rank of a head's (tokens, head_dim) matrix is at most head_dim; a larger rank is
# min(rank, tokens, head_dim) anyway, so one bound (the group cap's) serves both.
MAX_RANK = MAX_GROUP
_AXIS_OPTION = re.compile(r"(?P<tensor>[kv])=(?P<axis>channel|token)")


class ProfileError(ValueError):
    """A profile spec that cannot be parsed, or that contradicts itself."""


@dataclass(frozen=True)
class Precision:
    """A quantizer, and the axis its groups run along for keys and for values (see common.quant.kv)."""

    quantizer: StageQuantizer
    key_axis: str = CHANNEL
    value_axis: str = TOKEN

    def __str__(self) -> str:
        parts = [self.quantizer.spec()]
        if self.key_axis != CHANNEL:
            parts.append(f"k={self.key_axis}")
        if self.value_axis != TOKEN:
            parts.append(f"v={self.value_axis}")
        return ":".join(parts)


@dataclass(frozen=True)
class Profile:
    precision: Precision | None = None  # None: raw, or fp16 factors under svd
    rank: int | None = None
    overrides: tuple[tuple[int, int, Precision], ...] = field(default=())
    selection: Selection | None = None

    def __str__(self) -> str:
        stages = [str(self.selection)] if self.selection else []
        if self.rank is not None:
            stages.append(f"svd:r{self.rank}")
        if self.precision is not None:
            stages.append(str(self.precision))
        if not stages:
            stages.append("raw")
        stages += [f"{p}@{a}" if a == b else f"{p}@{a}-{b}" for a, b, p in self.overrides]
        return "+".join(stages)

    @property
    def lossless(self) -> bool:
        return self == Profile()

    def precision_for(self, layer: int) -> Precision:
        for first, last, precision in self.overrides:
            if first <= layer <= last:
                return precision
        if self.precision is not None:
            return self.precision
        return Precision(Cast(torch.float16) if self.rank is not None else Cast())

    def codec(self, layer: int) -> KVCodec:
        precision = self.precision_for(layer)
        quantizer = precision.quantizer
        if self.rank is not None:
            quantizer = LowRank(self.rank, quantizer)
        return KVCodec(quantizer, precision.key_axis, precision.value_axis)

    def check_layers(self, num_layers: int) -> None:
        for first, last, _ in self.overrides:
            if last >= num_layers:
                raise ProfileError(f"override @{first}-{last} names layers beyond the model's {num_layers}")


_STAGE = re.compile(r"^(?P<name>[a-z0-9-]+)(?P<options>(:[^:@]+)*)(@(?P<first>\d+)(-(?P<last>\d+))?)?$")


def _parse_selection(name: str, options: list[str], stage: str) -> Selection:
    if not options:
        raise ProfileError(f"{stage!r}: give what to keep, e.g. {name}:0.5 or {name}:256t")
    keep_text, *rest = options
    try:
        keep = int(keep_text[:-1]) if keep_text.endswith("t") else float(keep_text)
    except ValueError:
        raise ProfileError(f"{stage!r}: keep {keep_text!r} is neither a fraction nor a count like 256t") from None
    if (isinstance(keep, int) and keep < 1) or (isinstance(keep, float) and not 0 < keep <= 1):
        raise ProfileError(f"{stage!r}: keep must be a fraction in (0, 1] or a positive count")
    granularity, budget, method_options = "", "uniform", []
    for option in rest:
        if option in GRANULARITIES:
            if granularity:
                raise ProfileError(f"{stage!r}: two granularities")
            granularity = option
        elif option in BUDGETS:
            budget = option
        else:
            match = re.fullmatch(r"([a-z]+)(\d+(\.\d+)?)?", option)
            known = METHODS[name].grammar_options
            if not match or match.group(1) not in known or (known[match.group(1)][1] is str) != (match.group(2) is None):
                raise ProfileError(f"{stage!r}: unknown option {option!r} for {name}; "
                                   f"known: {', '.join(GRANULARITIES + BUDGETS + tuple(known)) }")
            method_options.append((match.group(1), match.group(2) or ""))
    if budget != "uniform" and (granularity or METHODS[name].default_granularity) == "global":
        raise ProfileError(f"{stage!r}: a {budget} budget needs layer or head granularity, not global")
    selection = Selection(name, keep, granularity, budget, tuple(method_options))
    try:
        selection.selector()
    except ValueError as exc:
        raise ProfileError(f"{stage!r}: {exc}") from None
    return selection


def _parse_precision(name: str, options: list[str], stage: str) -> Precision:
    axes = {"k": CHANNEL, "v": TOKEN}
    own = []  # the quantizer's own options
    for option in options:
        match = _AXIS_OPTION.fullmatch(option)
        if match:
            axes[match["tensor"]] = match["axis"]
        else:
            own.append(option)
    try:
        quantizer = quantizer_for(name, own)
    except QuantError as exc:
        raise ProfileError(f"{stage!r}: {exc}") from None
    if quantizer is None:
        raise ProfileError(f"{stage!r}: unknown stage {name!r}; known: {', '.join(STAGE_NAMES)}, svd, "
                           f"{', '.join(METHODS)}")
    if len(own) < len(options) and not quantizer.grouped:
        raise ProfileError(f"{stage!r}: {name} takes no k= or v= options: it has no groups")
    return Precision(quantizer, axes["k"], axes["v"])


def parse_profile(spec: str | Profile) -> Profile:
    if isinstance(spec, Profile):
        return spec
    text = spec.strip().lower()
    if not text:
        raise ProfileError("empty profile; try raw, int8 or int4:g32")
    if len(text) > MAX_PROFILE_CHARS:
        raise ProfileError(f"profile of {len(text)} characters; at most {MAX_PROFILE_CHARS}")
    precision, rank, overrides, selection = None, None, [], None
    for stage in text.split("+"):
        match = _STAGE.match(stage)
        if not match:
            raise ProfileError(f"cannot parse stage {stage!r} of profile {spec!r}")
        name = match["name"]
        options = match["options"].split(":")[1:] if match["options"] else []
        if name in METHODS:
            if selection is not None:
                raise ProfileError(f"{spec!r}: two selection stages")
            if match["first"] is not None:
                raise ProfileError(f"{stage!r}: selection takes no layer range; use a pyramid or adaptive budget")
            selection = _parse_selection(name, options, stage)
            continue
        if name == "svd":
            if rank is not None:
                raise ProfileError(f"{spec!r}: two svd stages")
            if match["first"] is not None or len(options) != 1 or not re.fullmatch(r"r\d+", options[0]):
                raise ProfileError(f"{stage!r}: svd takes exactly one option, a positive rank such as svd:r32")
            if not 1 <= int(options[0][1:]) <= MAX_RANK:
                raise ProfileError(f"{stage!r}: svd takes a positive rank of at most {MAX_RANK}, such as svd:r32")
            rank = int(options[0][1:])
            continue
        parsed = _parse_precision(name, options, stage)
        if match["first"] is not None:
            first = int(match["first"])
            last = int(match["last"]) if match["last"] is not None else first
            if last < first:
                raise ProfileError(f"{stage!r}: layer range {first}-{last} is empty")
            if any(a <= last and first <= b for a, b, _ in overrides):
                raise ProfileError(f"{stage!r}: overlaps another per-layer override")
            overrides.append((first, last, parsed))
        elif precision is not None:
            raise ProfileError(f"{spec!r}: two precision stages, {precision} and {parsed}; use @A-B for per-layer ones")
        else:
            precision = parsed
    if precision == Precision(Cast()) and rank is None:
        precision = None  # raw is the default: one spelling for one profile
    return Profile(precision, rank, tuple(sorted(overrides, key=lambda o: o[0])), selection)
