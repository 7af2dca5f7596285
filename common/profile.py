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

    prerope                keys are coded with RoPE removed at their positions; the receiver
                           re-applies it (KVQuant). A no-op where the layer is sent raw.
    rot[:seedN]            a seeded randomized Hadamard rotation of each head's keys and values
                           before the precision stage, inverted on the receiver (QuaRot); seed < 2^32
    pca:bB[:kK|:w[:e[:j][:iG[:fF]]]][:hHASH] transform coding (KVTC): keys (RoPE removed) and values in the model's
                           PCA basis, B bits per element on average allocated over the components
                           (zero bits: dropped), K of them per key element (default B; the values
                           get 2B - K); w: allocated over all the layers the stage codes at once,
                           by the basis's calibrated layer weights (the answer's sensitivity); e (with
                           w): entropy-coded instead, one weighted step for every component, range-coded
                           under the basis's model, B bits per element expected (the data sets the
                           actual rate; `common.quant.pca_entropy`); j (with e): in the basis's joint
                           transform of each layer's keys and values (kvwire calibrate --basis --joint);
                           iG (with e): each token's step set
                           by its share of the question's attention, G how strongly (0 < G <= 4); fF
                           (with i): no token's step coarser than 2^(F/2) times the component's
                           (0 <= F <= 8, default 8); the basis is
                           the one `kvwire calibrate --basis` shipped, named by its hash (the sender
                           fills it in). Takes no other precision stage; per-layer overrides apply,
                           and so do per-layer bits: pca:b0.5+pca:b2@13-24 (KVTuner's per-layer budget).
    protect:sS:rR          the first S and last R kept tokens of each layer travel at fp16, untouched
                           by the other stages (KVTC keeps sink and recent tokens uncompressed)
    tier:F:PRECISION       importance-aware precision (ZipCache): the selection's top F of each
                           layer's kept tokens (the question and template first, the first 4
                           (attention sinks) next, then the context by score) travel at PRECISION;
                           tiers stack in the order given, the rest take the profile's precision:
                           q2c:1+int2+tier:0.1:int8+tier:0.2:int4. Needs a selection stage; not with
                           protect.
    text[:h][:q]           parts of the prompt travel as token ids, prefilled by the receiver, not as
                           cache: h the template's head (the tokens before the context, the same in
                           every prompt), q the question (the tokens after the context; query-aware
                           selection still reads it at the sender). Bare text is text:h:q. The cache
                           after a text head travels as a segment, so text:h takes no selection.

Examples: int8, int4:g32, nf4, svd:r16, svd:r32+int8, int3:g64:sym, int2+int8@0-1,
q2c:0.5+int4:g32, snapkv:256t:w16, h2o:0.25:layer:pyramid, int4+prerope+rot, pca:b2+protect:s4:r32,
pca:b2.8:w+text, pca:b1.75:w:e:i1+text, pca:b1.75:w:e:i1:f3+text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch

from common.quant import STAGE_NAMES, quantizer_for
from common.quant.base import MAX_GROUP, QuantError, StageQuantizer
from common.quant.cast import Cast
from common.quant.kv import CHANNEL, TOKEN, KVCodec
from common.quant.lowrank import LowRank
from common.quant.pca import HASH_CHARS, MAX_BITS, PCACodec
from common.quant.pca_entropy import MAX_CLASS, MAX_STRENGTH, EntropyPCACodec
from common.quant.rotation import MAX_SEED
from common.quant.transform import CodecContext, LayerCodec
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


def _exact(number: float) -> str:
    """Short text that parses back to exactly `number`."""
    short = f"{number:g}"
    return short if float(short) == number else repr(number)


@dataclass(frozen=True)
class PCAStage:
    """The PCA transform-coding stage: bits per element, the keys' share of them, the basis's hash."""

    bits: float
    key_bits: float | None = None  # bits per key element; the values get 2 * bits - key_bits (default: bits each)
    digest: str | None = None  # None until the sender binds its basis (Profile.bind)
    weighted: bool = False  # bits allocated over all the stage's layers by the basis's layer weights
    entropy: bool = False  # one weighted step for every component, range-coded (needs weighted)
    importance: float = 0.0  # with entropy: how far the question's attention moves each token's step
    floor: int | None = None  # with importance: the lowest step class, -floor (None: -MAX_CLASS)
    joint: bool = False  # with entropy: in the basis's joint transform of keys and values

    def __str__(self) -> str:
        parts = [f"pca:b{_exact(self.bits)}"]
        if self.key_bits is not None:
            parts.append(f"k{_exact(self.key_bits)}")
        if self.weighted:
            parts.append("w")
        if self.entropy:
            parts.append("e")
        if self.joint:
            parts.append("j")
        if self.importance:
            parts.append(f"i{_exact(self.importance)}")
        if self.floor is not None:
            parts.append(f"f{self.floor}")
        if self.digest:
            parts.append(f"h{self.digest}")
        return ":".join(parts)


