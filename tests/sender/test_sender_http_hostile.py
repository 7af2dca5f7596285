"""The sender's HTTP API against careless or hostile input (issue 31): every bad input is a 422 that
names it, refused before any model work, and an ask that times out leaves no thread behind."""

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from common import wire
from common.profile import MAX_PROFILE_CHARS, ProfileError, parse_profile
from common.settings import Settings
from sender.http import create_app

CONTEXT = "The Normans gave their name to Normandy, a region in France."
AUTH = {"authorization": "Bearer tok"}


@pytest.fixture(scope="module")
def sender(start_receiver):
    receiver = start_receiver("tiny-llama")
    with TestClient(create_app(Settings(receiver_target=receiver.target, token="tok"), "tiny-llama")) as http:
        yield http


def ask(sender, **fields):
    body = {"context": CONTEXT, "question": "Where?", "max_new_tokens": 2, **fields}
    # NaN and Infinity as Python's json writes them (JSON has no such numbers; its parser takes them)
    return sender.post("/v1/ask", content=json.dumps(body), headers={**AUTH, "content-type": "application/json"})


@pytest.mark.parametrize("fields,message", [
    ({"quality_floor": float("nan")}, "quality_floor"),
    ({"deadline": float("nan")}, "deadline"),
    ({"deadline": 1e300}, "deadline"),
    ({"deadline": float("inf")}, "deadline"),
    ({"bandwidth": "1e400bit"}, "bandwidth"),
    ({"bandwidth": "0.00001bit"}, "bandwidth"),
    ({"bandwidth": "1" * 100_000}, "bandwidth"),
    ({"context": "x" * 2_000_000}, "context"),
    ({"question": "x" * 2_000_000}, "question"),
], ids=["nan-floor", "nan-deadline", "huge-deadline", "inf-deadline", "inf-rate", "tiny-rate", "long-rate",
        "long-context", "long-question"])
def test_bad_numbers_and_lengths_are_422(sender, fields, message):
    reply = ask(sender, **fields)
    assert reply.status_code == 422, reply.text
    assert message in reply.text and len(reply.text) < 2000


def test_the_prompt_and_the_answer_must_fit_the_context_before_the_prefill(sender, monkeypatch):
    import sender.pipeline as pipeline

    prefilled = []
    monkeypatch.setattr(pipeline, "prefill_prompt", lambda *args, **kwargs: prefilled.append(args))
    context = "Normandy is in France. " * 750  # about 3,800 tokens of tiny-llama's 4,096
    reply = ask(sender, context=context, max_new_tokens=512)
    assert reply.status_code == 422, reply.text
    assert "new tokens it exceeds the context of tiny-llama, 4096 tokens (max_position_embeddings)" in reply.text
    assert prefilled == []


POOLS = ("AnyIO worker", "kvwire-zstd", "asyncio_", "ThreadPoolExecutor")  # threads kept for reuse, by design


def new_threads(before: set[int]) -> list[str]:
    """Threads started since `before` that are not a pool's: gRPC's thread pulling a call's frames
    (which sleeps in the link's pacing) is one."""
    return [t.name for t in threading.enumerate() if t.ident not in before and not t.name.startswith(POOLS)]


def test_an_ask_past_its_deadline_leaves_no_pacing_thread(sender):
    assert ask(sender).status_code == 200  # the pools exist
    before = {t.ident for t in threading.enumerate()}
    for _ in range(3):
        reply = ask(sender, profile="raw", bandwidth="1kbit", deadline=0.3)
        assert reply.status_code == 504, reply.text
    deadline = time.monotonic() + 0.8  # unpaced, each would sleep about 2 s more for its first frame alone
    while new_threads(before):
        assert time.monotonic() < deadline, new_threads(before)
        time.sleep(0.05)
    assert ask(sender).status_code == 200  # and the next ask is served


# --- 12: the 2,048-character cap applies to the canonical form, on both sides --------------------------

def test_the_sender_refuses_a_profile_whose_canonical_form_the_receiver_would_refuse(tiny_llama):
    spec = "int2" + "".join(f"+int4@{i}" for i in range(300))
    spec = spec[:spec.rfind("+", 0, MAX_PROFILE_CHARS)]
    profile = parse_profile(spec)  # what the user wrote fits the cap
    canonical = str(profile)
    assert len(spec) <= MAX_PROFILE_CHARS < len(canonical)
    with pytest.raises(ProfileError, match=f"{len(canonical)} characters in its canonical form"):
        wire.header_profile(profile, None)
    with pytest.raises(ProfileError):  # what the receiver parses
        parse_profile(canonical)
    with pytest.raises(ProfileError, match="canonical form"):
        wire.Encoder(tiny_llama.fingerprint).header(4, None, profile)
    assert wire.header_profile(parse_profile("int4"), None) == "int4:g32"
