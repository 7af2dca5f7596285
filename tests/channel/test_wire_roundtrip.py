from channel.bench_gpu import wire_roundtrip


def test_the_frame_path_bench_round_trips_and_counts_stored_chunks():
    raw = wire_roundtrip(5000, "raw", "cpu", layers=2, heads=2, head_dim=64, repeat=1)
    assert raw["lossless"] and raw["chunks"] == 2 * 3 and raw["stored_chunks"] == 0  # 2040 tokens a chunk; random bf16 keeps zstd
    assert raw["payload_bytes"] < raw["raw_bytes"] == raw["input_bytes"]
    codes = wire_roundtrip(5000, "int8", "cpu", layers=2, heads=2, head_dim=64, repeat=1)
    assert codes["stored_chunks"] == codes["chunks"] and codes["payload_bytes"] == codes["raw_bytes"]
    assert {"zstd_decompress", "crc32c", "codec_decode", "host_to_device"} <= set(codes["stages_s"])
