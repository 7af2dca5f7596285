"""The receiver's HTTP side and bearer-token auth, against a real in-process server."""

import time

import grpc
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from channel.nodes import free_port
from common.profile import parse_profile
from common.settings import Settings
from receiver.http import create_app
from sender.client import Client
from sender.pipeline import Sender
from sender.prefill import prefill_prompt

TOKEN = "s3cret"
CONTEXT = "The Normans gave their name to Normandy, a region in France."


def ready(client: TestClient, headers=None) -> None:
    for _ in range(600):
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise TimeoutError("receiver not ready")


@pytest.fixture(scope="module")
def receiver(tmp_path_factory):
    port = free_port()
    settings = Settings(token=TOKEN, sweep_dir=tmp_path_factory.mktemp("sweep"), session_budget_bytes=500_000)
    app = create_app(settings, "127.0.0.1", port, "tiny-llama")
    with TestClient(app) as http:
        ready(http)
        yield http, f"127.0.0.1:{port}", app


AUTH = {"authorization": f"Bearer {TOKEN}"}


def send(target, tiny_llama, token=TOKEN, profile="int8"):
    with Client(target, token=token) as client:
        asked = Sender(tiny_llama, client, attempts=1).ask(CONTEXT, "Where is Normandy?", parse_profile(profile),
                                                           max_new_tokens=4)
    return asked


def test_health_and_readiness_are_open(receiver):
    http, _, _ = receiver
    assert http.get("/healthz").json() == {"status": "ok"}
    body = http.get("/readyz").json()
    assert body["status"] == "ready" and body["model"] == "tiny-llama"


@pytest.mark.parametrize("path", ["/metrics", "/v1/sessions", "/v1/sessions/x", "/", "/dashboard/sweep.png",
                                  "/openapi.json"])
def test_every_api_call_needs_the_token(receiver, path):
    http, _, _ = receiver
    assert http.get(path).status_code == 401
    assert http.get(path, headers={"authorization": "Bearer wrong"}).status_code == 401
    assert http.delete("/v1/sessions/x").status_code == 401


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_browsable_docs_are_off_when_a_token_is_set(receiver, path):
    http, _, _ = receiver
    assert http.get(path).status_code == 404 and http.get(path, headers=AUTH).status_code == 404
    assert "/v1/sessions" in http.get("/openapi.json", headers=AUTH).json()["paths"]


def test_grpc_calls_need_the_token_but_health_does_not(receiver, tiny_llama):
    _, target, _ = receiver
    with pytest.raises(grpc.RpcError) as info:
        send(target, tiny_llama, token=None)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        send(target, tiny_llama, token="wrong")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_sessions_list_inspect_delete(receiver, tiny_llama):
    http, target, _ = receiver
    sent = send(target, tiny_llama)
    listed = http.get("/v1/sessions", headers=AUTH).json()
    assert sent.session_id in [s["id"] for s in listed["sessions"]]
    one = http.get(f"/v1/sessions/{sent.session_id}", headers=AUTH).json()
    assert one["profile"] == "int8:g32" and one["bytes_received"] == sent.bytes_sent and one["seq_len"] > 0
    assert http.delete(f"/v1/sessions/{sent.session_id}", headers=AUTH).status_code == 204
    assert http.get(f"/v1/sessions/{sent.session_id}", headers=AUTH).status_code == 404
    assert http.delete(f"/v1/sessions/{sent.session_id}", headers=AUTH).status_code == 404
    with Client(target, token=TOKEN) as client, pytest.raises(grpc.RpcError) as info:
        client.generate(sent.session_id, token_ids=[1])
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_metrics_count_transfers_and_rejections(receiver, tiny_llama):
    http, target, _ = receiver
    before = http.get("/metrics", headers=AUTH).text
    sent = send(target, tiny_llama)
    with Client(target, token=TOKEN) as client, pytest.raises(grpc.RpcError):
        client.send_frames([])  # no header, no trailer: rejected
    text = http.get("/metrics", headers=AUTH).text
    for name in ("kvwire_bytes_received_total", "kvwire_transfers_total", "kvwire_transfer_seconds_bucket",
                 "kvwire_decode_seconds_bucket", "kvwire_active_sessions", "kvwire_rejected_frames_total"):
        assert name in text, name
    assert 'kvwire_rejected_frames_total{reason="DATA_LOSS"}' in text

    def value(body, line_start):
        return float(next(line for line in body.splitlines() if line.startswith(line_start)).split()[-1])

    assert value(text, "kvwire_bytes_received_total") >= value(before, "kvwire_bytes_received_total") + sent.bytes_sent


def test_dashboard_shows_recent_transfers(receiver, tiny_llama):
    http, target, app = receiver
    send(target, tiny_llama, profile="q2c:0.5+int4")
    page = http.get("/", headers=AUTH)
    assert page.status_code == 200
    assert "recent transfers" in page.text and "q2c:0.5+int4:g32" in page.text
    assert "No sweep yet" in page.text
    plot = app.state.settings.sweep_dir / "rate_distortion.png"
    plot.write_bytes(b"\x89PNG fake")
    assert http.get("/dashboard/sweep.png", headers=AUTH).content == b"\x89PNG fake"
    assert '<img src="/dashboard/sweep.png"' in http.get("/", headers=AUTH).text


def test_budget_overflow_is_resource_exhausted(receiver, tiny_llama):
    """A cache bigger than the whole session budget is refused, and nothing is stored."""
    http, target, _ = receiver
    with Client(target, token=TOKEN) as client:
        pre = prefill_prompt(tiny_llama, CONTEXT * 80, "Where?", True)  # ~1,100 tokens at 1 KB each: over 0.5 MB
        with pytest.raises(grpc.RpcError) as info:
            Sender(tiny_llama, client, attempts=1).transfer(pre.kv, parse_profile("raw"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "session budget" in info.value.details()
