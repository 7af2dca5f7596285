"""The rANS coder (pca:...:a) on a GPU: the kernels against the torch reference across devices, and the
frontier codec's speed at Llama-3.1-8B's KV shape (32 layers, 8 KV heads, head_dim 128).

The basis is SYNTHETIC (random orthogonal directions, a decaying spectrum, layer weights 1, a random
joint transform): the speed is the shape's, the bytes per element mean nothing for a real model.

    python3 deploy/gpu/rans_gpu.py OUT.json [tokens ...]
"""

from __future__ import annotations

import json
import sys
import time

import torch

from channel.bench_gpu import cuda_seconds, warm_up
from common.quant import rans, rans_triton
from common.quant.pca import Basis
from common.quant.pca_entropy import MIN_TABLE, EntropyPCACodec, code_many, laplace, rans_models
from common.wire import RANS_BATCH

LAYERS, HEADS, HEAD_DIM = 32, 8, 128
D = HEADS * HEAD_DIM


def cross_device() -> dict:
    """GPU kernels, torch on the GPU and torch on the CPU: the same bytes, and each decodes the others'."""
    g = torch.Generator().manual_seed(0)
    counts = [300_000, 1, 0, 70_001, 262_144]
    models = torch.randint(20, 70, (sum(counts),), generator=g)
    symbols = torch.zeros(sum(counts), dtype=torch.int64)
    for m in models.unique().tolist():
        p, top = laplace(m + MIN_TABLE)
        picked = models == m
        draw = torch.multinomial(torch.from_numpy(p), int(picked.sum()), replacement=True, generator=g) - top
        symbols[picked] = draw
    cpu, gpu = rans_models(torch.device("cpu")), rans_models(torch.device("cuda"))
    on_cpu = rans.encode(symbols, models, cpu, counts)
    ref_gpu = rans.encode(symbols.cuda(), models.cuda(), gpu, counts)
    kernel = rans_triton.encode(symbols.cuda(), models.cuda(), gpu, counts)
    out = {"symbols": sum(counts), "cpu_torch == gpu_torch": on_cpu == ref_gpu, "cpu_torch == gpu_kernel": on_cpu == kernel,
           "gpu-encoded, cpu-decoded": bool(torch.equal(rans.decode(kernel, models, cpu, counts), symbols)),
           "cpu-encoded, gpu-decoded": bool(torch.equal(rans_triton.decode(on_cpu, models.cuda(), gpu, counts).cpu().long(), symbols))}
    print(out, flush=True)
    return out


def synthetic_basis() -> Basis:
    g = torch.Generator().manual_seed(1)
    spectrum = torch.logspace(0.5, -2.5, D)

    def part(width):
        q, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
        return q

    tensors = {}
    for layer in range(LAYERS):
        for name in ("keys", "values"):
            tensors[f"{name}.{layer}.mean"] = torch.zeros(D)
            tensors[f"{name}.{layer}.directions"] = part(D).to(torch.float16)
            tensors[f"{name}.{layer}.std"] = spectrum.float().clone()
            tensors[f"{name}.{layer}.weight"] = torch.tensor([1.0])
        tensors[f"joint.{layer}.mean"] = torch.zeros(2 * D)
        tensors[f"joint.{layer}.directions"] = part(2 * D).to(torch.float16)
        tensors[f"joint.{layer}.std"] = torch.cat([spectrum, spectrum]).sort(descending=True).values.float()
    return Basis.from_bytes(Basis.serialize(tensors, {"note": "synthetic"}))


