"""`kvwire bench gpu`: the codec and the ask pipeline on a GPU at a real model's KV shape.

Three measurements, each printed as figures and returned as dicts (nothing here is a test):

- codec throughput: encode and decode GB/s of bf16 input at Llama-3.1-8B's KV shape (32
  layers, 8 KV heads, head_dim 128), divided by a device copy of the same tensors timed in
  the same run, for each kernel path (plain torch, Triton);
- the stages of an ask over real gRPC on this machine's loopback, through the shaping relay
  at several rates, and the time to first token with and without layer pipelining;
- prefill and selection at long contexts, with peak GPU memory.

The model is `llama-3.1-8b-random`: Llama-3.1-8B's architecture with RANDOM weights (no real
weights of that size can be carried to the GPU machine), so its answers mean nothing; its
speed and memory are those of the real shape.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import zstandard

from common.plan import CodecPlan, kv_codec
from common.profile import parse_profile

RANDOM_MODEL = "llama-3.1-8b-random"
CODEC_PROFILES = ("int8", "int4", "int2", "nf4")
KERNEL_PATHS = ("torch", "triton")


def kernels(path: str):
    """Force one codec path in a block (common.quant.kernels.forced)."""
    from common.quant.kernels import forced

    return forced(path)


def cuda_seconds(fn, repeat: int = 7, warmup: int = 3, sample_s: float = 0.02) -> float:
    """Wall time of one `fn()` on the GPU: the median of `repeat` samples, each timed between CUDA
    events over enough back-to-back calls to last about `sample_s` (a single call of a few hundred
    microseconds is too noisy to time alone)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    calls = max(1, math.ceil(sample_s / max(start.elapsed_time(end) / 1e3, 1e-6)))
    times = []
    for _ in range(repeat):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def warm_up(seconds: float = 2.0) -> None:
    """Keep the GPU busy for a while, so that its clocks are up before anything is timed."""
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            x.add_(1)
        torch.cuda.synchronize()


def codec_throughput(tokens: int, layers: int = 32, heads: int = 8, head_dim: int = 128,
                     dtype: torch.dtype = torch.bfloat16, profiles=CODEC_PROFILES, paths=KERNEL_PATHS) -> list[dict]:
    """Encode and decode of a whole cache (every layer's keys and values), against a device copy.

    Two ways for each kernel path: `per layer`, the codec's calls one layer at a time (each with its
    finite check and sync); and, for the Triton path, `one launch`, the stacked layers in one launch
    per tensor (`kernels.encode_kv`), the kernels' own speed: the finite check runs in the kernels,
    and its flag is read once on the host, as the wire reads it with a payload's copy to the host."""
    from common.quant import kernels as fused

    device = torch.device("cuda")
    generator = torch.Generator(device).manual_seed(0)
    shape = (1, heads, tokens, head_dim)
    stacked_k = torch.randn((layers, heads, tokens, head_dim), device=device, dtype=dtype, generator=generator)
    stacked_v = torch.randn((layers, heads, tokens, head_dim), device=device, dtype=dtype, generator=generator)
    keys, values = list(stacked_k.split(1)), list(stacked_v.split(1))
    nbytes = 2 * layers * heads * tokens * head_dim * dtype.itemsize
    warm_up()
    copy_s = cuda_seconds(lambda: (stacked_k.clone(), stacked_v.clone()))
    rows = []

    def row(spec, path, launch, payload_bytes, encode_s, decode_s):
        rows.append({
            "tokens": tokens, "profile": str(parse_profile(spec)), "kernels": path, "launch": launch,
            "input_bytes": nbytes, "payload_bytes": payload_bytes, "copy_gbps": nbytes / copy_s / 1e9,
            "encode_gbps": nbytes / encode_s / 1e9, "decode_gbps": nbytes / decode_s / 1e9,
            "encode_vs_copy": copy_s / encode_s, "decode_vs_copy": copy_s / decode_s,
        })

    for spec in profiles:
        codec = kv_codec(parse_profile(spec), 0)
        for path in paths:
            with kernels(path):
                payloads = [codec.encode(k, v) for k, v in zip(keys, values)]
                encode_s = cuda_seconds(lambda: [codec.encode(k, v) for k, v in zip(keys, values)])
                decode_s = cuda_seconds(lambda: [codec.decode(p, shape, dtype) for p in payloads])
            row(spec, path, "per layer", sum(p.numel() for p in payloads), encode_s, decode_s)
            if path == "triton":
                with kernels(path):
                    axes = (codec.key_axis, codec.value_axis)
                    flag = torch.zeros(1, dtype=torch.int32, device=device)
                    payload = fused.encode_kv(codec.quantizer, stacked_k, stacked_v, *axes, flag=flag)
                    encode_s = cuda_seconds(lambda: fused.encode_kv(codec.quantizer, stacked_k, stacked_v, *axes,
                                                                    flag=flag))
                    fused.refuse_flagged(flag, [stacked_k, stacked_v])
                    decode_s = cuda_seconds(lambda: fused.decode_kv(codec.quantizer, payload, tuple(stacked_k.shape),
                                                                    dtype, *axes))
                row(spec, path, "one launch", payload.numel(), encode_s, decode_s)
    del keys, values, stacked_k, stacked_v
    torch.cuda.empty_cache()
    return rows


