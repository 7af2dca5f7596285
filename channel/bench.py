"""`kvwire bench codec`: codec throughput against a plain copy, compression and reconstruction error."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import zstandard

from common.kvstate import KVState
from common.plan import kv_codec
from common.profile import parse_profile
from common.quant.entropy import code_symbols, entropy_bits

CODEC_PROFILES = ["fp16", "int8", "int4:g32", "int3", "int2", "int1", "nf4",
                  "svd:r4", "svd:r8", "svd:r16", "svd:r32", "svd:r32+int8"]


@dataclass
class CodecRow:
    profile: str
    encode_mb_s: float  # MB of fp16 input per second
    decode_mb_s: float
    encode_vs_copy: float  # encode throughput / copy throughput, same run
    decode_vs_copy: float
    bandwidth_fraction: float  # payload bytes / fp16 bytes
    zstd_fraction: float  # after the zstd stage
    bits_per_element: float  # after zstd
    entropy_bits_per_element: float | None  # code entropy + parameter overhead
    rel_error_keys: float
    rel_error_values: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _best_time(fn, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def bench_codecs(kv: KVState, profiles: list[str], repeats: int = 3, zstd_level: int = 3, progress=None) -> tuple[list[CodecRow], float]:
    """Benchmark each profile over every layer of `kv`; returns rows and the copy throughput (MB/s)."""
    device = kv.keys[0].device
    layers = [(k.half(), v.half()) for k, v in zip(kv.keys, kv.values)]
    fp16_bytes = sum(k.nbytes + v.nbytes for k, v in layers)
    copy_s = _best_time(lambda: [(k.clone(), v.clone()) for k, v in layers], device, repeats)
    copy_mb_s = fp16_bytes / copy_s / 1e6
    compressor = zstandard.ZstdCompressor(level=zstd_level)
    rows = []
    for spec in profiles:
        profile = parse_profile(spec)
        codecs = [kv_codec(profile, i) for i in range(len(layers))]
        inputs = [(k.float(), v.float()) for k, v in layers]
        payloads = []
        encode_s = _best_time(lambda: payloads.__setitem__(slice(None), [c.encode(k, v) for c, (k, v) in zip(codecs, inputs)]),
                              device, repeats)
        decoded = []
        decode_s = _best_time(lambda: decoded.__setitem__(slice(None), [
            c.decode(p, tuple(k.shape), torch.float32) for c, p, (k, _) in zip(codecs, payloads, inputs)]), device, repeats)
        payload_bytes = sum(p.numel() for p in payloads)
        host = [p.cpu().numpy().tobytes() for p in payloads]
        zstd_bytes = sum(len(compressor.compress(h)) for h in host)
        elements = fp16_bytes // 2
        entropy = None
        symbol_sets = [code_symbols(c, p, tuple(k.shape)) for c, p, (k, _) in zip(codecs, payloads, inputs)]
        if all(s is not None for s in symbol_sets):
            symbols = torch.cat([s for s, _ in symbol_sets])
            bits = symbol_sets[0][1]
            parameter_bits = (payload_bytes - symbols.numel() * bits / 8) * 8
            entropy = entropy_bits(symbols, 2**bits) + parameter_bits / elements
        rel = lambda pairs: sum(float((a - b).norm() / b.norm()) for a, b in pairs) / len(pairs)  # noqa: E731
        rows.append(CodecRow(
            profile=str(profile),
            encode_mb_s=fp16_bytes / encode_s / 1e6, decode_mb_s=fp16_bytes / decode_s / 1e6,
            encode_vs_copy=copy_s / encode_s, decode_vs_copy=copy_s / decode_s,
            bandwidth_fraction=payload_bytes / fp16_bytes, zstd_fraction=zstd_bytes / fp16_bytes,
            bits_per_element=zstd_bytes * 8 / elements, entropy_bits_per_element=entropy,
            rel_error_keys=rel([(d[0], i[0]) for d, i in zip(decoded, inputs)]),
            rel_error_values=rel([(d[1], i[1]) for d, i in zip(decoded, inputs)]),
        ))
        if progress:
            progress()
    return rows, copy_mb_s


def rows_as_dicts(rows: list[CodecRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def real_cache(model: str, tokens: int) -> KVState:
    """Prefill about `tokens` tokens of SQuAD paragraphs (the embedded subset) with a real model."""
    from channel.evaluation.squad import load_squad
    from common.kvstate import prefill
    from common.models import load_model

    loaded = load_model(model)
    ids: list[int] = []
    seen = set()
    for sample in load_squad():
        if sample.context in seen:
            continue
        seen.add(sample.context)
        ids += loaded.tokenizer(sample.context + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            break
    return prefill(loaded.model, ids[:tokens])


def synthetic_cache(layers: int, heads: int, tokens: int, head_dim: int, device: str, seed: int = 0) -> KVState:
    """Normal K/V with a few large-offset key channels, as real post-RoPE keys have."""
    generator = torch.Generator(device=device).manual_seed(seed)
    keys, values = [], []
    for _ in range(layers):
        k = torch.randn(1, heads, tokens, head_dim, generator=generator, device=device)
        k[..., : head_dim // 16] += 8.0
        keys.append(k)
        values.append(torch.randn(1, heads, tokens, head_dim, generator=generator, device=device))
    positions = [torch.arange(tokens).expand(heads, tokens) for _ in range(layers)]
    return KVState(keys, values, positions, tokens)


def main_gpu(out_dir: str, tokens: int = 1024, repeats: int = 5) -> None:
    """Entry point for a CUDA machine without the CLI's dependencies: `python3 -c 'from channel.bench import main_gpu; ...'`."""
    import json
    from pathlib import Path

    kv = synthetic_cache(30, 3, tokens, 64, "cuda")
    rows, copy_mb_s = bench_codecs(kv, CODEC_PROFILES, repeats)
    source = f"synthetic SmolLM2-shaped cache of {tokens} tokens on {torch.cuda.get_device_name()}"
    print(f"{source}; device copy {copy_mb_s / 1e3:,.1f} GB/s of fp16 input")
    print(f"{'profile':18} {'enc GB/s':>9} {'dec GB/s':>9} {'enc/copy':>9} {'dec/copy':>9} {'bytes/fp16':>10} {'relerr K':>9} {'relerr V':>9}")
    for r in rows:
        print(f"{r.profile:18} {r.encode_mb_s / 1e3:9.2f} {r.decode_mb_s / 1e3:9.2f} {r.encode_vs_copy:9.4f} "
              f"{r.decode_vs_copy:9.4f} {r.bandwidth_fraction:10.3f} {r.rel_error_keys:9.3f} {r.rel_error_values:9.3f}")
    Path(out_dir, "codec_gpu.json").write_text(json.dumps({"source": source, "copy_mb_s": copy_mb_s, "rows": rows_as_dicts(rows)}, indent=2))