@dataclass(frozen=True)
class Profile:
    precision: Precision | None = None  # None: raw, or fp16 factors under svd
    rank: int | None = None
    overrides: tuple[tuple[int, int, Precision], ...] = field(default=())
    selection: Selection | None = None
    prerope: bool = False
    rotation: int | None = None  # seed
    pca: PCAStage | None = None
    pca_layers: tuple[tuple[int, int, PCAStage], ...] = ()  # per-layer bits of the pca stage: (first, last, bits)
    protect: tuple[int, int] | None = None  # (sink, recent) kept tokens sent at fp16
    importance: tuple[tuple[float, Precision], ...] = ()  # tiers: (fraction of the kept tokens, precision)
    text_head: bool = False  # the template's head travels as token ids (a text segment)
    text_question: bool = False  # the tokens after the context travel as token ids, after the cache

    def __str__(self) -> str:
        stages = [str(self.selection)] if self.selection else []
        if self.rank is not None:
            stages.append(f"svd:r{self.rank}")
        if self.precision is not None:
            stages.append(str(self.precision))
        if self.pca is not None:
            stages.append(str(self.pca))
        if not stages:
            stages.append("raw")
        if self.prerope:
            stages.append("prerope")
        if self.rotation is not None:
            stages.append("rot" if self.rotation == 0 else f"rot:seed{self.rotation}")
        if self.protect is not None:
            stages.append(f"protect:s{self.protect[0]}:r{self.protect[1]}")
        stages += [f"tier:{_exact(fraction)}:{precision}" for fraction, precision in self.importance]
        if self.text_head or self.text_question:
            stages.append(":".join(["text"] + ["h"] * self.text_head + ["q"] * self.text_question))
        stages += [f"{p}@{a}" if a == b else f"{p}@{a}-{b}" for a, b, p in self.pca_layers + self.overrides]
        return "+".join(stages)

    @property
    def as_cache(self) -> Profile:
        """The profile of the part that travels as cache: this one without its text stage."""
        return replace(self, text_head=False, text_question=False)

    @property
    def needs_context(self) -> bool:
        """Whether the codecs need the model's RoPE or basis (a `CodecContext`)."""
        return self.prerope or self.pca is not None

    def bind(self, context: CodecContext | None) -> Profile:
        """The profile naming the basis `context` holds, for a pca profile given without its hash."""
        if self.pca is None or self.pca.digest is not None:
            return self
        if context is None or context.basis is None:
            raise ProfileError(f"{self}: no PCA basis for this model; fit one with `kvwire calibrate --basis`")
        return replace(self, pca=replace(self.pca, digest=context.basis.digest))

    def sends_raw(self, layer: int) -> bool:
        """Whether `layer` (or its low-rank factors) travels in the sender's own dtype, bit for bit."""
        return self._uses_precision(layer) and self.precision_for(layer).quantizer == Cast()

    def _raw_layer(self, layer: int) -> bool:
        return self.rank is None and self.sends_raw(layer)

    def unsupported(self, context: CodecContext | None) -> str | None:
        """Why a node with `context` cannot code this profile (None: it can)."""
        if self.needs_context and (context is None or context.rope is None):
            return f"{self}: codes keys without RoPE, which needs the model's rotary embedding"
        if self.pca is not None:
            basis = context.basis
            if basis is None or basis.digest != self.pca.digest:
                return (f"{self}: names PCA basis {self.pca.digest}, and this model's is "
                        f"{basis.digest if basis else 'missing (fit one with kvwire calibrate --basis)'}")
            if basis.weights is None and any(s.weighted for s in self._pca_stages):
                return f"{self}: pca:w needs layer weights, and basis {basis.digest} holds none"
            if basis.joint is None and any(s.joint for s in self._pca_stages):
                return (f"{self}: pca:j needs the basis's joint transform, and basis {basis.digest} holds none "
                        "(fit one with kvwire calibrate --basis --joint)")
        return None

    @property
    def needs_importance(self) -> bool:
        """Whether a pca stage steps each token by the question's attention (pca:...:e:iG): the sender
        captures that attention in its prefill (query-aware) and hands it to the wire in the KVState."""
        return self.pca is not None and any(stage.importance for stage in self._pca_stages)

    @property
    def entropy_coded(self) -> bool:
        """Whether a pca stage of the profile range-codes its own payload (pca:...:e)."""
        return self.pca is not None and any(stage.entropy for stage in self._pca_stages)

    @property
    def _pca_stages(self) -> list[PCAStage]:
        return [self.pca] + [stage for _, _, stage in self.pca_layers]

    def _pca_group(self, layer: int) -> int:
        """Which pca stage codes `layer`: 0 the profile's, k the k-th per-layer one; -1 none (a precision stage)."""
        if self._uses_precision(layer):
            return -1
        return next((k + 1 for k, (first, last, _) in enumerate(self.pca_layers) if first <= layer <= last), 0)

    def _uses_precision(self, layer: int) -> bool:
        """Whether `layer` goes through a precision stage (an override, or no pca)."""
        return self.pca is None or any(first <= layer <= last for first, last, _ in self.overrides)

    def layer_codec(self, layer: int, context: CodecContext | None = None) -> LayerCodec:
        """The codec of `layer`'s unprotected tokens, with its transforms; ProfileError if the
        profile needs what `context` lacks (the model's RoPE, or the basis it names)."""
        if self._raw_layer(layer):
            return LayerCodec(layer, self.codec(layer))  # raw is bit for bit: no transform
        reason = self.unsupported(context)
        if reason:
            raise ProfileError(reason)
        if self._uses_precision(layer):
            codec = self.codec(layer)
        else:
            if layer >= context.basis.num_layers:
                raise ProfileError(f"basis {context.basis.digest} has {context.basis.num_layers} layers, not layer {layer}")
            group = self._pca_group(layer)
            stage = self._pca_stages[group]
            pool = (tuple(i for i in range(context.basis.num_layers) if self._pca_group(i) == group)
                    if stage.weighted else None)
            codec = (EntropyPCACodec.for_layer(context.basis, layer, stage.bits, pool, stage.importance,
                                                MAX_CLASS if stage.floor is None else stage.floor, stage.joint)
                     if stage.entropy
                     else PCACodec.for_layer(context.basis, layer, stage.bits, stage.key_bits, pool))
        rope = context.rope if self.needs_context else None
        return LayerCodec(layer, codec, rope, self.rotation)

    def tier_sizes(self, kept: int) -> list[int]:
        """How many of a layer's `kept` tokens each importance tier holds; the rest follow."""
        sizes, left = [], kept
        for fraction, _ in self.importance:
            sizes.append(min(left, round(fraction * kept)))
            left -= sizes[-1]
        return sizes

    def runs(self, kept: int) -> list[tuple[int, int]]:
        """The ranges of a layer's kept tokens that are each in position order: the importance
        tiers and the rest, or all of them."""
        bounds = [0]
        for size in self.tier_sizes(kept):
            bounds.append(bounds[-1] + size)
        return [(a, b) for a, b in zip(bounds, [*bounds[1:], kept]) if a < b]

    def tiers(self, layer: int, kept: int, context: CodecContext | None = None) -> list[tuple[int, int, LayerCodec]]:
        """How `layer`'s kept tokens [0, kept) are coded: (start, end, codec) ranges, in order."""
        main = self.layer_codec(layer, context)
        if self.importance:
            ranges, start = [], 0
            for size, (_, precision) in zip(self.tier_sizes(kept), self.importance):
                codec = main if self._raw_layer(layer) else replace(main, codec=KVCodec(
                    precision.quantizer, precision.key_axis, precision.value_axis))
                ranges.append((start, start + size, codec))
                start += size
            ranges.append((start, kept, main))
            return [r for r in ranges if r[0] < r[1]]
        if self.protect is None:
            return [(0, kept, main)] if kept else []
        sink = min(self.protect[0], kept)
        recent = max(sink, kept - self.protect[1])
        plain = LayerCodec(layer, KVCodec(Cast(torch.float16)))
        ranges = [(0, sink, plain), (sink, recent, main), (recent, kept, plain)]
        return [r for r in ranges if r[0] < r[1]]

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
        for first, last, _ in self.overrides + self.pca_layers:
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
    precision, rank, overrides, selection, transforms, importance = None, None, [], None, {}, []
    pca_layers, text_parts = [], None
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
        if name == "pca" and match["first"] is not None:
            layers = _layer_range(match, stage, overrides + pca_layers)
            bits = _parse_pca(options, stage)
            if bits.digest is not None:
                raise ProfileError(f"{stage!r}: the basis hash goes on the profile's pca stage, not on per-layer bits")
            pca_layers.append((*layers, bits))
            continue
        if name in _TRANSFORM_STAGES:
            if match["first"] is not None:
                raise ProfileError(f"{stage!r}: {name} takes no layer range")
            if name in transforms:
                raise ProfileError(f"{spec!r}: two {name} stages")
            transforms[name] = _TRANSFORM_STAGES[name](options, stage)
            continue
        if name == "text":
            if match["first"] is not None or text_parts is not None:
                raise ProfileError(f"{stage!r}: one text stage per profile, for every layer (text:h, text:q or text:h:q)")
            text_parts = _parse_text(options, stage)
            continue
        if name == "tier":
            if match["first"] is not None or len(options) < 2:
                raise ProfileError(f"{stage!r}: a tier is tier:FRACTION:PRECISION, e.g. tier:0.1:int8")
            fraction = _number(options[0], stage, "tier fraction", 0, 1)
            importance.append((fraction, _parse_precision(options[1], options[2:], stage)))
            continue
        parsed = _parse_precision(name, options, stage)
        if match["first"] is not None:
            overrides.append((*_layer_range(match, stage, overrides + pca_layers), parsed))
        elif precision is not None:
            raise ProfileError(f"{spec!r}: two precision stages, {precision} and {parsed}; use @A-B for per-layer ones")
        else:
            precision = parsed
    pca = transforms.get("pca")
    if pca_layers and pca is None:
        raise ProfileError(f"{spec!r}: per-layer pca bits need a pca stage for the other layers, e.g. pca:b0.5+pca:b2@13-24")
    if pca is not None and (precision is not None or rank is not None or "rot" in transforms or "prerope" in transforms):
        raise ProfileError(f"{spec!r}: pca allocates its own bits over RoPE-free, decorrelated components; it takes "
                           "no other precision, svd, rot or prerope stage (per-layer overrides @A-B apply)")
    if precision == Precision(Cast()) and rank is None:
        precision = None  # raw is the default: one spelling for one profile
    if importance and (selection is None or "protect" in transforms or rank is not None):
        raise ProfileError(f"{spec!r}: tiers rank the tokens a selection stage scores (add one, e.g. q2c:1), "
                           "and take no protect or svd stage")
    if sum(fraction for fraction, _ in importance) > 1:
        raise ProfileError(f"{spec!r}: the tiers hold more than all the kept tokens")
    if ({"rot", "prerope"} & transforms.keys()) and precision is None and rank is None and not overrides:
        raise ProfileError(f"{spec!r}: rot and prerope change nothing on a raw cache (sent bit for bit); add a "
                           "precision stage, e.g. int4+rot")
    text_parts = text_parts or set()
    if "h" in text_parts and selection is not None:
        raise ProfileError(f"{spec!r}: with text:h the cache after the template's head travels as a segment, and "
                           "segments carry no selection; drop the selection stage, or send only the question as text (text:q)")
    return Profile(precision, rank, tuple(sorted(overrides, key=lambda o: o[0])), selection,
                   prerope="prerope" in transforms, rotation=transforms.get("rot"), pca=pca,
                   pca_layers=tuple(sorted(pca_layers, key=lambda o: o[0])),
                   protect=transforms.get("protect"), importance=tuple(importance),
                   text_head="h" in text_parts, text_question="q" in text_parts)