def wire_encode(tokens: int, spec: str = "int4", layers: int = 32, heads: int = 8, head_dim: int = 128,
                dtype: torch.dtype = torch.bfloat16) -> dict:
    """The wire's coding of a whole cache: each layer in ranges of a chunk's tokens (`wire.chunk_tokens`),
    as host bytes. One range at a time (a launch per tensor, a check and a host copy per
    range) against `KVCodec.encode_chunks` (one launch per tensor per layer, one check and one copy),
    which the wire uses; then the wire's frames (`Encoder.layer_chunks`: codes, zstd, CRC), zstd on
    one thread against the wire's pool."""
    from common import wire
    from common.proto import kvwire_pb2 as pb

    profile = parse_profile(spec)
    plan = CodecPlan.build(profile, None, layers)
    codec = plan.codecs[0].codec
    step = wire.chunk_tokens(plan.codecs[0], heads, head_dim, dtype)
    generator = torch.Generator("cuda").manual_seed(0)
    cache = [(torch.randn((1, heads, tokens, head_dim), device="cuda", dtype=dtype, generator=generator),
              torch.randn((1, heads, tokens, head_dim), device="cuda", dtype=dtype, generator=generator))
             for _ in range(layers)]
    positions = torch.arange(tokens, device="cuda").expand(heads, -1)

    def one_at_a_time():
        return [codec.encode(k[:, :, s:s + step], v[:, :, s:s + step]).cpu().numpy().tobytes()
                for k, v in cache for s in range(0, tokens, step)]

    def one_launch():
        return [raw for k, v in cache for raw in codec.encode_chunks(k, v, step)]

    def frames(threads: int):
        encoder = wire.Encoder(pb.Fingerprint(), zstd_threads=threads)
        return [f.chunk.payload for layer, (k, v) in enumerate(cache)
                for f in encoder.layer_chunks(layer, k, v, positions, plan)]

    threads = wire.ZSTD_THREADS
    with kernels("triton"):
        assert one_at_a_time() == one_launch() and frames(1) == frames(threads)
        each_s, batched_s = cuda_seconds(one_at_a_time, repeat=3), cuda_seconds(one_launch, repeat=3)
        serial_s, parallel_s = cuda_seconds(lambda: frames(1), repeat=3), cuda_seconds(lambda: frames(threads), repeat=3)
    del cache
    torch.cuda.empty_cache()
    return {"tokens": tokens, "profile": str(profile), "chunk_tokens": step, "chunks": layers * -(-tokens // step),
            "one_range_at_a_time_s": each_s, "encode_chunks_s": batched_s, "speedup": each_s / batched_s,
            "zstd_threads": threads, "frames_zstd_serial_s": serial_s, "frames_zstd_parallel_s": parallel_s,
            "frames_speedup": serial_s / parallel_s}


def synthetic_context(tokenizer, tokens: int) -> str:
    """About `tokens` tokens of plain text (the random model's answers mean nothing anyway)."""
    paragraph = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
                 "a region in France. They were descended from Norse raiders and pirates. ")
    per = len(tokenizer(paragraph).input_ids)
    return paragraph * max(1, tokens // per)


def ask_stages(sender, context: str, question: str, profile: str, rates: list[str], receiver_target: str,
               max_new_tokens: int = 1) -> list[dict]:
    """Per link rate: each stage of an ask, and the time to first token with and without pipelining."""
    from channel.relay import RelayProcess
    from sender.client import Client
    from sender.pipeline import Sender

    parsed = parse_profile(profile)
    rows = []
    for rate in rates:
        with RelayProcess(receiver_target, rate=rate) as relay, \
                Client(relay.target, timeout_s=600) as client:
            asker = Sender(sender, client, zstd_level=1)
            asker.ask(context, question, parsed, max_new_tokens=max_new_tokens)  # warm up both sides
            plain = asker.ask(context, question, parsed, max_new_tokens=max_new_tokens)
            piped = asker.ask_pipelined(context, question, parsed, max_new_tokens=max_new_tokens)
        stages = {"prefill_s": plain.prefill_s, "encode_s": plain.encode_s, "send_s": plain.transfer_s,
                  "inject_s": plain.inject_s, "first_token_s": plain.decode_s}
        rows.append({"rate": rate, "profile": str(parsed), "tokens": plain.seq_len, "bytes": plain.bytes_sent, **stages,
                     "assemble_s": plain.assemble_s,  # the receiver's work, inside send_s as the chunks arrive
                     "ttft_unpipelined_s": sum(stages.values()),
                     "ttft_pipelined_s": piped.transfer_s + piped.inject_s + piped.decode_s,
                     "answers_equal": plain.token_ids == piped.token_ids})
    return rows


def selection_memory(loaded, context: str, question: str, methods=("q2c:0.5", "snapkv:0.5")) -> dict:
    """Prefill with the attention statistics the methods need, then select: times and peak GPU memory."""
    from sender.prefill import prefill_prompt, select_tokens

    profiles = [parse_profile(m) for m in methods]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pre = prefill_prompt(loaded, context, question, True, profiles)
    torch.cuda.synchronize()
    result = {"tokens": pre.kv.seq_len, "prefill_s": time.perf_counter() - start,
              "prefill_peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    for profile in profiles:
        start = time.perf_counter()
        select_tokens(loaded, pre, profile)
        torch.cuda.synchronize()
        result[f"select_{profile.selection.method}_s"] = time.perf_counter() - start
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del pre
    torch.cuda.empty_cache()
    return result


def relay_ceiling(nbytes: int = 1 << 30) -> float:
    """The most the shaping relay forwards, bit/s, with an unconstrained link, in a process of its own (as the
    benchmarks run it)."""
    import asyncio

    from channel.relay import measure_goodput

    return asyncio.run(measure_goodput({"rate": "1000gbit"}, nbytes))


def environment() -> dict:
    import transformers

    from common import wire
    from common.settings import get_settings

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "triton": triton_version, "model": RANDOM_MODEL,
            "weights": "random (seeded): Llama-3.1-8B's architecture and shape, not its weights",
            # the pca:...:a knobs a run may change: the GEMMs on tensor cores, and the sender's rANS batch (symbols)
            "split_gemm": get_settings().split_gemm, "rans_batch": wire.RANS_BATCH}


def grpc_ceiling(nbytes: int = 1 << 30, frame_bytes: int = 1 << 20, frames: bool = False) -> float:
    """The most gRPC itself carries on this machine's loopback, bit/s: one client stream of `frame_bytes`
    messages to a server in this process, no relay and no codec. `frames`: as kvwire's Frame messages
    (a chunk's payload, serialized and parsed on each side), not raw bytes."""
    from concurrent import futures

    import grpc

    from common.proto import kvwire_pb2 as pb

    count = max(1, nbytes // frame_bytes)
    payload = bytes(frame_bytes)
    message = pb.Frame(chunk=pb.Chunk(payload=payload)) if frames else payload
    encode, decode = (pb.Frame.SerializeToString, pb.Frame.FromString) if frames else (None, None)
    size = (lambda m: len(m.chunk.payload)) if frames else len

    def push(requests, context):
        return sum(size(m) for m in requests).to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler("kvwire.bench.Sink", {
        "Push": grpc.stream_unary_rpc_method_handler(push, request_deserializer=decode)})
    options = [("grpc.max_receive_message_length", 2 * frame_bytes + (1 << 20)),
               ("grpc.max_send_message_length", 2 * frame_bytes + (1 << 20))]
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler], options=options)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = channel.stream_unary("/kvwire.bench.Sink/Push", request_serializer=encode)
            call(iter([message] * 4))  # the connection up and warm
            start = time.perf_counter()
            received = int.from_bytes(call(message for _ in range(count)), "little")
            seconds = time.perf_counter() - start
    finally:
        server.stop(0)
    if received != count * frame_bytes:
        raise RuntimeError(f"the sink counted {received} bytes of {count * frame_bytes}")
    return received * 8 / seconds


