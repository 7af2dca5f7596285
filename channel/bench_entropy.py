"""`kvwire bench entropy`: does an entropy coder with a static per-(layer, channel) model beat zstd?

For each profile, over real prompts' caches, the code symbols of every layer are grouped into
streams: one per layer, tensor and channel (a uniform quantizer's) or component (pca's). Half the
prompts fit a static model (symbol frequencies per stream, add-1/2 smoothed); on the other half
we measure, in bits per element of the cache:
- packed: the codec's payload as it is (codes, plus the scales of a uniform quantizer);
- zstd: that payload through zstd, what kvwire sends;
- order0: the empirical entropy of each prompt's codes under one table, the classic bound;
- static: the cross-entropy of the codes under the fitted per-stream model, what an rANS or
  arithmetic coder with shipped tables reaches (within a fraction of a percent), plus the
  parameters a uniform quantizer sends beside its codes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import zstandard

from channel.evaluation.squad import Sample
from common import wire
from common.models import LoadedModel
from common.plan import CodecPlan, layer_codec
from common.profile import Profile, parse_profile
from common.quant.entropy import code_symbols, entropy_bits
from common.quant.kv import CHANNEL, KVCodec, _matrix_shape
from common.quant.packing import packed_size, unpack
from common.quant.pca import PCACodec
from common.quant.pca_entropy import laplace
from sender.prefill import prefill_prompt


def _streams(codec, payload: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    """The payload's code symbols, each one's stream id (channel or component), their width in bits
    (the widest, for pca) and the payload bytes that are not codes; None for a codec without codes."""
    _, heads, tokens, dim = shape
    if isinstance(codec, PCACodec):
        symbols, ids, offset = [], [], 0
        for b, idx in codec.widths():
            count = tokens * idx.numel()
            codes = unpack(payload[offset:offset + packed_size(count, b)], b, count).view(tokens, idx.numel())
            symbols.append(codes.reshape(-1))
            ids.append(idx.to(codes.device).expand(tokens, -1).reshape(-1))
            offset += packed_size(count, b)
        return torch.cat(symbols).long(), torch.cat(ids), int(codec.bits.max()), 0
    found = code_symbols(codec, payload, shape) if isinstance(codec, KVCodec) else None
    if found is None:
        return None
    symbols, bits = found  # the keys' codes, then the values', each matrix in row-major order
    ids, code_bytes = [], 0
    for tensor, axis in enumerate((codec.key_axis, codec.value_axis)):
        rows, cols = _matrix_shape(shape, axis)
        if axis == CHANNEL:  # rows are channels
            channel = torch.arange(rows, device=payload.device).unsqueeze(1).expand(rows, cols)
        else:  # rows are (head, token), columns the head's channels
            head = torch.arange(rows, device=payload.device).unsqueeze(1) // tokens
            channel = head * dim + torch.arange(cols, device=payload.device)
        ids.append(channel.reshape(-1) + tensor * heads * dim)
        code_bytes += packed_size(rows * cols, bits)
    return symbols.long(), torch.cat(ids), bits, payload.numel() - code_bytes


@torch.inference_mode()
def entropy_study(loaded: LoadedModel, samples: list[Sample], profiles: list[Profile], zstd_level: int = 3,
                  progress: Callable[[], None] | None = None) -> list[dict]:
    context = loaded.codec_context
    compressor = zstandard.ZstdCompressor(level=zstd_level)
    fit, test = samples[: len(samples) // 2], samples[len(samples) // 2:]
    caches = []
    for sample in samples:
        caches.append(prefill_prompt(loaded, sample.context, sample.question).kv)
        if progress:
            progress()
    rows = []
    for profile in profiles:
        profile = profile.bind(context)
        tables: dict[int, torch.Tensor] = {}  # layer -> (streams, alphabet) counts from the fit half
        totals = {"packed": 0.0, "zstd": 0.0, "order0": 0.0, "static": 0.0, "elements": 0}
        for index, kv in enumerate(caches):
            fitting = index < len(fit)
            for layer, (k, v, p) in enumerate(zip(kv.keys, kv.values, kv.positions)):
                codec = layer_codec(profile, layer, context)
                payload = codec.encode(k, v, p)
                found = _streams(codec.codec, payload, tuple(k.shape))
                if found is None:
                    raise ValueError(f"{profile}: its codec has no fixed-width code symbols to model "
                                     "(an entropy-coded pca:...:e stage is already range-coded)")
                symbols, ids, bits, other_bytes = found
                streams = int(ids.max()) + 1
                counts = torch.zeros(streams * 2**bits, dtype=torch.float64)
                counts.index_add_(0, ids * 2**bits + symbols, torch.ones_like(symbols, dtype=torch.float64))
                counts = counts.view(streams, 2**bits)
                if fitting:
                    tables[layer] = tables.get(layer, torch.zeros_like(counts)) + counts
                    continue
                model = tables[layer] + 0.5
                log_p = (model / model.sum(1, keepdim=True)).log2()
                totals["static"] += float(-(counts * log_p).sum()) + 8 * other_bytes
                totals["order0"] += entropy_bits(symbols, 2**bits) * symbols.numel() + 8 * other_bytes
                totals["packed"] += 8 * payload.numel()
                totals["zstd"] += 8 * len(compressor.compress(payload.cpu().numpy().tobytes()))
                totals["elements"] += 2 * k.numel()
        per = {key: totals[key] / totals["elements"] for key in ("packed", "zstd", "order0", "static")}
        rows.append({"profile": str(profile), **{f"{key}_bits": value for key, value in per.items()},
                     "static_vs_zstd": per["static"] / per["zstd"], "zstd_vs_order0": per["zstd"] / per["order0"],
                     "fit_prompts": len(fit), "test_prompts": len(test)})
    return rows


def verdict(rows: list[dict], threshold: float = 0.10) -> str:
    best = min(rows, key=lambda r: r["static_vs_zstd"])
    saving = 1 - best["static_vs_zstd"]
    if saving >= threshold:
        return (f"a static per-(layer, channel) model saves {saving:.0%} over zstd on {best['profile']}: "
                f"worth an entropy-coding stage")
    return (f"a static per-(layer, channel) model saves at most {saving:.0%} over zstd ({best['profile']}), "
            f"under the {threshold:.0%} bar: zstd stays")


@torch.inference_mode()
def coder_study(loaded: LoadedModel, samples: list[Sample], profiles: list[Profile],
                progress: Callable[[], None] | None = None) -> list[dict]:
    """Each entropy-coded pca profile (pca:...:e, no text stage) with the range coder and with rANS
    (pca:...:a), on real prompts' caches through the wire's sender (wire.encode): bits per element of the
    cache and encode seconds per prompt on this machine; both against the rate the basis's model predicts
    for the indices (their cross-entropy under the tables, what an ideal coder of those tables reaches)."""
    context = loaded.codec_context
    bound = [profile.bind(context) for profile in profiles]
    for profile in bound:
        if not profile.entropy_coded or profile.pca.rans or profile.text_head or profile.text_question:
            raise ValueError(f"{profile}: give a range-coded pca:...:w:e stage without a text stage")
    caches = []
    for sample in samples:
        caches.append(prefill_prompt(loaded, sample.context, sample.question, True, bound).kv)
        if progress:
            progress()
    elements = sum(2 * k.numel() for kv in caches for k in kv.keys)
    rows = []
    for profile in bound:
        row = {"profile": str(profile)}
        for coder, spec in (("range", profile), ("rans", parse_profile(str(profile).replace(":e", ":e:a", 1)))):
            start, sent = time.perf_counter(), 0
            for kv in caches:
                frames = wire.encode(kv, spec, loaded.fingerprint, context=context)
                sent += sum(len(f.chunk.payload) for f in frames if f.WhichOneof("kind") == "chunk")
            row[f"{coder}_bits"] = 8 * sent / elements
            row[f"{coder}_encode_s"] = (time.perf_counter() - start) / len(caches)
        plan = CodecPlan.build(profile, context, caches[0].num_layers)
        predicted = 0.0
        for kv in caches:
            for layer, (k, v, p) in enumerate(zip(kv.keys, kv.values, kv.positions)):
                codec = plan.codecs[layer]
                if codec.codec.coded.numel():
                    raw = codec.encode(k, v, p, codec.classes(kv.importance[layer] if kv.importance else None, p))
                    predicted += _model_bits(codec.codec, raw.cpu().numpy().tobytes(), k.shape[2])
        row.update(model_bits=predicted / elements, prompts=len(caches))
        row.update(range_vs_model=row["range_bits"] / row["model_bits"], rans_vs_model=row["rans_bits"] / row["model_bits"],
                   rans_vs_range=row["rans_bits"] / row["range_bits"])
        rows.append(row)
    return rows


def _model_bits(codec, raw: bytes, tokens: int) -> float:
    """The cross-entropy, in bits, of a raw payload's indices under their tables (pca_entropy.laplace)."""
    coded = codec.coded.numel()
    indices = np.frombuffer(raw, dtype="<i2", count=tokens * coded).reshape(tokens, coded).astype(np.int64)
    classes = (np.frombuffer(raw, dtype=np.int8, offset=2 * tokens * coded) if codec.per_token
               else np.zeros(tokens, np.int8))
    tables = codec._tables(classes)
    bits = 0.0
    for index in np.unique(tables):
        probabilities, top = laplace(int(index))
        picked = tables == index
        bits += float(-np.log2(probabilities[indices[picked] + top] / probabilities.sum()).sum())
    return bits
