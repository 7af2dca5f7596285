"""KVState: the one object that crosses every boundary.

Per layer, keys and values of shape (batch, kv_heads, kept_tokens, head_dim), stored
after RoPE; the original position of every kept token, shape (kv_heads, kept_tokens);
and the original sequence length. Decoding continues at `seq_len`, never at the
number of kept tokens.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass
class KVState:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: list[torch.Tensor]
    seq_len: int
    # Per layer, each position's share of the question's attention ((positions,), indexed by position;
    # summed over heads): what a pca:...:e:iG stage steps tokens by. The sender's prefill fills it in
    # when a profile asks; positions index it, so every view of the state keeps it as it is.
    importance: list[torch.Tensor] | None = None

    def __post_init__(self):
        if not (len(self.keys) == len(self.values) == len(self.positions)):
            raise ValueError("keys, values and positions need one entry per layer")
        for layer, (k, v, p) in enumerate(zip(self.keys, self.values, self.positions)):
            if k.shape != v.shape or k.dim() != 4:
                raise ValueError(f"layer {layer}: keys {tuple(k.shape)} and values {tuple(v.shape)} differ or are not 4-D")
            if p.shape != (k.shape[1], k.shape[2]):
                raise ValueError(f"layer {layer}: positions {tuple(p.shape)} != (kv_heads, kept_tokens) {tuple(k.shape[1:3])}")

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    @property
    def fp16_nbytes(self) -> int:
        """Size of these keys and values as fp16: the reference every byte ratio is taken against."""
        return sum(2 * (k.numel() + v.numel()) for k, v in zip(self.keys, self.values))

    def kept_tokens(self, layer: int) -> int:
        return self.keys[layer].shape[2]

    def token_range(self, start: int, end: int) -> KVState:
        """The kept tokens whose positions lie in [start, end) (every head must keep the same positions)."""
        keys, values, positions = [], [], []
        for layer, (k, v, p) in enumerate(zip(self.keys, self.values, self.positions)):
            if not (p == p[:1]).all():
                raise ValueError(f"layer {layer}: heads keep different positions; a token range needs them shared")
            lo, hi = torch.searchsorted(p[0].contiguous(), torch.tensor([start, end], device=p.device)).tolist()
            keys.append(k[:, :, lo:hi])
            values.append(v[:, :, lo:hi])
            positions.append(p[:, lo:hi])
        return KVState(keys, values, positions, end, self.importance)

    def before(self, end: int) -> KVState:
        """The kept tokens at positions before `end`, in the order kept (every head of a layer must keep
        equally many of them: the tokens after a selectable context are kept by every head)."""
        keys, values, positions = [], [], []
        for layer, (k, v, p) in enumerate(zip(self.keys, self.values, self.positions)):
            mask = p < end
            counts = mask.sum(1)
            if not (counts == counts[0]).all():
                raise ValueError(f"layer {layer}: heads keep different numbers of tokens before position {end}")
            heads, count = p.shape[0], int(counts[0])
            keys.append(k[0][mask].view(1, heads, count, k.shape[-1]))
            values.append(v[0][mask].view(1, heads, count, v.shape[-1]))
            positions.append(p[mask].view(heads, count))
        return KVState(keys, values, positions, min(end, self.seq_len), self.importance)

    def in_position_order(self) -> KVState:
        """Each head's kept tokens sorted by position (importance tiers arrive most important first)."""
        keys, values, positions = [], [], []
        for k, v, p in zip(self.keys, self.values, self.positions):
            p, order = p.sort(dim=1)
            index = order[None, :, :, None].expand(1, -1, -1, k.shape[-1])
            keys.append(k.gather(2, index))
            values.append(v.gather(2, index))
            positions.append(p)
        return KVState(keys, values, positions, self.seq_len, self.importance)

    def extend(self, other: KVState) -> KVState:
        """This state followed by `other`, whose positions come after this one's `seq_len`."""
        return KVState([torch.cat(pair, dim=2) for pair in zip(self.keys, other.keys)],
                       [torch.cat(pair, dim=2) for pair in zip(self.values, other.values)],
                       [torch.cat(pair, dim=1) for pair in zip(self.positions, other.positions)], other.seq_len)

    @classmethod
    def from_cache(cls, cache: DynamicCache, seq_len: int) -> KVState:
        """Take the state of a cache after prefilling `seq_len` tokens.

        Sliding-window layers hold only the most recent tokens, so their positions
        are the tail of the sequence.
        """
        keys, values, positions = [], [], []
        for layer in cache.layers:
            k, v = layer.keys, layer.values
            heads, kept = k.shape[1], k.shape[2]
            keys.append(k)
            values.append(v)
            positions.append(torch.arange(seq_len - kept, seq_len, device=k.device).expand(heads, kept).clone())
        return cls(keys, values, positions, seq_len)

    def to_cache(self, config) -> DynamicCache:
        """A fresh transformers cache holding this state (tensors are copied)."""
        cache = DynamicCache(config=config)
        if len(cache.layers) != self.num_layers:
            raise ValueError(f"model has {len(cache.layers)} layers, state has {self.num_layers}")
        for layer, k, v in zip(cache.layers, self.keys, self.values):
            layer.update(k, v)
            if layer.is_sliding:
                # The mask of a sliding layer is placed by how many tokens it has seen.
                layer.cumulative_length = self.seq_len
        return cache


