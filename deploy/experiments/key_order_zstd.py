"""Would storing key codes token-major cost wire bytes? An experiment that decided the key payload's
layout, not a test.

Keys per channel are coded as (channel, token) rows: a channel's codes over its group of tokens
sit together. The GPU encoder has to transpose keys to write them so (README, GPU section);
token-major codes would not. This measures what zstd (the wire's level 3) makes of each order, on
SmolLM2's own keys of an essay, chunk by chunk as the wire sends them:

    HF_HUB_OFFLINE=1 .venv/bin/python deploy/experiments/key_order_zstd.py [TOKENS]
"""

from __future__ import annotations

import sys

import torch
import zstandard

from channel.evaluation.haystack import haystack_context
from common.kvstate import prefill
from common.models import load_model
from common.quant.kv import KVCodec
from common.quant.nf4 import NF4
from common.quant.packing import pack, packed_size, unpack
from common.quant.uniform import Uniform

CHUNK_TOKENS = 512


def token_major(quantizer, payload: torch.Tensor, heads: int, dim: int, tokens: int) -> torch.Tensor:
    """A key payload (codes of the (heads * dim, tokens) matrix, then per-group parameters) with its
    codes and parameters reordered token-major: (heads, tokens, dim) and (heads, groups, dim)."""
    count = heads * dim * tokens
    code_bytes = packed_size(count, quantizer.code_bits)
    codes = unpack(payload[:code_bytes], quantizer.code_bits, count).view(heads, dim, tokens).transpose(1, 2)
    groups = -(-tokens // quantizer.group)
    params = payload[code_bytes:].view(heads, dim, groups, -1).transpose(1, 2)
    return torch.cat([pack(codes.reshape(-1).contiguous(), quantizer.code_bits), params.reshape(-1)])


def main(tokens: int) -> None:
    loaded = load_model("smollm2-135m", "cpu", "float32")
    ids = loaded.tokenizer(haystack_context(loaded.tokenizer, tokens)).input_ids[:tokens]
    kv = prefill(loaded.model, ids)
    compressor = zstandard.ZstdCompressor(level=3)
    print(f"SmolLM2-135M, {len(ids)} tokens of the haystack essays, keys per channel, chunks of {CHUNK_TOKENS} tokens")
    for quantizer in (Uniform(8), Uniform(4), Uniform(2), NF4()):
        packed = channel_major = tok_major = 0
        for keys, values in zip(kv.keys, kv.values):
            for start in range(0, keys.shape[2], CHUNK_TOKENS):
                k = keys[:, :, start:start + CHUNK_TOKENS]
                _, heads, n, dim = k.shape
                payload = KVCodec(quantizer).encode(k, values[:, :, start:start + CHUNK_TOKENS])[:quantizer.size(heads * dim, n)]
                packed += payload.numel()
                channel_major += len(compressor.compress(payload.numpy().tobytes()))
                tok_major += len(compressor.compress(token_major(quantizer, payload, heads, dim, n).numpy().tobytes()))
        print(f"{quantizer.spec():10s} key bytes packed {packed:>10,}  zstd channel-major {channel_major:>10,}  "
              f"token-major {tok_major:>10,}  ({tok_major / channel_major - 1:+.2%})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