def select_once(mode: str, tokens: int, model: str = "smollm2-135m") -> dict:
    """Prefill `tokens` of haystack plus a question and compute Q2C and SnapKV scores; report time and peak RSS.

    mode "kvwire": sdpa prefill with O(T) attention statistics. mode "eager": the naive way,
    output_attentions=True, which materializes every layer's T x T attention.
    Run each in a fresh process: peak RSS only grows.
    """
    import resource

    from channel.evaluation.haystack import QUESTION, haystack_context
    from common.models import load_model
    from common.profile import parse_profile
    from common.select import apply_selection
    from sender.prefill import prefill_prompt

    loaded = load_model(model)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    context = haystack_context(loaded.tokenizer, tokens)
    profiles = ["q2c:0.25", "snapkv:0.25"]
    start = time.perf_counter()
    if mode == "kvwire":
        pre = prefill_prompt(loaded, context, QUESTION, True, profiles)
        for spec in profiles:
            apply_selection(pre.kv, parse_profile(spec).selection, pre.stats, pre.context_len)
        seq_len = pre.kv.seq_len
    else:
        from common.prompts import build_prompt

        prompt = build_prompt(loaded.tokenizer, context, QUESTION)
        ids = prompt.ids[:-1]
        loaded.model.set_attn_implementation("eager")
        with torch.inference_mode():
            attentions = loaded.model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
        context_len = len(prompt.context_ids)
        q2c = sum(a[0, :, context_len:, :context_len].sum(dim=(0, 1)) for a in attentions)
        q2c.topk(max(1, context_len // 4))
        seq_len = len(ids)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "tokens": seq_len, "seconds": seconds, "peak_rss_gib": peak / 2**30,
            "model_rss_gib": rss_before / 2**30}


def frame_making(chunks: int = 280, chunk_bytes: int = 900_000, repeats: int = 3) -> dict:
    """The host work between the coder and gRPC on both nodes, on a 32K-token cache's worth of rANS codes (by
    default 280 chunks of 900 KB, `pca:b0.7` at Llama-8B's shape), each way alternated `repeats` times, the best
    counted, in GB/s of payload.

    The sender: each chunk's three parts in host memory (the coder's lanes' states, word counts and words) become
    frames on the read-ahead thread, and the bytes gRPC sends on the consumer's, as `sender.client.read_ahead`
    runs them: pb.Frames (the parts joined, set into the payload field, then serialized) against frames serialized
    as they are made (`wire.Encoder(serialized=True)`: the parts copied once). The receiver: from the message
    gRPC delivers to a payload checked against its CRC, a pb.Frame parsed whole and its payload field read (two
    copies) against `framing.received` (the payload a view of the message)."""
    import numpy as np

    from common import framing, wire
    from common.proto import kvwire_pb2 as pb
    from sender.client import read_ahead

    host = memoryview(np.random.default_rng(0).integers(0, 256, chunks * chunk_bytes, dtype=np.uint8)).cast("B")
    sized = [(128, 1 << 20, (host[i * chunk_bytes:i * chunk_bytes + 1024],
                             host[i * chunk_bytes + 1024:i * chunk_bytes + 1536],
                             host[i * chunk_bytes + 1536:(i + 1) * chunk_bytes])) for i in range(chunks)]

    def sent(serialized: bool) -> Iterator[bytes]:  # each frame's bytes, dropped once taken (as gRPC's are)
        frames = wire.Encoder(pb.Fingerprint(), "bench", serialized=serialized).chunk_frames(0, 0, iter(sized))
        return (framing.serialize(frame) for frame, _ in read_ahead(frames))

    messages = list(sent(True))
    if messages != list(sent(False)):
        raise AssertionError("the two ways gave different bytes")

    def parsed_whole(message: bytes) -> bool:
        chunk = pb.Frame.FromString(message).chunk
        payload = chunk.payload
        return wire.checksum(payload) == chunk.crc32c

    def received(message: bytes) -> bool:
        frame, payload = framing.received(message)
        return wire.checksum(payload) == frame.chunk.crc32c

    if not all(map(received, messages)) or not all(map(parsed_whole, messages)):
        raise AssertionError("a payload does not match its CRC")
    ways = {"pb.Frame, then serialized": lambda: sent(False), "serialized as made": lambda: sent(True),
            "parsed whole, payload read": lambda: map(parsed_whole, messages),
            "received (payload a view)": lambda: map(received, messages)}
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(repeats):
        for way, run in ways.items():
            start = time.perf_counter()
            for _ in run():
                pass
            best[way] = min(best[way], time.perf_counter() - start)
    payload = chunks * chunk_bytes
    return {"chunks": chunks, "payload_bytes": payload, "seconds": best,
            "gbps": {way: payload / s / 1e9 for way, s in best.items()}}
