"""The sender's HTTP API: POST /v1/ask prefills, compresses and streams a context, and returns the answer."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field

from common import wire
from common.channel import link_from_options, pace
from common.models import load_model
from common.profile import ProfileError, parse_profile
from common.select import SelectionError
from common.settings import Settings
from receiver.auth import token_matches
from sender.client import Client
from sender.prefill import prefill_prompt, select_tokens


class AskRequest(BaseModel):
    context: str = Field(min_length=1)
    question: str = Field(min_length=1)
    profile: str = "int8"
    bandwidth: str | None = Field(None, description="Emulate a link of this rate in process, e.g. 20mbit.")
    deadline: float | None = Field(None, gt=0, description="Seconds allowed for the transfer and decode.")
    max_new_tokens: int = Field(32, ge=1, le=512)
    query_aware: bool = True


class AskResponse(BaseModel):
    answer: str
    profile: str
    session_id: str
    seq_len: int
    kept_tokens: int
    bytes_sent: int
    ratio_vs_fp16: float
    prefill_s: float
    compress_s: float
    transfer_s: float
    decode_s: float


def require_token(request: Request) -> None:
    token = request.app.state.settings.token
    if token and not token_matches(request.headers.get("authorization"), token):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def create_app(settings: Settings, model: str | None = None) -> FastAPI:
    registry = CollectorRegistry()
    asks = Counter("kvwire_sender_asks", "Asks by outcome", ["outcome"], registry=registry)
    bytes_sent = Counter("kvwire_sender_bytes_sent", "Bytes of frames sent", registry=registry)
    ask_seconds = Histogram("kvwire_sender_ask_seconds", "Time to answer an ask", registry=registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loaded = await asyncio.to_thread(load_model, model or settings.model)
        yield

    app = FastAPI(title="kvwire sender", lifespan=lifespan)
    app.state.settings = settings
    app.state.lock = asyncio.Lock()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/metrics", dependencies=[Depends(require_token)])
    async def metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/ask", response_model=AskResponse, dependencies=[Depends(require_token)])
    async def ask(body: AskRequest, request: Request):
        if body.profile == "auto":
            raise HTTPException(422, "profile 'auto' needs the negotiation planner, which this build does not have yet")
        try:
            profile = str(parse_profile(body.profile))
            link = link_from_options(body.bandwidth) if body.bandwidth else None
        except (ProfileError, ValueError) as exc:
            raise HTTPException(422, str(exc)) from None
        start = time.perf_counter()
        async with request.app.state.lock:  # one model pass at a time
            try:
                result = await asyncio.to_thread(_ask, request.app.state.loaded, settings, body, profile, link)
            except SelectionError as exc:
                asks.labels("bad_request").inc()
                raise HTTPException(422, str(exc)) from None
            except grpc.RpcError as exc:
                asks.labels(exc.code().name).inc()
                status = 504 if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else 502
                raise HTTPException(status, f"receiver: {exc.code().name}: {exc.details()}") from None
        asks.labels("ok").inc()
        bytes_sent.inc(result.bytes_sent)
        ask_seconds.observe(time.perf_counter() - start)
        return result

    return app


def _ask(loaded, settings: Settings, body: AskRequest, profile: str, link) -> AskResponse:
    with Client.from_settings(settings, timeout_s=body.deadline or 120.0) as client:
        agreed = client.negotiate(loaded.fingerprint, [profile]).profile
        pre = prefill_prompt(loaded, body.context, body.question, body.query_aware, [agreed])
        start = time.perf_counter()
        kv = select_tokens(loaded, pre, agreed)
        frames = list(wire.encode(kv, agreed, loaded.fingerprint))
        compressed = time.perf_counter()
        sent = client.send_frames(pace(frames, link, wire.wire_bytes) if link else frames)
        if body.query_aware:
            reply = client.generate(sent.session_id, token_ids=pre.tail_ids, max_new_tokens=body.max_new_tokens)
        else:
            reply = client.generate(sent.session_id, question=body.question, max_new_tokens=body.max_new_tokens)
    fp = loaded.fingerprint
    fp16 = 2 * fp.num_layers * fp.kv_heads * fp.head_dim * 2 * pre.kv.seq_len
    return AskResponse(
        answer=reply.text, profile=agreed, session_id=sent.session_id, seq_len=pre.kv.seq_len,
        kept_tokens=round(sum(kv.kept_tokens(i) for i in range(kv.num_layers)) / kv.num_layers),
        bytes_sent=sent.bytes_sent, ratio_vs_fp16=sent.bytes_sent / fp16, prefill_s=pre.seconds,
        compress_s=compressed - start, transfer_s=sent.seconds, decode_s=reply.inject_seconds + reply.decode_seconds,
    )
