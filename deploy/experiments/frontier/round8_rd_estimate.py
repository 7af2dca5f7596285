"""Round 8's estimate, before the joint transform was built: the Gaussian rate-distortion bound of
SmolLM2's KV coordinates coded per tensor (keys, values apart: the basis as shipped), per layer
(keys and values jointly) and over groups of adjacent layers, at equal KL-weighted distortion.

Run from the repository root: .venv/bin/python deploy/experiments/frontier/round8_rd_estimate.py
Each context token's coordinates in the shipped basis (RoPE removed, the template's head and the
question left out), scaled by the square root of their layer weight, on 96 paragraphs of the tuning
articles; the transforms are fitted on the first two thirds of the tokens and their spreads measured
on the rest; reverse water-filling gives each one's rate at the distortion the separate coding has
at 1, 2, 2.7 and 3.5 bits per element.
"""

import math

import torch

from channel.evaluation.basis import token_rows
from channel.evaluation.squad import load_squad
from common.models import load_model
from sender.prefill import prefill_prompt


def water_level(variances: torch.Tensor, rate: float) -> float:
    """The distortion per component at which reverse water-filling spends `rate` bits in all."""
    low, high = 1e-30, float(variances.max())
    for _ in range(200):
        level = math.sqrt(low * high)
        spent = float((0.5 * torch.log2(variances.clamp(min=1e-30) / level)).clamp(min=0).sum())
        low, high = (level, high) if spent > rate else (low, level)
    return float(torch.minimum(variances, torch.tensor(high)).sum())


def rate_at(variances: torch.Tensor, distortion: float) -> float:
    """The bits reverse water-filling needs to reach a total `distortion`."""
    low, high = 1e-30, float(variances.max())
    for _ in range(200):
        level = math.sqrt(low * high)
        total = float(torch.minimum(variances, torch.tensor(level)).sum())
        low, high = (level, high) if total < distortion else (low, level)
    return float((0.5 * torch.log2(variances.clamp(min=1e-30) / high)).clamp(min=0).sum())


@torch.inference_mode()
def main() -> None:
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m", "cpu", "float32")
    basis, rope = loaded.codec_context.basis, loaded.codec_context.rope
    paragraphs = {}
    for sample in load_squad("../shared/data/squad-v2-dev-public.json", skip=510):
        paragraphs.setdefault(sample.context, sample)
    layers = basis.num_layers
    rows: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    for sample in list(paragraphs.values())[:96]:
        pre = prefill_prompt(loaded, sample.context, sample.question)
        start, end = pre.prompt.head_len, pre.context_len
        for layer in range(layers):
            k = rope.remove(layer, pre.kv.keys[layer][:, :, start:end], pre.kv.positions[layer][:, start:end])
            keys = (token_rows(k) - basis.keys[layer].mean) @ basis.keys[layer].analysis
            values = (token_rows(pre.kv.values[layer][:, :, start:end]) - basis.values[layer].mean) @ basis.values[layer].analysis
            rows[layer].append(torch.cat([keys, values], 1) * basis.scale(layer))
    z = [torch.cat(r).double() for r in rows]
    cut = z[0].shape[0] * 2 // 3
    print(f"{z[0].shape[0]} context tokens, {cut} to fit")

    def spreads(group: list[int]) -> torch.Tensor:
        fit, test = (torch.cat([z[i][part] for i in group], 1) for part in (slice(None, cut), slice(cut, None)))
        centred = fit - fit.mean(0)
        _, directions = torch.linalg.eigh(centred.T @ centred / (cut - 1))
        return ((test - fit.mean(0)) @ directions).var(0)

    separate = torch.cat([x[cut:].var(0) for x in z])
    elements = separate.numel()
    transforms = {"per layer (joint)": 1, "2 layers": 2, "3 layers": 3, "5 layers": 5}
    variances = {name: torch.cat([spreads(list(range(a, min(layers, a + size)))) for a in range(0, layers, size)])
                 for name, size in transforms.items()}
    print("bits per element at equal distortion: separate | " + " | ".join(variances))
    for bits in (1.0, 2.0, 2.7, 3.5):
        distortion = water_level(separate, bits * elements)
        print(f"{bits:.2f} | " + " | ".join(f"{rate_at(v, distortion) / elements:.3f}" for v in variances.values()))


if __name__ == "__main__":
    main()
