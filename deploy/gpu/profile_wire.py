"""Where the frame path's time goes (issue 28): `wire.encode` to the bytes gRPC sends (`serialized=True`, as the
sender makes them) and `wire.decode` of those bytes (as the receiver takes them) of a whole cache, each timed
(best of two) and profiled with cProfile (the Python functions, the GPU synchronized at the ends), for the
profiles given. The cache is llama-3.1-8b-random's own (Llama-3.1-8B's shape, RANDOM weights) prefilled on a
context of `tokens`, with a PCA basis fitted on that random model (channel.bench_recompute.fit_random_basis).

    python3 deploy/gpu/profile_wire.py OUT.json [tokens] [profile ...]

Defaults: 32768 tokens; int4:g32 and pca:b1:w:e:j:a. A pca stage runs twice: by the split path (common.quant.pca_fused:
its GEMMs on tensor cores, pca_entropy.SPLIT_GEMM), then in torch's float32; the second row says how far the two decoded caches are apart.
On a machine without CUDA it runs tiny-llama on the CPU, a check of the script itself.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import sys
import tempfile
from pathlib import Path

import torch

from channel import bench_recompute as table
from channel.bench_gpu import environment, synced_seconds
from common import framing, wire
from common.models import load_model
from common.profile import parse_profile
from common.quant import pca_entropy
from sender.prefill import prefill_prompt

TOP = 30


def profiled(fn, device: torch.device) -> str:
    """cProfile's top functions by their own time, and on a GPU torch.profiler's top kernels by their device time."""
    profile = cProfile.Profile()
    table.sync(device)
    profile.enable()
    fn()
    table.sync(device)
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(TOP)
    if device.type == "cuda":
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as kernels:
            fn()
            table.sync(device)
        out.write(kernels.key_averages().table(sort_by="self_device_time_total", row_limit=TOP))
    return out.getvalue()


def main(path: str, tokens: int = 32768, specs: tuple[str, ...] = ("int4:g32", "pca:b1:w:e:j:a")) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    loaded = load_model("llama-3.1-8b-random" if cuda else "tiny-llama", str(device), "bfloat16" if cuda else "float32")
    basis = table.fit_random_basis(loaded, Path(tempfile.mkdtemp(prefix="kvwire-basis-")), min(tokens, 4096))
    pre = prefill_prompt(loaded, table.bench_text(loaded.tokenizer, tokens), table.QUESTION)
    kv, context = pre.kv, loaded.codec_context
    nbytes = sum(k.nbytes + v.nbytes for k, v in zip(kv.keys, kv.values))
    limits = wire.Limits(max_frame_bytes=64 << 20, max_transfer_bytes=1 << 40, max_tokens=1 << 24)
    rows = []
    for spec in specs:
        profile = parse_profile(spec).bind(context)
        caches = {}
        # a pca:...:a stage twice: its GEMMs split on tensor cores (pca_entropy.SPLIT_GEMM), then torch's float32
        for split in (True, False) if profile.pca else (True,):
            pca_entropy.SPLIT_GEMM = split

            def encode():  # the bytes gRPC sends, as the sender makes them; decoded as the receiver takes them
                return [framing.serialize(f) for f in wire.encode(kv, profile, loaded.fingerprint, None, 1, context,
                                                               serialized=True)]

            frames, encode_s = synced_seconds(encode, device, 2)

            def decode():
                return wire.decode(frames, loaded.fingerprint, limits, wire.sliding_windows(loaded.config), device,
                                   context)

            caches[split], decode_s = synced_seconds(decode, device, 2)
            split_gemm = bool(profile.pca) and split and pca_entropy.split_gemm(device)
            row = {"profile": str(profile), "split_gemm": split_gemm,
                   "tokens": kv.seq_len, "input_bytes": nbytes, "frames": len(frames),
                   "wire_bytes": sum(map(wire.wire_bytes, frames)), "encode_s": encode_s, "decode_s": decode_s,
                   "encode_gbps": nbytes / encode_s / 1e9, "decode_gbps": nbytes / decode_s / 1e9,
                   "encode_profile": profiled(encode, device), "decode_profile": profiled(decode, device)}
            # how far the decoded cache is from the input: the mean absolute error, relative to the input's mean
            # absolute value, over every layer's keys and values
            pairs = list(zip(caches[split].keys + caches[split].values, kv.keys + kv.values))
            row["relative_error"] = (sum(float((a.float() - b.float()).abs().mean()) for a, b in pairs)
                                     / sum(float(b.float().abs().mean()) for _, b in pairs))
            if not split:  # how far the split GEMMs' cache is from float32's: the largest difference, and the mean
                pairs = list(zip(caches[True].keys + caches[True].values, caches[False].keys + caches[False].values))
                row["split_vs_float32"] = {
                    "max_abs": max(float((a.float() - b.float()).abs().max()) for a, b in pairs),
                    "mean_abs": sum(float((a.float() - b.float()).abs().mean()) for a, b in pairs) / len(pairs),
                    "mean_abs_value": sum(float(b.float().abs().mean()) for _, b in pairs) / len(pairs)}
            rows.append(row)
            print(f"{row['profile']} (split GEMMs: {row['split_gemm']}): {row['frames']} frames, "
                  f"{row['wire_bytes'] / 1e6:.1f} MB; encode {encode_s:.3f} s ({row['encode_gbps']:.2f} GB/s), "
                  f"decode {decode_s:.3f} s ({row['decode_gbps']:.2f} GB/s); relative error {row['relative_error']:.4f} "
                  f"{row.get('split_vs_float32', '')}")
            print(row["encode_profile"], row["decode_profile"], sep="\n")
            del frames
        pca_entropy.SPLIT_GEMM = None
    command = f"python3 deploy/gpu/profile_wire.py OUT.json {tokens} {' '.join(specs)}"
    env = environment() if cuda else {"device": "CPU", "torch": torch.__version__, "model": loaded.name}
    Path(path).write_text(json.dumps({"command": command, "environment": env, "basis": basis,
                                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], *([int(sys.argv[2])] if len(sys.argv) > 2 else []), *([tuple(sys.argv[3:])] if len(sys.argv) > 3 else []))