def _layer_range(match: re.Match, stage: str, taken: list[tuple]) -> tuple[int, int]:
    """The @A-B of a per-layer stage, which must not overlap the ranges already `taken`."""
    first = int(match["first"])
    last = int(match["last"]) if match["last"] is not None else first
    if last < first:
        raise ProfileError(f"{stage!r}: layer range {first}-{last} is empty")
    if any(a <= last and first <= b for a, b, _ in taken):
        raise ProfileError(f"{stage!r}: overlaps another per-layer override")
    return first, last


def _options(options: list[str], stage: str, known: dict[str, str]) -> dict[str, str]:
    """Options like b1.5 or s4 -> {"b": "1.5", "s": "4"}, each of `known` (letter -> what it takes) at most once."""
    found = {}
    for option in options:
        key = next((k for k in known if option.startswith(k) and re.fullmatch(r"[0-9a-f.]+", option[len(k):])), None)
        if key is None or key in found:
            raise ProfileError(f"{stage!r}: unknown or repeated option {option!r}; options: "
                               + ", ".join(f"{k}{v}" for k, v in known.items()))
        found[key] = option[len(key):]
    return found


def _number(text: str, stage: str, what: str, low: float, high: float, integer: bool = False) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise ProfileError(f"{stage!r}: {what} {text!r} is not a number") from None
    if not low <= value <= high:
        raise ProfileError(f"{stage!r}: {what} must lie in [{low:{'d' if integer else 'g'}}, {high:{'d' if integer else 'g'}}], got {text}")
    return value


