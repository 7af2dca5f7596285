"""The receiver's HTTP side: health, readiness, metrics, sessions and a dashboard.

The FastAPI lifespan starts the gRPC server (which loads the model in the background),
so one process serves both, and stops it on shutdown.
"""

from __future__ import annotations

import contextlib
import html
import time

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.settings import Settings
from common.auth import docs_options, protect_openapi, require_token
from receiver.dashboard import COOKIE, login_page, may_view, require_view
from receiver.dashboard import router as login_router
from receiver.server import start_server
from receiver.sessions import SessionError


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def create_app(settings: Settings, grpc_host: str = "127.0.0.1", grpc_port: int = 50051, model: str | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server, servicer, port = await start_server(grpc_host, grpc_port, model, settings, wait_loaded=False)
        app.state.servicer, app.state.grpc_port = servicer, port
        try:
            yield
        finally:
            await server.stop(grace=5)

    app = FastAPI(title="kvwire receiver", lifespan=lifespan, **docs_options(settings.token))
    protect_openapi(app)
    app.state.settings = settings
    authed = [Depends(require_token)]

    def servicer(request: Request):
        return request.app.state.servicer

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request):
        if servicer(request).loaded is None:
            raise HTTPException(503, "model still loading")
        return {"status": "ready", "model": servicer(request).loaded.name, "grpc_port": request.app.state.grpc_port}

    @app.get("/metrics", dependencies=authed)
    async def metrics(request: Request):
        s = servicer(request)
        s.sessions.expire()
        s.metrics.active_sessions.set(len(s.sessions))
        return PlainTextResponse(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def describe(session) -> dict:
        now = time.monotonic()
        return {"id": session.id, "profile": session.profile, "seq_len": session.kv.seq_len,
                "kept_tokens": [session.kv.kept_tokens(i) for i in range(session.kv.num_layers)],
                "bytes_received": session.bytes_received, "memory_bytes": session.kv.nbytes,
                "age_s": now - session.created, "idle_s": now - session.last_used}

    @app.get("/v1/sessions", dependencies=authed)
    async def list_sessions(request: Request):
        store = servicer(request).sessions
        store.expire()
        return {"sessions": [describe(s) for s in store.values()], "memory_bytes": store.nbytes,
                "budget_bytes": store.budget_bytes}

    @app.get("/v1/sessions/{session_id}", dependencies=authed)
    async def get_session(session_id: str, request: Request):
        try:
            return describe(servicer(request).sessions.peek(session_id))
        except SessionError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.delete("/v1/sessions/{session_id}", dependencies=authed, status_code=204)
    async def delete_session(session_id: str, request: Request):
        try:
            servicer(request).sessions.delete(session_id)
        except SessionError as exc:
            raise HTTPException(404, str(exc)) from None

    app.include_router(login_router)

    @app.get("/dashboard/sweep.png", dependencies=[Depends(require_view)])
    async def sweep_plot(request: Request):
        path = request.app.state.settings.sweep_dir / "rate_distortion.png"
        if not path.exists():
            raise HTTPException(404, f"no sweep plot at {path}; run kvwire sweep")
        return FileResponse(path)

    @app.get("/", response_class=HTMLResponse)
    async def dashboard(request: Request):
        """The token by header, or the cookie /login sets (a browser); else 401 with the login form."""
        if not may_view(request):
            return login_page("This receiver needs its token.", 401)
        s = servicer(request)
        rows = "".join(
            f"<tr><td>{time.strftime('%H:%M:%S', time.localtime(t['at']))}</td><td>{html.escape(t['profile'])}</td>"
            f"<td>{t['tokens']}</td><td>{t['bytes']:,}</td><td>{t['transfer_s']:.3f}</td>"
            f"<td>{_seconds(t['decode_s'])}</td>"
            f"<td>{html.escape(t['answer'] or '')}</td></tr>" for t in s.recent)
        sweep_plot = request.app.state.settings.sweep_dir / "rate_distortion.png"
        chart = ('<img src="/dashboard/sweep.png" style="max-width:100%">' if sweep_plot.exists()
                 else f"<p>No sweep yet: run <code>kvwire sweep --report-dir {html.escape(str(sweep_plot.parent))}</code>.</p>")
        model = s.loaded.name if s.loaded else "loading…"
        logout = ('<form method="post" action="/logout"><input type="submit" value="Log out"></form>'
                  if COOKIE in request.cookies else "")
        return f"""<!doctype html><html><head><meta charset="utf-8"><title>kvwire receiver</title>
<meta http-equiv="refresh" content="5"><style>body{{font-family:sans-serif;margin:2em;color:#222}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 8px}}
th{{background:#f0f0f0}}.stat{{display:inline-block;margin-right:2em;font-size:18px}}</style></head><body>
<h1>kvwire receiver</h1>
<div class="stat">model <b>{html.escape(model)}</b></div><div class="stat">sessions <b>{len(s.sessions)}</b></div>
<div class="stat">memory <b>{s.sessions.nbytes / 2**20:,.1f} MiB</b> of {s.sessions.budget_bytes / 2**20:,.0f}</div>
<h2>recent transfers</h2><table><tr><th>time</th><th>profile</th><th>tokens</th><th>bytes</th><th>transfer s</th>
<th>decode s</th><th>answer</th></tr>{rows}</table>
<h2>accuracy against bytes (latest sweep)</h2>{chart}{logout}</body></html>"""

    return app