def codec_speed(basis: Basis, tokens: int, bits: float, step: int = 255) -> dict:
    pool = tuple(range(LAYERS))
    codecs = [EntropyPCACodec.for_layer(basis, layer, bits, pool, 1.0, 3, True, True) for layer in range(LAYERS)]
    g = torch.Generator("cuda").manual_seed(2)
    cache = []
    for layer in range(LAYERS):
        z = torch.randn(tokens, D, device="cuda", generator=g) * basis.keys[layer].std.cuda()
        keys = (z @ basis.keys[layer].directions.cuda().T).view(tokens, HEADS, HEAD_DIM).transpose(0, 1)[None]
        z = torch.randn(tokens, D, device="cuda", generator=g) * basis.values[layer].std.cuda()
        values = (z @ basis.values[layer].directions.cuda().T).view(tokens, HEADS, HEAD_DIM).transpose(0, 1)[None]
        cache.append((keys.to(torch.bfloat16).contiguous(), values.to(torch.bfloat16).contiguous()))
    importance = torch.rand(tokens, device="cuda", generator=g) ** 4
    classes = [c.classes(importance) for c in codecs]
    nbytes = sum(k.nbytes + v.nbytes for k, v in cache)
    copy_s = cuda_seconds(lambda: [(k.clone(), v.clone()) for k, v in cache], repeat=3)

    def indices():
        return [c.encode(k, v, cl) for c, (k, v), cl in zip(codecs, cache, classes)]

    def encode():  # as the wire's sender does with a whole cache: layers coded together, up to RANS_BATCH symbols
        out, batch = [], []
        for c, raw in zip(codecs, indices()):
            batch.append((c, raw, tokens, step))
            if sum(b[0].coded.numel() * tokens for b in batch) >= RANS_BATCH:
                out += code_many(batch)
                batch = []
        return out + code_many(batch)

    payloads = encode()
    counts = [min(step, tokens - s) for s in range(0, tokens, step)]

    def split(raw):
        """A tier's raw payload (all indices, then all classes) as each chunk's (its indices, then its classes)."""
        per = codecs[0].coded.numel() * 2
        heads = raw[tokens * per:]
        return [torch.cat([raw[s * per:(s + n) * per], heads[s:s + n]]) for s, n in zip(range(0, tokens, step), counts)]

    def decode_batched():  # each layer's chunks entropy-decoded in one call, then each chunk synthesized
        return [[c.decode(r, (1, HEADS, n, HEAD_DIM), torch.bfloat16) for r, n in
                 zip(c.uncode(p, counts, torch.device("cuda")), counts)] for c, p in zip(codecs, payloads)]

    def decode_per_chunk():  # each chunk on its own, as it arrives
        return [[c.decode(c.uncode([q], [n], torch.device("cuda"))[0], (1, HEADS, n, HEAD_DIM), torch.bfloat16)
                 for q, n in zip(p, counts)] for c, p in zip(codecs[:4], payloads[:4])]

    raw = indices()
    back = [torch.cat([k for k, _ in layer], dim=2) for layer in decode_batched()]
    # the payload decodes to what was encoded, on the GPU and on the CPU (layer 0)
    want = split(raw[0])
    same = all(torch.equal(a, b.cpu()) for a, b in zip(codecs[0].uncode(payloads[0], counts, torch.device("cpu")), want))
    same_gpu = all(torch.equal(a, b) for a, b in zip(codecs[0].uncode(payloads[0], counts, torch.device("cuda")), want))
    indices_s = cuda_seconds(indices, repeat=3, warmup=1)
    encode_s = cuda_seconds(encode, repeat=3, warmup=1)
    decode_s = cuda_seconds(decode_batched, repeat=3, warmup=1)
    start = time.perf_counter()
    decode_per_chunk()
    torch.cuda.synchronize()
    per_chunk_s = (time.perf_counter() - start) * LAYERS / 4
    profiles = profiled({"encode": encode, "decode": decode_batched})
    sent = sum(len(q) for p in payloads for q in p)
    error = sum(float((a.float() - b.float()).square().mean()) for (a, _), b in zip(cache, back)) / LAYERS
    out = {"tokens": tokens, "bits": bits, "input_bytes": nbytes, "payload_bytes": sent, "ratio_vs_bf16": sent / nbytes,
           "copy_gbps": nbytes / copy_s / 1e9, "indices_gbps": nbytes / indices_s / 1e9,
           "encode_gbps": nbytes / encode_s / 1e9, "decode_gbps": nbytes / decode_s / 1e9,
           "encode_vs_copy": copy_s / encode_s, "decode_vs_copy": copy_s / decode_s,
           "decode_per_chunk_s": per_chunk_s, "encode_s": encode_s, "decode_s": decode_s, "key_mse": error,
           "gpu_encoded_cpu_decoded_equal": same, "gpu_encoded_gpu_decoded_equal": same_gpu, "profile": profiles}
    print(out, flush=True)
    del cache
    torch.cuda.empty_cache()
    return out


def profiled(calls: dict) -> dict:
    """Where each call's time goes: the wall, the device's busy time, and the top operators by device time
    (torch.profiler), printed and returned."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, call in calls.items():
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            call()
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        events = prof.key_averages()
        top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
        rows = [{"op": e.key[:60], "calls": e.count, "device_ms": e.self_device_time_total / 1e3,
                 "cpu_ms": e.self_cpu_time_total / 1e3} for e in top]
        busy = sum(e.self_device_time_total for e in events) / 1e3
        out[name] = {"wall_ms": wall * 1e3, "device_busy_ms": busy, "top": rows}
        print(f"profile {name}: wall {wall * 1e3:.1f} ms, device busy {busy:.1f} ms", flush=True)
        for r in rows:
            print(f"   {r['device_ms']:9.2f} ms device {r['cpu_ms']:9.2f} ms cpu {r['calls']:6d}x  {r['op']}", flush=True)
    return out


def main() -> None:
    path = sys.argv[1]
    sizes = [int(t) for t in sys.argv[2:]] or [4096, 32768]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "basis": "synthetic (random orthogonal directions): speed only"}
    warm_up()
    result["cross_device"] = cross_device()
    basis = synthetic_basis()
    result["speed"] = []
    for tokens in sizes:
        for bits in (2.0, 1.0):
            result["speed"].append(codec_speed(basis, tokens, bits))
            json.dump(result, open(path, "w"), indent=2)


if __name__ == "__main__":
    main()
