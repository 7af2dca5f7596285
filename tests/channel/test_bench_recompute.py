"""`kvwire bench gpu`'s KV-against-recompute table, on the CPU with the tiny llama (CI has no GPU):
the random-model basis fit, every case and link, the codec rows."""

import pytest

from channel import bench_recompute as bench
from common.models import load_model


@pytest.fixture
def fitted(tmp_path, monkeypatch):
    """tiny-llama with a basis fitted into a folder of its own; the basis forgotten afterwards, so
    that other tests see the model without one, as shipped."""
    monkeypatch.setenv("KVWIRE_BASIS_DIR", str(tmp_path))
    loaded = load_model("tiny-llama", "cpu", "float32")
    try:
        yield loaded, bench.fit_random_basis(loaded, tmp_path, tokens=512)
    finally:
        monkeypatch.undo()
        loaded.reload_basis()
        assert loaded.codec_context.basis is None


def test_links_say_which_rates_the_relay_cannot_shape():
    chosen = bench.links(["1gbit", "25gbit", "10gbit", "100gbit"], ceiling_bps=12e9)
    assert [link["label"] for link in chosen[1:]] == ["10gbit", "1gbit"]  # fastest first
    assert chosen[0]["label"] == "25gbit/100gbit > ceiling: unshaped"
    assert "exceed the relay's measured ceiling of 12.00 Gbit/s" in chosen[0]["note"]
    assert chosen[0]["bps"] is None  # never reported as either rate
    assert [link["bps"] for link in bench.links(["1gbit", "10gbit"], ceiling_bps=9e9)] == [None, 1e9]


def test_random_basis_has_joint_transform_and_unit_weights(fitted):
    loaded, basis = fitted
    held = loaded.codec_context.basis
    assert held.digest == basis["digest"] and held.joint is not None
    assert held.weights.tolist() == [[1.0, 1.0]] * loaded.fingerprint.num_layers
    assert basis["layer_weights"].startswith("all 1.0")


def test_table_on_cpu(fitted, start_receiver):
    loaded, _ = fitted
    receiver = start_receiver("tiny-llama", device="cpu", dtype="float32", session_ttl_s=bench.SESSION_TTL_S)
    profiles = ["int4", "pca:b2:w:e:j"]
    said = []
    report = bench.kv_against_recompute(loaded, receiver.target, [256], ["1gbit", "100gbit"], profiles,
                                        ceiling_bps=50e9, codec_tokens=256, say=said.append)
    assert report["recompute"][0]["ttft_s"] > 0 and report["recompute"][0]["context"] == 256
    rows = {(r["case"], r["profile"], r["link"]): r for r in report["rows"]}
    links = [link["label"] for link in report["links"]]
    assert links == ["100gbit > ceiling: unshaped", "1gbit"]
    cases = ("at sender, plain", "at sender, streamed", "on demand, plain (derived)", "on demand, pipelined")
    assert set(rows) == {(c, p, link) for c in cases for p in profiles for link in links}
    for profile in profiles:
        plain = rows["at sender, plain", profile, "1gbit"]
        streamed = rows["at sender, streamed", profile, "1gbit"]
        derived = rows["on demand, plain (derived)", profile, "1gbit"]
        assert plain["status"] == streamed["status"] == "ok", (plain, streamed)
        assert plain["bytes"] == streamed["bytes"]  # the same frames, sent as encoded
        assert plain["ttft_s"] == pytest.approx(plain["encode_s"] + plain["send_s"] + plain["inject_s"]
                                                + plain["first_token_s"])
        assert derived["ttft_s"] == pytest.approx(derived["prefill_s"] + plain["ttft_s"])
        assert plain["link_s"] == pytest.approx(plain["bytes"] * 8 / 1e9)
        piped = rows["on demand, pipelined", profile, "1gbit"]
        assert piped["status"] == "ok" or piped["status"].startswith("refused:"), piped
        for row, gbps in ((derived, 1.0), (piped, 1.0), (rows["on demand, pipelined", profile, links[0]], 50.0)):
            if row["status"] == "ok":  # against the shaped rate, or the relay's ceiling where it ran unshaped
                assert row["link_gbps"] == pytest.approx(gbps)
                assert row["vs_link_plus_prefill"] == pytest.approx(
                    row["ttft_s"] / (row["bytes"] * 8 / (gbps * 1e9) + row["prefill_s"]))
        assert "vs_link_plus_prefill" not in plain
    int4 = rows["at sender, plain", "int4", "1gbit"]["ratio_vs_fp16"]
    pca = rows["at sender, plain", "pca:b2:w:e:j", "1gbit"]["ratio_vs_fp16"]
    assert 0.2 < int4 < 0.45 and pca < int4
    codec = {(r["profile"].split(":h")[0], r["launch"]): r for r in report["codec"]}
    assert set(codec) == {(p, launch) for p in ("int4:g32", "pca:b2:w:e:j") for launch in ("per layer", "wire")}, codec
    assert all(r.get("status") is None and r["encode_gbps"] > 0 and r["decode_gbps"] > 0 for r in codec.values())
    assert any("recompute from text" in line for line in said)
