"""`kvwire calibrate --basis`: fit a model's PCA basis (common.quant.pca) on calibration prompts."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from channel.evaluation.harness import mean_kl, teacher_forced_logits
from channel.evaluation.squad import Sample
from common.kvstate import KVState, greedy_decode
from common.models import LoadedModel
from common.quant.pca import Basis, PCACodec, coordinates
from common.select import SINK_TOKENS
from sender.prefill import prefill_prompt


def token_rows(t: torch.Tensor) -> torch.Tensor:
    """(1, kv_heads, tokens, head_dim) -> (tokens, kv_heads * head_dim): each token's heads side by side."""
    _, heads, tokens, dim = t.shape
    return t[0].float().transpose(0, 1).reshape(tokens, heads * dim)


# The first tokens of a prompt are attention sinks (SINK_TOKENS): outliers by orders of magnitude,
# which would bend the basis towards them. They are left out of the fit; `protect:s4` sends them
# apart, and importance tiers rank them first.


def _attention(loaded: LoadedModel) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in loaded.model.get_decoder().layers]


class _QueryEnergy:
    """Per layer, the mean square of each query head's RoPE-free channels, over the prompts prefilled
    while it listens (forward hooks on q_proj; q_norm applied where the model has one)."""

    def __init__(self, loaded: LoadedModel):
        self.attention = _attention(loaded)
        self.head_dim = loaded.fingerprint.head_dim
        self.sums: list[torch.Tensor | float] = [0.0] * len(self.attention)
        self.count = 0

    def __enter__(self):
        def hook(module, args, output, layer):
            q = output[0].float().view(output.shape[1], -1, self.head_dim)
            norm = getattr(self.attention[layer], "q_norm", None)
            q = norm(q) if norm is not None else q
            self.sums[layer] = self.sums[layer] + q.double().square().sum(0).cpu()
            if layer == 0:
                self.count += q.shape[0]

        self.handles = [a.q_proj.register_forward_hook(lambda m, i, o, layer=layer: hook(m, i, o, layer))
                        for layer, a in enumerate(self.attention)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def means(self) -> list[torch.Tensor]:
        return [s / self.count for s in self.sums]  # (query heads, head_dim) per layer


def attention_metrics(loaded: LoadedModel, query_energy: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the metrics that weigh a key's and a value's error by what attention does with them.

    Keys: a key error e moves query q's logit by q . e (both RoPE-free, rotated alike). RoPE turns each
    channel pair (i, i + head_dim/2) by the distance between query and key, which mixes the pair, so the
    weight of a channel is its pair's mean query energy, summed over the query heads that read this
    KV head: a diagonal metric. Values: a value error e reaches the layer's output as W_o e through each
    of those query heads, a metric sum_q W_o,q^T W_o,q per KV head. Each is scaled to a mean diagonal of 1.
    """
    kv_heads, head_dim = loaded.fingerprint.kv_heads, loaded.fingerprint.head_dim
    keys, values = [], []
    for attention, energy in zip(_attention(loaded), query_energy):
        groups = energy.shape[0] // kv_heads
        paired = (energy + energy.roll(head_dim // 2, dims=-1)) / 2
        weights = paired.view(kv_heads, groups, head_dim).sum(1).flatten()
        weights = weights / weights.mean()
        # A channel no query reads (Gemma-3's query norm can zero one) weighs almost nothing, not zero:
        # the metric must stay positive definite.
        keys.append(torch.diag(weights.clamp(min=1e-6)))
        out = attention.o_proj.weight.detach().double().cpu().view(-1, kv_heads, groups, head_dim)
        blocks = torch.einsum("okgi,okgj->kij", out, out)
        metric = torch.block_diag(*blocks)
        metric = metric / metric.diagonal().mean()
        values.append(metric + 1e-6 * torch.eye(metric.shape[0], dtype=metric.dtype))
    return keys, values


WEIGHT_BITS = 1.0  # the bits per element each tensor is coded at while its layer weight is measured


def _coordinate_error(basis, x: torch.Tensor, coded: torch.Tensor) -> float:
    """Sum over tokens of the squared error of `coded` against `x` in the basis's coordinates."""
    _, analysis, _, _ = basis.on(x.device)
    return float(((token_rows(x) - token_rows(coded)) @ analysis).square().sum())


@torch.inference_mode()
def layer_weights(loaded: LoadedModel, basis: Basis, samples: list[Sample], bits: float = WEIGHT_BITS,
                  max_new_tokens: int = 24, progress: Callable[[], None] | None = None) -> torch.Tensor:
    """Per layer, the teacher-forced KL that one unit of coordinate error of its keys and of its values
    costs: (layers, 2), the weights of `pca:bB:w`.

    Each sample is prefilled query-aware and answered from the full cache. Then, one layer's keys or
    values at a time, the context after the template's head (what a `+text` profile sends as cache) is
    coded at `bits` bits per element and decoded, the question prefilled on top, and the mean KL along
    the full-cache answer measured; the weight is the total KL over the total coordinate error. The KL
    of independent small errors adds up, to first order, so these weights make the pooled allocation
    minimize the answer's expected KL.
    """
    rope = loaded.codec_context.rope
    layers = loaded.fingerprint.num_layers
    kl = torch.zeros(layers, 2, dtype=torch.float64)
    error = torch.zeros(layers, 2, dtype=torch.float64)
    for sample in samples:
        pre = prefill_prompt(loaded, sample.context, sample.question)
        start = pre.prompt.head_len
        exact = pre.kv.before(pre.context_len)
        tail = pre.tail_after(pre.context_len)
        full = greedy_decode(loaded.model, pre.kv.to_cache(loaded.config), pre.tail_ids, pre.kv.seq_len, max_new_tokens)
        reference = teacher_forced_logits(loaded.model, exact.to_cache(loaded.config), tail, exact.seq_len, full)
        for layer in range(layers):
            k, v, positions = exact.keys[layer], exact.values[layer], exact.positions[layer]
            free = rope.remove(layer, k[:, :, start:], positions[:, start:])
            codec = PCACodec.for_layer(basis, layer, bits)
            coded_keys, coded_values = codec.decode(codec.encode(free, v[:, :, start:]), free.shape, torch.float32)
            coded = (torch.cat([k[:, :, :start], rope.apply(layer, coded_keys, positions[:, start:], k.dtype)], dim=2),
                     torch.cat([v[:, :, :start], coded_values.to(v.dtype)], dim=2))
            error[layer, 0] += _coordinate_error(basis.keys[layer], free, coded_keys)
            error[layer, 1] += _coordinate_error(basis.values[layer], v[:, :, start:].float(), coded_values)
            for tensor in (0, 1):
                mixed = [list(exact.keys), list(exact.values)]
                mixed[tensor][layer] = coded[tensor]
                state = KVState(mixed[0], mixed[1], exact.positions, exact.seq_len)
                logits = teacher_forced_logits(loaded.model, state.to_cache(loaded.config), tail, exact.seq_len, full)
                kl[layer, tensor] += mean_kl(reference, logits)
        if progress:
            progress()
    return kl.clamp(min=1e-12) / error


def _calibration_kv(loaded: LoadedModel, samples: list[Sample], progress: Callable[[], None] | None
                    ) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per sample, its prompt prefilled query-aware: each layer's keys (RoPE removed) and values,
    (1, kv_heads, tokens, head_dim), but the sink tokens'. What a basis and its joint transform are fitted on."""
    rope = loaded.codec_context.rope
    for sample in samples:
        kv = prefill_prompt(loaded, sample.context, sample.question).kv
        kept = [positions[0] >= SINK_TOKENS for positions in kv.positions]
        yield [(rope.remove(layer, k, positions)[:, :, keep], v[:, :, keep])
               for layer, (k, v, positions, keep) in enumerate(zip(kv.keys, kv.values, kv.positions, kept))]
        if progress:
            progress()


@torch.inference_mode()
def fit_basis(loaded: LoadedModel, samples: list[Sample], path: Path,
              progress: Callable[[], None] | None = None, metric: bool = False, weight_samples: int = 0) -> Basis:
    """Prefill each sample's prompt (query-aware), collect every layer's RoPE-free keys and values
    (but the sink tokens'), and write the basis fitted on them to `path`; `metric`: fitted for the
    error attention sees (`attention_metrics`), not the squared error; `weight_samples`: then measure
    the layer weights (`layer_weights`) on that many of the samples and write them in too."""
    keys: list[list[torch.Tensor]] = [[] for _ in range(loaded.fingerprint.num_layers)]
    values: list[list[torch.Tensor]] = [[] for _ in range(loaded.fingerprint.num_layers)]
    with _QueryEnergy(loaded) if metric else contextlib.nullcontext() as queries:
        for prompt in _calibration_kv(loaded, samples, progress):
            for layer, (k, v) in enumerate(prompt):
                keys[layer].append(token_rows(k).cpu())
                values[layer].append(token_rows(v).cpu())
    metadata = {"model": loaded.name, "weights_sha256": loaded.fingerprint.weights_sha256,
                "samples": len(samples), "tokens": sum(len(k) for k in keys[0]), "sink_tokens_left_out": SINK_TOKENS}
    key_metrics = value_metrics = None
    if metric:  # (metadata only then: a plain fit writes the same file, and hash, as before)
        metadata["metric"] = "attention"
        key_metrics, value_metrics = attention_metrics(loaded, queries.means())
    tensors = Basis.fit([torch.cat(k) for k in keys], [torch.cat(v) for v in values], key_metrics, value_metrics)
    if weight_samples:  # measured with the basis in memory: `path` is written once, whole
        basis = Basis.from_bytes(Basis.serialize(tensors, metadata))
        weights = layer_weights(loaded, basis, samples[:weight_samples], WEIGHT_BITS, progress=progress)
        for layer, (key_weight, value_weight) in enumerate(weights.tolist()):
            tensors[f"keys.{layer}.weight"] = torch.tensor([key_weight])
            tensors[f"values.{layer}.weight"] = torch.tensor([value_weight])
        metadata.update(weight_samples=weight_samples, weight_bits=WEIGHT_BITS,
                        weight_measure="teacher-forced KL per coordinate error")
    return Basis.save(tensors, metadata, path)


@torch.inference_mode()
def fit_joint(loaded: LoadedModel, basis: Basis, samples: list[Sample], path: Path,
              progress: Callable[[], None] | None = None) -> Basis:
    """Prefill each sample's prompt (query-aware) as `fit_basis` does, take every layer's coordinates in
    `basis` (but the sink tokens'), and write to `path` the basis with its joint transform
    (`Basis.fit_joint`) added, or replaced."""
    samples_of: list[list[torch.Tensor]] = [[] for _ in range(basis.num_layers)]
    for prompt in _calibration_kv(loaded, samples, progress):
        for layer, (k, v) in enumerate(prompt):
            samples_of[layer].append(coordinates(k, v, basis.keys[layer], basis.values[layer]).cpu())
    tensors = {k: v for k, v in basis.tensors().items() if not k.startswith("joint.")}
    tensors.update(basis.fit_joint([torch.cat(c) for c in samples_of]))
    metadata = {**basis.metadata, "joint_samples": len(samples), "joint_tokens": sum(len(c) for c in samples_of[0])}
    return Basis.save(tensors, metadata, path)


@torch.inference_mode()
def fit_unweighted(loaded: LoadedModel, samples: list[Sample], path: Path,
                   progress: Callable[[], None] | None = None) -> Basis:
    """`fit_basis` and then `fit_joint` on the same prompts in one pass, on the model's device (the
    eigendecompositions too), with every layer weight 1.0: the pooled allocation of `pca:bB:w` then
    minimizes the plain squared coordinate error instead of the answer's KL (`layer_weights` runs two
    teacher-forced passes per layer and prompt, and a random model's KL means nothing anyway).
    For `kvwire bench gpu --recompute`, which fits Llama-3.1-8B's random twin in seconds."""
    layers = loaded.fingerprint.num_layers
    prompts = list(_calibration_kv(loaded, samples, progress))
    keys = [torch.cat([token_rows(p[layer][0]) for p in prompts]) for layer in range(layers)]
    values = [torch.cat([token_rows(p[layer][1]) for p in prompts]) for layer in range(layers)]
    tensors = {k: v.cpu() for k, v in Basis.fit(keys, values).items()}
    del keys, values
    for layer in range(layers):
        tensors[f"keys.{layer}.weight"], tensors[f"values.{layer}.weight"] = torch.ones(1), torch.ones(1)
    metadata = {"model": loaded.name, "weights_sha256": loaded.fingerprint.weights_sha256, "samples": len(samples),
                "tokens": sum(p[0][0].shape[2] for p in prompts), "sink_tokens_left_out": SINK_TOKENS,
                "weight_measure": "none: every layer weight 1.0"}
    basis = Basis.from_bytes(Basis.serialize(tensors, metadata))
    basis.weights = basis.weights.to(loaded.device)  # so that fit_joint scales the coordinates where they are
    joint = [torch.cat([coordinates(*p[layer], basis.keys[layer], basis.values[layer]) for p in prompts])
             for layer in range(layers)]
    tensors.update({k: v.cpu() for k, v in basis.fit_joint(joint).items()})
    metadata.update(joint_samples=len(samples), joint_tokens=metadata["tokens"])
    return Basis.save(tensors, metadata, path)
