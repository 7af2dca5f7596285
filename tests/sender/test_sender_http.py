"""The sender's HTTP API against a real in-process receiver."""

import pytest
from fastapi.testclient import TestClient

from common.settings import Settings
from sender.http import create_app

CONTEXT = "The Normans gave their name to Normandy, a region in France."


@pytest.fixture(scope="module")
def sender(start_receiver):
    receiver = start_receiver("tiny-llama")
    with TestClient(create_app(Settings(receiver_target=receiver.target, token="tok"), "tiny-llama")) as http:
        yield http


AUTH = {"authorization": "Bearer tok"}


def test_ask_returns_answer_and_statistics(sender):
    body = {"context": CONTEXT, "question": "Where is Normandy?", "profile": "q2c:0.5+int4", "max_new_tokens": 4}
    reply = sender.post("/v1/ask", json=body, headers=AUTH)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["profile"] == "q2c:0.5+int4:g32" and data["answer"] is not None
    assert data["kept_tokens"] < data["seq_len"] and data["bytes_sent"] > 0 and data["ratio_vs_fp16"] < 0.3


def test_ask_through_an_emulated_link_takes_the_link_time(sender):
    body = {"context": CONTEXT, "question": "Where?", "profile": "raw", "bandwidth": "2mbit", "max_new_tokens": 2}
    data = sender.post("/v1/ask", json=body, headers=AUTH).json()
    assert data["transfer_s"] >= data["bytes_sent"] * 8 / 2e6 * 0.95


@pytest.mark.parametrize("body,status,message", [
    ({"context": CONTEXT, "question": "q", "profile": "int17"}, 422, "1 to 8 bits"),
    ({"context": CONTEXT, "question": "q", "profile": "auto"}, 422, "no calibration for tiny-llama"),
    ({"context": CONTEXT, "question": "q", "bandwidth": "fast"}, 422, "cannot read rate"),
    ({"context": "", "question": "q"}, 422, "context"),
    ({"context": CONTEXT, "question": "q", "profile": "q2c:0.5", "query_aware": False}, 422, "query-aware"),
    ({"context": CONTEXT, "question": "q", "segments": 32, "bandwidth": "2mbit"}, 422, "leave out bandwidth"),
    ({"context": CONTEXT, "question": "q", "segments": 32}, 422, "no calibration for tiny-llama"),
    ({"context": "Normandy is in France. " * 1000, "question": "q", "profile": "int8"}, 422,
     "exceeds the context of tiny-llama, 4096 tokens (max_position_embeddings)"),
])
def test_bad_requests(sender, body, status, message):
    reply = sender.post("/v1/ask", json=body, headers=AUTH)
    assert reply.status_code == status and message in reply.text


def test_auth_docs_and_metrics(sender):
    assert sender.post("/v1/ask", json={"context": CONTEXT, "question": "q"}).status_code == 401
    assert sender.get("/metrics").status_code == 401
    assert "kvwire_sender_asks_total" in sender.get("/metrics", headers=AUTH).text
    # With a token set, the schema is behind it and the browsable pages are off.
    assert sender.get("/openapi.json").status_code == 401 and sender.get("/docs").status_code == 404
    assert "/v1/ask" in sender.get("/openapi.json", headers=AUTH).json()["paths"]
    assert sender.get("/healthz").status_code == 200


def test_docs_are_open_without_a_token(start_receiver):
    with TestClient(create_app(Settings(receiver_target="127.0.0.1:1"), "tiny-llama")) as http:
        assert http.get("/docs").status_code == 200 and "/v1/ask" in http.get("/openapi.json").json()["paths"]


def test_receiver_down_is_a_502(start_receiver):
    with TestClient(create_app(Settings(receiver_target="127.0.0.1:1"), "tiny-llama")) as http:
        reply = http.post("/v1/ask", json={"context": CONTEXT, "question": "q", "profile": "int8"})
    assert reply.status_code == 502 and "UNAVAILABLE" in reply.text


