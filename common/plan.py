"""A transfer's codec plan: built once from a profile (syntax) and the model's codec context (its
RoPE and PCA basis), then handed to the encoder (common.wire.Encoder) and the assembler as data.

The plan holds every layer's codec; per layer and kept-token count it gives the ranges of tokens
coded each way (importance tiers, protected tokens). Nothing on the frame path goes back to the
profile: a chunk finds its codec in the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from common.profile import Profile, ProfileError
from common.profile.stages.precision import Cast as CastStage
from common.profile.stages.precision import Precision, Raw
from common.quant.cast import Cast
from common.quant.kv import KVCodec
from common.quant.lowrank import LowRank
from common.quant.pca import PCACodec
from common.quant.pca_entropy import MAX_CLASS, EntropyPCACodec
from common.quant.transform import CodecContext, LayerCodec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def precision_for(profile: Profile, layer: int) -> Precision:
    """The precision stage of `layer` (raw, or fp16 factors under svd, where the profile names none)."""
    for first, last, precision in profile.overrides:
        if first <= layer <= last:
            return precision
    if profile.precision is not None:
        return profile.precision
    return CastStage("fp16") if profile.rank is not None else Raw()


def kv_codec(profile: Profile, layer: int) -> KVCodec:
    """The precision codec of `layer` (its low-rank factors' under svd)."""
    precision = precision_for(profile, layer)
    quantizer = precision.quantizer
    if profile.rank is not None:
        quantizer = LowRank(profile.rank, quantizer)
    return KVCodec(quantizer, precision.key_axis, precision.value_axis)


def uses_precision(profile: Profile, layer: int) -> bool:
    """Whether `layer` goes through a precision stage (an override, or no pca)."""
    return profile.pca is None or any(first <= layer <= last for first, last, _ in profile.overrides)


def sends_raw(profile: Profile, layer: int) -> bool:
    """Whether `layer` (or its low-rank factors) travels in the sender's own dtype, bit for bit."""
    return uses_precision(profile, layer) and precision_for(profile, layer).is_raw


def unsupported(profile: Profile, context: CodecContext | None) -> str | None:
    """Why a node with `context` cannot code `profile` (None: it can)."""
    if profile.needs_context and (context is None or context.rope is None):
        return f"{profile}: codes keys without RoPE, which needs the model's rotary embedding"
    if profile.pca is not None:
        basis = context.basis
        if basis is None or basis.digest != profile.pca.digest:
            return (f"{profile}: names PCA basis {profile.pca.digest}, and this model's is "
                    f"{basis.digest if basis else 'missing (fit one with kvwire calibrate --basis)'}")
        if basis.weights is None and any(s.weighted for s in profile.pca_stages):
            return f"{profile}: pca:w needs layer weights, and basis {basis.digest} holds none"
        if basis.joint is None and any(s.joint for s in profile.pca_stages):
            return (f"{profile}: pca:j needs the basis's joint transform, and basis {basis.digest} holds none "
                    "(fit one with kvwire calibrate --basis --joint)")
    return None


def tier_sizes(profile: Profile, kept: int) -> list[int]:
    """How many of a layer's `kept` tokens each importance tier holds; the rest follow."""
    sizes, left = [], kept
    for fraction, _ in profile.importance:
        sizes.append(min(left, round(fraction * kept)))
        left -= sizes[-1]
    return sizes


def runs(profile: Profile | None, kept: int) -> list[tuple[int, int]]:
    """The ranges of a layer's kept tokens that are each in position order: the importance tiers and
    the rest, or all of them."""
    bounds = [0]
    for size in tier_sizes(profile, kept) if profile is not None else []:
        bounds.append(bounds[-1] + size)
    return [(a, b) for a, b in zip(bounds, [*bounds[1:], kept]) if a < b]


def _pca_group(profile: Profile, layer: int) -> int:
    """Which pca stage codes `layer`: 0 the profile's, k the k-th per-layer one; -1 none (a precision stage)."""
    if uses_precision(profile, layer):
        return -1
    return next((k + 1 for k, (first, last, _) in enumerate(profile.pca_layers) if first <= layer <= last), 0)


def layer_codec(profile: Profile, layer: int, context: CodecContext | None) -> LayerCodec:
    """The codec of `layer`'s unprotected tokens, with its transforms."""
    if profile.rank is None and sends_raw(profile, layer):
        return LayerCodec(layer, kv_codec(profile, layer))  # raw is bit for bit: no transform
    reason = unsupported(profile, context)
    if reason:
        raise ProfileError(reason)
    if uses_precision(profile, layer):
        codec = kv_codec(profile, layer)
    else:
        basis = context.basis
        if layer >= basis.num_layers:
            raise ProfileError(f"basis {basis.digest} has {basis.num_layers} layers, not layer {layer}")
        group = _pca_group(profile, layer)
        stage = profile.pca_stages[group]
        pool = (tuple(i for i in range(basis.num_layers) if _pca_group(profile, i) == group)
                if stage.weighted else None)
        codec = (EntropyPCACodec.for_layer(basis, layer, stage.bits, pool, stage.importance,
                                           MAX_CLASS if stage.floor is None else stage.floor, stage.joint,
                                           stage.rans)
                 if stage.entropy
                 else PCACodec.for_layer(basis, layer, stage.bits, stage.key_bits, pool))
    rope = context.rope if profile.needs_context else None
    return LayerCodec(layer, codec, rope, profile.rotation)


@dataclass(frozen=True)
class CodecPlan:
    """Every layer's codecs for one transfer under one (bound) profile."""

    profile: Profile  # with its basis hash filled in
    codecs: tuple[LayerCodec, ...]  # per layer: the codec of its unprotected, untiered tokens
    tier_codecs: tuple[tuple[LayerCodec, ...], ...]  # per layer: each importance tier's codec

    @classmethod
    def build(cls, profile: Profile, context: CodecContext | None, num_layers: int, bind: bool = True) -> CodecPlan:
        """ProfileError if the profile names layers the model lacks, or needs what `context` lacks. `bind`:
        a pca profile without a basis hash takes the context's (the sender's; a receiver takes the hash
        the header names, or none)."""
        if bind:
            profile = profile.bind(context)
        profile.check_layers(num_layers)
        codecs, tier_codecs = [], []
        for layer in range(num_layers):
            main = layer_codec(profile, layer, context)
            codecs.append(main)
            raw = profile.rank is None and sends_raw(profile, layer)
            tier_codecs.append(tuple(main if raw else replace(main, codec=KVCodec(p.quantizer, p.key_axis, p.value_axis))
                                     for _, p in profile.importance))
        return cls(profile, tuple(codecs), tuple(tier_codecs))

    @property
    def entropy_coded(self) -> bool:
        return self.profile.entropy_coded

    def runs(self, kept: int) -> list[tuple[int, int]]:
        return runs(self.profile, kept)

    def tiers(self, layer: int, kept: int) -> list[tuple[int, int, LayerCodec]]:
        """How `layer`'s kept tokens [0, kept) are coded: (start, end, codec) ranges, in order."""
        main = self.codecs[layer]
        if self.profile.importance:
            ranges, start = [], 0
            for size, codec in zip(tier_sizes(self.profile, kept), self.tier_codecs[layer]):
                ranges.append((start, start + size, codec))
                start += size
            ranges.append((start, kept, main))
            return [r for r in ranges if r[0] < r[1]]
        if self.profile.protect is None:
            return [(0, kept, main)] if kept else []
        sink_count, recent_count = self.profile.protect
        sink = min(sink_count, kept)
        recent = max(sink, kept - recent_count)
        plain = LayerCodec(layer, KVCodec(Cast(torch.float16)))
        ranges = [(0, sink, plain), (sink, recent, main), (recent, kept, plain)]
        return [r for r in ranges if r[0] < r[1]]
