"""Per-layer sensitivity: the KL divergence of the next-token distribution when only one layer is compressed."""

from __future__ import annotations

from collections.abc import Callable

import torch

from channel.evaluation.harness import kl_divergence
from channel.evaluation.squad import Sample
from common import wire
from common.kvstate import KVState, greedy_decode
from common.models import LoadedModel
from common.profile import Profile
from sender.prefill import prefill_prompt, select_tokens


def first_token_logits(loaded: LoadedModel, kv: KVState, tail_ids: list[int]) -> torch.Tensor:
    logits: list = []
    greedy_decode(loaded.model, kv.to_cache(loaded.config), tail_ids, kv.seq_len, 1, logits)
    return logits[0]


def layer_sensitivity(loaded: LoadedModel, samples: list[Sample], profile: Profile,
                      progress: Callable[[], None] | None = None) -> list[float]:
    """Mean over samples of KL(full || only layer l compressed with `profile`), for each layer l."""
    totals = torch.zeros(loaded.fingerprint.num_layers, dtype=torch.float64)
    for sample in samples:
        pre = prefill_prompt(loaded, sample.context, sample.question, True, [profile])
        reference = first_token_logits(loaded, pre.kv, pre.tail_ids)
        frames = wire.encode(select_tokens(loaded, pre, profile), profile, loaded.fingerprint,
                             context=loaded.codec_context)
        compressed = wire.decode(frames, loaded.fingerprint, device=loaded.device, context=loaded.codec_context)
        for layer in range(pre.kv.num_layers):
            mixed = KVState(
                keys=[compressed.keys[i] if i == layer else k for i, k in enumerate(pre.kv.keys)],
                values=[compressed.values[i] if i == layer else v for i, v in enumerate(pre.kv.values)],
                positions=[compressed.positions[i] if i == layer else p for i, p in enumerate(pre.kv.positions)],
                seq_len=pre.kv.seq_len,
            )
            totals[layer] += kl_divergence(reference, first_token_logits(loaded, mixed, pre.tail_ids))
        if progress:
            progress()
    return (totals / len(samples)).tolist()
