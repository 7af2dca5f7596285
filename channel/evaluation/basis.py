"""`kvwire calibrate --basis`: fit a model's PCA basis (common.quant.pca) on calibration prompts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from channel.evaluation.squad import Sample
from common.models import LoadedModel
from common.quant.pca import Basis
from common.select import SINK_TOKENS
from sender.prefill import prefill_prompt


def token_rows(t: torch.Tensor) -> torch.Tensor:
    """(1, kv_heads, tokens, head_dim) -> (tokens, kv_heads * head_dim): each token's heads side by side."""
    _, heads, tokens, dim = t.shape
    return t[0].float().transpose(0, 1).reshape(tokens, heads * dim)


# The first tokens of a prompt are attention sinks (SINK_TOKENS): outliers by orders of magnitude,
# which would bend the basis towards them. They are left out of the fit; `protect:s4` sends them
# apart, and importance tiers rank them first.


@torch.inference_mode()
def fit_basis(loaded: LoadedModel, samples: list[Sample], path: Path,
              progress: Callable[[], None] | None = None) -> Basis:
    """Prefill each sample's prompt (query-aware), collect every layer's RoPE-free keys and values
    (but the sink tokens'), and write the basis fitted on them to `path`."""
    rope = loaded.codec_context.rope
    keys: list[list[torch.Tensor]] = [[] for _ in range(loaded.fingerprint.num_layers)]
    values: list[list[torch.Tensor]] = [[] for _ in range(loaded.fingerprint.num_layers)]
    for sample in samples:
        kv = prefill_prompt(loaded, sample.context, sample.question).kv
        for layer, (k, v, positions) in enumerate(zip(kv.keys, kv.values, kv.positions)):
            kept = positions[0] >= SINK_TOKENS
            keys[layer].append(token_rows(rope.remove(layer, k, positions))[kept].cpu())
            values[layer].append(token_rows(v)[kept].cpu())
        if progress:
            progress()
    metadata = {"model": loaded.name, "weights_sha256": loaded.fingerprint.weights_sha256,
                "samples": len(samples), "tokens": sum(len(k) for k in keys[0]), "sink_tokens_left_out": SINK_TOKENS}
    tensors = Basis.fit([torch.cat(k) for k in keys], [torch.cat(v) for v in values])
    return Basis.save(tensors, metadata, path)