def synced_seconds(fn, device: torch.device, repeat: int = 3):
    """(result, seconds) of `fn()`: the best of `repeat` runs, the device synchronized around each."""
    best, result = math.inf, None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return result, best


def wire_roundtrip(tokens: int, spec: str = "int4:g32", device: str | torch.device = "cuda", layers: int = 32,
                   heads: int = 8, head_dim: int = 128, dtype: torch.dtype = torch.bfloat16, context=None,
                   repeat: int = 3) -> dict:
    """The frame path of a whole cache of random KV on `device`, both ways: `wire.encode` (codes, zstd,
    CRC, Frames), the Frames to bytes and back, and an Assembler building the cache on `device`; as GB/s
    of `dtype` input. `context`: the CodecContext a profile's stages need (a basis for pca, RoPE).
    `to_bytes_s`: the cache to the bytes gRPC sends, as pb.Frames then serialized, and as the sender makes them
    (`Encoder(serialized=True)`, whose bytes must equal the others: `serialized_bytes_equal`); `from_bytes_s`: those
    bytes to the cache, each frame parsed whole then decoded, and as the receiver takes them (`framing.received`:
    a chunk's payload left in its message).

    Beside the totals, each stage of the path timed on its own over the same chunks (`stages_s`):
    the codec's encode and decode, zstd both ways (decompress: the chunks not stored; compress: every
    chunk, as if none were stored), CRC, the copy of a payload into a tensor, its copy to the device,
    and protobuf. They need not add up to the totals (the zstd pool runs in parallel);
    they say where a chunk's time goes."""
    from common import framing, wire
    from common.kvstate import KVState
    from common.proto import kvwire_pb2 as pb

    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(0)
    shape = (1, heads, tokens, head_dim)
    kv = KVState([torch.randn(shape, device=device, dtype=dtype, generator=generator) for _ in range(layers)],
                 [torch.randn(shape, device=device, dtype=dtype, generator=generator) for _ in range(layers)],
                 [torch.arange(tokens, device=device).expand(heads, -1)] * layers, tokens)
    nbytes = 2 * layers * heads * tokens * head_dim * dtype.itemsize
    name = str(dtype).removeprefix("torch.")
    fingerprint = pb.Fingerprint(architecture="bench", num_layers=layers, kv_heads=heads, head_dim=head_dim, dtype=name)
    limits = wire.Limits(max_frame_bytes=64 << 20, max_transfer_bytes=1 << 40, max_tokens=1 << 24)
    profile = parse_profile(spec)

    def decode(frames):
        return wire.decode(frames, fingerprint, limits, device=device, context=context)

    frames, encode_s = synced_seconds(lambda: list(wire.encode(kv, profile, fingerprint, "bench", context=context)),
                                      device, repeat)
    blobs, serialize_s = synced_seconds(lambda: [f.SerializeToString() for f in frames], device, repeat)
    # the sender's way: chunks serialized as they are made, from their payload's parts (framing.chunk_frame)
    sent, sent_s = synced_seconds(lambda: [framing.serialize(f) for f in wire.encode(kv, profile, fingerprint, "bench",
                                                                                   context=context, serialized=True)],
                                  device, repeat)
    parsed, parse_s = synced_seconds(lambda: [pb.Frame.FromString(b) for b in blobs], device, repeat)
    decoded, decode_s = synced_seconds(lambda: decode(parsed), device, repeat)
    received, received_s = synced_seconds(lambda: decode(sent), device, repeat)  # bytes: taken as received
    chunks = [f.chunk for f in parsed if f.WhichOneof("kind") == "chunk"]
    payloads = [c.payload for c in chunks]
    stages = {"protobuf_serialize": serialize_s, "protobuf_parse": parse_s}
    _, stages["crc32c"] = synced_seconds(lambda: [wire.checksum(p) for p in payloads], device, repeat)
    plan = CodecPlan.build(profile.bind(context) if context else profile, context, layers)
    if not plan.entropy_coded:
        raws, stages["zstd_decompress"] = synced_seconds(lambda: [wire.chunk_raw(c.payload, c.raw_size) for c in chunks],
                                                         device, repeat)
        compressor = zstandard.ZstdCompressor(level=wire.Encoder(fingerprint).zstd_level)
        _, stages["zstd_compress_every_chunk_one_thread"] = synced_seconds(lambda: [compressor.compress(r) for r in raws],
                                                               device, repeat)
        tensors, stages["bytes_to_tensor"] = synced_seconds(
            lambda: [torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in raws], device, repeat)
        on_device, stages["host_to_device"] = synced_seconds(lambda: [t.to(device) for t in tensors], device, repeat)
        _, stages["codec_encode"] = synced_seconds(
            lambda: [r for i, (k, v, p) in enumerate(zip(kv.keys, kv.values, kv.positions))
                     for r in plan.codecs[i].encode_chunks(k, v, p, wire.chunk_tokens(plan.codecs[i], heads,
                                                                                        head_dim, dtype))],
            device, repeat)
        _, stages["codec_decode"] = synced_seconds(
            lambda: [plan.codecs[c.layer].decode(t, (1, heads, c.token_end - c.token_start, head_dim),
                                                 kv.positions[c.layer][:, c.token_start:c.token_end], dtype)
                     for c, t in zip(chunks, on_device)], device, repeat)
    exact = all(torch.equal(a, b) for a, b in zip(decoded.keys + decoded.values, kv.keys + kv.values))
    received_equal = all(torch.equal(a, b) for a, b in zip(decoded.keys + decoded.values,
                                                           received.keys + received.values))
    wire_total = sum(len(b) + wire.GRPC_MESSAGE_PREFIX for b in blobs)
    return {"device": str(device), "tokens": tokens, "profile": str(profile), "layers": layers, "heads": heads,
            "head_dim": head_dim, "dtype": name, "input_bytes": nbytes, "wire_bytes": wire_total,
            "to_bytes_s": {"pb.Frame, then serialized": encode_s + serialize_s, "serialized as made": sent_s},
            "serialized_bytes_equal": sent == blobs,
            "from_bytes_s": {"parsed whole, then decoded": parse_s + decode_s, "received (payload a view)": received_s},
            "received_equal": received_equal,
            "chunks": len(chunks), "stored_chunks": sum(len(c.payload) == c.raw_size for c in chunks),
            "payload_bytes": sum(map(len, payloads)), "raw_bytes": sum(c.raw_size for c in chunks),
            "encode_s": encode_s, "decode_s": decode_s, "encode_gbps": nbytes / encode_s / 1e9,
            "decode_gbps": nbytes / decode_s / 1e9, "lossless": exact, "stages_s": stages}