def test_auto_uses_the_planner(start_receiver, tmp_path, monkeypatch):
    """'auto' plans from the model's calibration table and says why."""
    import json

    from common import planner

    table = {"version": 1, "model": "tiny-llama", "samples": 1, "prefill_s_per_token": 0.0, "profiles": {
        "fp16": {"fidelity": 1.0, "bytes_per_token": 600, "encode_s_per_token": 0, "receiver_s_per_token": 0,
                 "first_token_s": 0.0},
        "int4:g32": {"fidelity": 0.8, "bytes_per_token": 150, "encode_s_per_token": 0, "receiver_s_per_token": 0,
                     "first_token_s": 0.0}}}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(planner, "calibration_path", lambda model: path)
    import sender.http

    monkeypatch.setattr(sender.http, "load_table", lambda model: planner.load_table(model, path))
    receiver = start_receiver("tiny-llama")
    with TestClient(create_app(Settings(receiver_target=receiver.target), "tiny-llama")) as http:
        fast = http.post("/v1/ask", json={"context": CONTEXT, "question": "q", "profile": "auto",
                                          "bandwidth": "100mbit", "deadline": 1.0, "max_new_tokens": 2}).json()
        slow = http.post("/v1/ask", json={"context": CONTEXT, "question": "q", "profile": "auto",
                                          "bandwidth": "50kbit", "deadline": 3.0, "max_new_tokens": 2}).json()
        segmented = http.post("/v1/ask", json={"context": CONTEXT * 4, "question": "q", "segments": 16,
                                               "deadline": 30.0, "max_new_tokens": 2}).json()
    assert fast["profile"] == "fp16" and "highest calibrated fidelity" in fast["plan"]
    assert slow["profile"] == "int4:g32"
    parts = segmented["segments"]
    assert len(parts) == -(-segmented["seq_len"] // 16) > 2 and parts[-1]["end"] == segmented["seq_len"]
    # A tiny model's segments are far below the 64 KB a goodput sample needs: each one is a probe.
    assert {p["profile"] for p in parts} == {"int4:g32"} and all(p["planned_bps"] is None for p in parts)
    assert segmented["answer"] is not None and segmented["profile"] == "segments"


def test_auto_learns_the_link_and_plans_query_agnostic_asks_without_q2c(start_receiver, tmp_path, monkeypatch):
    """One client per app: its bandwidth estimate from earlier asks plans later ones; a query-agnostic
    ask is never planned onto a profile that needs the question."""
    import json

    from common import planner

    row = {"encode_s_per_token": 0, "receiver_s_per_token": 0, "first_token_s": 0.0}
    table = {"version": 1, "model": "tiny-llama", "samples": 1, "prefill_s_per_token": 0.0, "profiles": {
        "q2c:0.5+fp16": {"fidelity": 1.0, "bytes_per_token": 300, **row},
        "fp16": {"fidelity": 0.9, "bytes_per_token": 600, **row}}}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(planner, "calibration_path", lambda model: path)
    receiver = start_receiver("tiny-llama")
    with TestClient(create_app(Settings(receiver_target=receiver.target), "tiny-llama")) as http:
        assert http.app.state.sender.client.bandwidth.estimate() is None
        warm = http.post("/v1/ask", json={"context": CONTEXT * 80, "question": "q", "profile": "raw",
                                          "max_new_tokens": 1})  # over 64 KB: a goodput sample
        assert warm.status_code == 200, warm.text
        learned = http.app.state.sender.client.bandwidth.estimate()
        aware = http.post("/v1/ask", json={"context": CONTEXT, "question": "q", "profile": "auto",
                                           "max_new_tokens": 1}).json()
        agnostic = http.post("/v1/ask", json={"context": CONTEXT, "question": "q", "profile": "auto",
                                              "query_aware": False, "max_new_tokens": 1}).json()
    assert learned is not None
    assert f"at {learned / 1e6:g} Mbit/s" in aware["plan"]  # not the 100 Mbit/s default
    assert aware["profile"] == "q2c:0.5+fp16"
    assert agnostic["profile"] == "fp16"
