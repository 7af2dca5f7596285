"""Negotiation with policy auto, and the bandwidth the sender estimates from its own stream."""

import grpc
import pytest

from channel.relay import BackgroundRelay
from common.link import link_from_options
from common.profile import parse_profile
from receiver import server as server_module
from sender.bandwidth import BandwidthEstimator
from sender.client import Client
from sender.pipeline import Sender
from sender.prefill import prefill_prompt

TABLE = {"version": 1, "model": "tiny-llama", "samples": 1, "prefill_s_per_token": 0.0, "profiles": {
    "fp16": {"fidelity": 1.0, "bytes_per_token": 600, "encode_s_per_token": 0, "receiver_s_per_token": 0,
             "first_token_s": 0.0},
    "int8:g32": {"fidelity": 0.95, "bytes_per_token": 350, "encode_s_per_token": 0, "receiver_s_per_token": 0,
                 "first_token_s": 0.0},
    "int4:g32": {"fidelity": 0.8, "bytes_per_token": 150, "encode_s_per_token": 0, "receiver_s_per_token": 0,
                 "first_token_s": 0.0}}}


def test_estimator_ewma():
    estimator = BandwidthEstimator(alpha=0.5, safety=1.0)
    assert estimator.estimate() is None
    estimator.update(1_000_000, 1.0)  # 8 Mbit/s
    estimator.update(1_000_000, 0.5)  # 16 Mbit/s
    assert estimator.estimate() == pytest.approx(12e6)
    estimator.update(100, 1e-6)  # a tiny frame says nothing about the rate
    assert estimator.estimate() == pytest.approx(12e6)


def test_auto_policy_plans_for_the_link(llama_receiver, tiny_llama, monkeypatch):
    monkeypatch.setattr(server_module, "load_table", lambda model: TABLE)
    with Client(llama_receiver.target) as client:
        fast = client.negotiate(tiny_llama.fingerprint, [], "auto", 1000, 1e9, 1.0)
        slow = client.negotiate(tiny_llama.fingerprint, [], "auto", 1000, 2e6, 1.0)
        floor = client.negotiate(tiny_llama.fingerprint, ["fp16", "int4"], "auto", 1000, 2e6, 1.0, quality_floor=0.9)
        fixed = client.negotiate(tiny_llama.fingerprint, ["int4", "fp16"])
        with pytest.raises(grpc.RpcError) as info:
            client.negotiate(tiny_llama.fingerprint, [], "greedy")
    assert fast.profile == "fp16" and "highest calibrated fidelity" in fast.reason and fast.expected_seconds < 1
    assert slow.profile == "int4:g32" and slow.expected_fidelity == 0.8
    assert floor.profile == "int4:g32" and "no profile meets" in floor.reason  # only fp16 clears the floor; too slow
    assert fixed.profile == "int4:g32" and fixed.reason.startswith("fixed")
    assert set(fast.capabilities) == set(TABLE["profiles"])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_auto_without_a_calibration_is_a_clear_error(llama_receiver, tiny_llama):
    with Client(llama_receiver.target) as client, pytest.raises(grpc.RpcError) as info:
        client.negotiate(tiny_llama.fingerprint, [], "auto", 100, 1e6, 1.0)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no calibration for tiny-llama" in info.value.details()


def test_bandwidth_estimate_from_the_stream(llama_receiver, tiny_llama):
    pre = prefill_prompt(tiny_llama, "The Normans built castles. " * 400, "Who?")  # ~2,400 tokens: ~2.5 MB raw
    with BackgroundRelay(llama_receiver.target, lambda: link_from_options("20mbit")) as relay, Client(relay.target) as client:
        Sender(tiny_llama, client, attempts=1).transfer(pre.kv, parse_profile("raw"))
        estimate = client.bandwidth.estimate() / client.bandwidth.safety
    assert estimate == pytest.approx(20e6, rel=0.35)
