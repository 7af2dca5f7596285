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
from common.link import link_from_options, pace, parse_rate
from common.models import load_model
from common.planner import load_table, plan
from common.profile import ProfileError, parse_profile
from common.prompts import build_prompt
from common.select import SelectionError
from common.settings import Settings
from common.auth import require_token
from sender.adaptive import SegmentPlanner, send_segments
from sender.client import Client
from sender.prefill import prefill_prompt, select_tokens


class AskRequest(BaseModel):
    context: str = Field(min_length=1)
    question: str = Field(min_length=1)
    profile: str = Field("int8", description="A profile, or 'auto': the planner picks one for bandwidth and deadline.")
    bandwidth: str | None = Field(None, description="Emulate a link of this rate in process, e.g. 20mbit; "
                                  "with 'auto', the rate the plan assumes (default 100mbit).")
    deadline: float | None = Field(None, gt=0, description="Seconds allowed; with 'auto' the plan's target (default 2).")
    quality_floor: float = Field(0.0, ge=0, le=1, description="With 'auto': the least calibrated fidelity accepted.")
    max_new_tokens: int = Field(32, ge=1, le=512)
    query_aware: bool = True
    segments: int | None = Field(None, ge=16, le=8192, description="Send in segments of this many tokens, each "
                                 "planned for the deadline (a precision profile, or text the receiver prefills); "
                                 "'profile' is then ignored.")


class SegmentInfo(BaseModel):
    start: int
    end: int
    profile: str
    bytes: int
    planned_bps: float | None  # None: a probe
    budget_s: float
    reason: str


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
    plan: str | None = None  # why 'auto' chose this profile
    segments: list[SegmentInfo] | None = None


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
        reason = None
        try:
            if body.segments and (body.bandwidth or not body.query_aware):
                raise ValueError("segments go over the real link, query-aware: leave out bandwidth (put `kvwire "
                                 "channel` in front of the receiver to emulate a link) and query_aware=false")
            link = link_from_options(body.bandwidth) if body.bandwidth else None
            if body.segments:
                profile, table = "segments", load_table(request.app.state.loaded.name)
            elif body.profile == "auto":
                loaded = request.app.state.loaded
                tokens = len(build_prompt(loaded.tokenizer, body.context, body.question).ids)
                chosen = plan(load_table(loaded.name), tokens, parse_rate(body.bandwidth or "100mbit"),
                              body.deadline or 2.0, body.quality_floor)
                profile, reason = chosen.profile, chosen.reason
            else:
                profile = str(parse_profile(body.profile))
        except (ProfileError, ValueError, FileNotFoundError) as exc:
            raise HTTPException(422, str(exc)) from None
        start = time.perf_counter()
        async with request.app.state.lock:  # one model pass at a time
            try:
                if body.segments:
                    result = await asyncio.to_thread(_ask_in_segments, request.app.state.loaded, settings, body, table)
                else:
                    result = await asyncio.to_thread(_ask, request.app.state.loaded, settings, body, profile, link)
                result.plan = reason
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
    return AskResponse(
        answer=reply.text, profile=agreed, session_id=sent.session_id, seq_len=pre.kv.seq_len,
        kept_tokens=round(sum(kv.kept_tokens(i) for i in range(kv.num_layers)) / kv.num_layers),
        bytes_sent=sent.bytes_sent, ratio_vs_fp16=sent.bytes_sent / pre.kv.fp16_nbytes, prefill_s=pre.seconds,
        compress_s=compressed - start, transfer_s=sent.seconds, decode_s=reply.inject_seconds + reply.decode_seconds,
    )


def _ask_in_segments(loaded, settings: Settings, body: AskRequest, table: dict) -> AskResponse:
    deadline = body.deadline or 2.0
    pre = prefill_prompt(loaded, body.context, body.question)
    planner = SegmentPlanner(table, text_s_per_token=pre.seconds_per_token)
    with Client.from_settings(settings, timeout_s=120.0) as client:
        client.negotiate(loaded.fingerprint, planner.ladder)
        sent = send_segments(client, pre.kv, pre.cache_ids, loaded.fingerprint, planner, deadline,
                             body.segments)
        reply = client.generate(sent.session_id, token_ids=pre.tail_ids, max_new_tokens=body.max_new_tokens)
    return AskResponse(
        answer=reply.text, profile="segments", session_id=sent.session_id, seq_len=pre.kv.seq_len,
        kept_tokens=pre.kv.seq_len, bytes_sent=sent.bytes_sent, ratio_vs_fp16=sent.bytes_sent / pre.kv.fp16_nbytes,
        prefill_s=pre.seconds, compress_s=0.0, transfer_s=sent.seconds,  # segments are encoded while they stream
        decode_s=reply.inject_seconds + reply.decode_seconds,
        segments=[SegmentInfo(start=r.start, end=r.end, profile=r.profile, bytes=r.bytes, planned_bps=r.estimate_bps,
                              budget_s=r.budget_s, reason=r.reason) for r in sent.segments])