def _parse_prerope(options: list[str], stage: str) -> bool:
    if options:
        raise ProfileError(f"{stage!r}: prerope takes no options")
    return True


def _parse_rotation(options: list[str], stage: str) -> int:
    found = _options(options, stage, {"seed": "N (0 .. 2^32 - 1)"})
    return int(_number(found.get("seed", "0"), stage, "rotation seed", 0, MAX_SEED, integer=True))


def _parse_pca(options: list[str], stage: str) -> PCAStage:
    flags = {flag: flag in options for flag in ("w", "e", "j")}
    for flag in flags:
        if options.count(flag) > 1:
            raise ProfileError(f"{stage!r}: repeated option {flag!r}")
    weighted, entropy = flags["w"], flags["e"]
    if entropy and not weighted:
        raise ProfileError(f"{stage!r}: e (entropy coding) steps every component by the layer weights; add w")
    if flags["j"] and not entropy:
        raise ProfileError(f"{stage!r}: j (keys and values in the joint transform) is a form of e; add e, e.g. pca:b3:w:e:j")
    options = [o for o in options if o not in flags]
    found = _options(options, stage, {"b": "BITS per element (0..8]", "k": "BITS per key element",
                                      "h": "HASH of the basis", "i": "STRENGTH of the question's attention (0..4]",
                                      "f": f"the lowest step CLASS's magnitude (0..{MAX_CLASS})"})
    if "b" not in found:
        raise ProfileError(f"{stage!r}: give the bits per element, e.g. pca:b2")
    bits = _number(found["b"], stage, "bits per element", 0, MAX_BITS)
    if bits == 0:
        raise ProfileError(f"{stage!r}: bits per element must be positive")
    key_bits = None
    if "k" in found:
        key_bits = _number(found["k"], stage, "bits per key element", max(0.0, 2 * bits - MAX_BITS), min(2 * bits, MAX_BITS))
    if weighted and key_bits is not None:
        raise ProfileError(f"{stage!r}: with w the layer weights share the bits between keys and values; drop k")
    digest = found.get("h")
    if digest is not None and not re.fullmatch(f"[0-9a-f]{{{HASH_CHARS}}}", digest):
        raise ProfileError(f"{stage!r}: a basis hash is {HASH_CHARS} hex digits")
    strength = 0.0
    if "i" in found:
        if not entropy:
            raise ProfileError(f"{stage!r}: i (per-token steps by the question's attention) needs e, e.g. pca:b2:w:e:i1")
        strength = _number(found["i"], stage, "importance strength", 0, MAX_STRENGTH)
        if strength == 0:
            raise ProfileError(f"{stage!r}: the importance strength must be positive (leave i out for none)")
    floor = None
    if "f" in found:
        if not strength:
            raise ProfileError(f"{stage!r}: f (the lowest step class) bounds the per-token steps of i; add i, e.g. pca:b2:w:e:i2:f2")
        floor = _number(found["f"], stage, "lowest step class", 0, MAX_CLASS, integer=True)
    return PCAStage(bits, key_bits, digest, weighted, entropy, strength, floor, flags["j"])


def _parse_text(options: list[str], stage: str) -> set[str]:
    if len(set(options)) != len(options) or not set(options) <= {"h", "q"}:
        raise ProfileError(f"{stage!r}: text takes h (the template's head) and q (the question), "
                           "each at most once: text:h, text:q, text:h:q")
    return set(options) or {"h", "q"}


def _parse_protect(options: list[str], stage: str) -> tuple[int, int]:
    found = _options(options, stage, {"s": "N sink tokens", "r": "N recent tokens"})
    counts = tuple(int(_number(found.get(k, "0"), stage, f"{k}-count", 0, 1 << 20, integer=True)) for k in "sr")
    if not any(counts):
        raise ProfileError(f"{stage!r}: protect at least one token, e.g. protect:s4:r32")
    return counts


_TRANSFORM_STAGES = {"prerope": _parse_prerope, "rot": _parse_rotation, "pca": _parse_pca, "protect": _parse_protect}
