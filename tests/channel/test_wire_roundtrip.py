from channel.bench_gpu import wire_roundtrip


def test_the_frame_path_bench_round_trips_and_counts_stored_chunks():
    raw = wire_roundtrip(5000, "raw", "cpu", layers=2, heads=2, head_dim=64, repeat=1)
    assert raw["serialized_bytes_equal"] and raw["received_equal"]
    assert raw["lossless"] and raw["chunks"] == 2 * 3 and raw["stored_chunks"] == 0  # 2040 tokens a chunk; random bf16 keeps zstd
    assert raw["payload_bytes"] < raw["raw_bytes"] == raw["input_bytes"]
    codes = wire_roundtrip(5000, "int8", "cpu", layers=2, heads=2, head_dim=64, repeat=1)
    assert codes["stored_chunks"] == codes["chunks"] and codes["payload_bytes"] == codes["raw_bytes"]
    assert {"zstd_decompress", "crc32c", "codec_decode", "host_to_device"} <= set(codes["stages_s"])


def test_the_frame_bench_sends_the_same_bytes_both_ways_and_checks_what_it_receives():
    from channel.bench import frame_making

    row = frame_making(chunks=6, chunk_bytes=4096, repeats=1)  # raises where the two ways' bytes differ
    assert row["payload_bytes"] == 6 * 4096 and set(row["gbps"]) == {
        "pb.Frame, then serialized", "serialized as made", "parsed whole, payload read", "received (payload a view)"}