@torch.inference_mode()
def prefill(model: PreTrainedModel, input_ids: list[int], on_layer=None) -> KVState:
    """The cache of `input_ids`. `on_layer(layer, keys, values)`, if given, is called as soon as each
    decoder layer has run, with that layer's final cache tensors (1, kv_heads, kept, head_dim),
    while later layers are still to come: a sender can stream layer l during the prefill."""
    cache = DynamicCache(config=model.config)
    hooks = []
    if on_layer is not None:
        # Hooks belong to the model, which another thread may be running at the same time (an
        # in-process receiver prefilling a text segment): only this thread's forward is ours.
        thread = threading.get_ident()
        for index, block in enumerate(model.get_decoder().layers):
            def done(module, args, output, index=index):
                if threading.get_ident() == thread:
                    on_layer(index, cache.layers[index].keys, cache.layers[index].values)

            hooks.append(block.register_forward_hook(done))
    try:
        # Only the cache is wanted: skip the (seq_len x vocab) logits, gigabytes at 8K tokens.
        model(input_ids=torch.tensor([input_ids], device=model.device), cache=cache, use_cache=True, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    return KVState.from_cache(cache, len(input_ids))


@torch.inference_mode()
def prefill_on_top(model: PreTrainedModel, kv: KVState | None, token_ids: list[int]) -> KVState:
    """Prefill `token_ids` at positions kv.seq_len, kv.seq_len + 1, ... on top of `kv` (None: from scratch).

    Layers must hold equally many tokens (no sliding-window layers, no per-layer budgets):
    the attention mask is built from one layer's length.
    """
    if not token_ids:
        raise ValueError("nothing to prefill")
    if kv is None:
        return prefill(model, token_ids)
    cache = kv.to_cache(model.config)
    if any(layer.is_sliding for layer in cache.layers):
        raise ValueError("sliding-window layers keep only their window: prefill on top needs full layers")
    if len({kv.kept_tokens(i) for i in range(kv.num_layers)}) > 1:
        raise ValueError("layers hold different numbers of tokens; prefill on top needs them equal")
    start = kv.seq_len
    device = model.device
    model(input_ids=torch.tensor([token_ids], device=device), cache=cache, use_cache=True, logits_to_keep=1,
          position_ids=torch.arange(start, start + len(token_ids), device=device).unsqueeze(0))
    heads = kv.keys[0].shape[1]
    new_positions = torch.arange(start, start + len(token_ids), device=kv.positions[0].device).expand(heads, -1)
    return KVState([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers],
                   [torch.cat([p, new_positions], dim=1) for p in kv.positions], start + len(token_ids))


@torch.inference_mode()
def greedy_decode(
    model: PreTrainedModel, cache: DynamicCache, tail_ids: list[int], start_position: int, max_new_tokens: int,
    first_logits: list | None = None, token_by_token: bool | None = None, timings: dict | None = None,
) -> list[int]:
    """Prefill `tail_ids` on top of `cache` at `start_position`, then decode greedily.

    Stops after an end-of-sequence token (which is returned, as `generate` does).
    If `first_logits` is a list, the logits of the first answer token are appended to it.
    `token_by_token` feeds the tail one token at a time; by default only when layers differ in length.
    If `timings` is a dict, `first_token_s` (tail prefill + first token) is written to it.
    """
    import time

    start = time.perf_counter()
    if not tail_ids:
        raise ValueError("decoding needs at least one token to prefill on top of the cache")
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    device = model.device
    if token_by_token is None:
        token_by_token = len({layer.get_seq_length() for layer in cache.layers if not layer.is_sliding}) > 1
    if token_by_token:
        # Layers keep different numbers of tokens (per-layer budgets), but the mask is built
        # from one layer's length. A single query token needs no mask, so feed the tail one
        # token at a time.
        for offset, token in enumerate(tail_ids[:-1]):
            model(input_ids=torch.tensor([[token]], device=device), cache=cache,
                  position_ids=torch.tensor([[start_position + offset]], device=device), use_cache=True)
        start_position += len(tail_ids) - 1
        tail_ids = tail_ids[-1:]
    input_ids = torch.tensor([tail_ids], device=device)
    position = start_position
    generated: list[int] = []
    for _ in range(max_new_tokens):
        position_ids = torch.arange(position, position + input_ids.shape[1], device=device).unsqueeze(0)
        logits = model(input_ids=input_ids, cache=cache, position_ids=position_ids, use_cache=True).logits
        position += input_ids.shape[1]
        if not generated:
            if first_logits is not None:
                first_logits.append(logits[0, -1].float())
            if timings is not None:
                timings["first_token_s"] = time.perf_counter() - start
        token = int(logits[0, -1].argmax())
        generated.append(token)
        if token in eos_ids:
            break
        input_ids = torch.tensor([[token]], device=device)
    return generated


@torch.inference_mode()
def reference_generate(model: PreTrainedModel, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy `model.generate` on the full prompt: the answer a lossless transfer must reproduce."""
    ids = torch.tensor([input_ids], device=model.device)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        top_p=None, top_k=None, temperature=None,
    )
    return out[0, len(input_ids):].tolist()
