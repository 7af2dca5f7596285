"""Bearer tokens: one comparison for gRPC metadata and HTTP headers, and the FastAPI dependency both HTTP apps use."""

from __future__ import annotations

import hmac

from fastapi import Depends, FastAPI, HTTPException, Request


def token_matches(header: str | None, token: str) -> bool:
    return header is not None and hmac.compare_digest(header.encode(), f"Bearer {token}".encode())


def require_token(request: Request) -> None:
    """FastAPI dependency: 401 unless the app's configured token (if any) is presented."""
    token = request.app.state.settings.token
    if token and not token_matches(request.headers.get("authorization"), token):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def docs_options(token: str | None) -> dict:
    """FastAPI's documentation settings: open without a token. With one, the browsable pages are
    off (a browser's Swagger page cannot send the bearer token when it fetches the schema) and
    the schema moves behind the token (`protect_openapi`)."""
    return {"docs_url": None, "redoc_url": None, "openapi_url": None} if token else {}


def protect_openapi(app: FastAPI) -> None:
    """Serve /openapi.json behind the bearer token, when `docs_options` turned the open one off."""
    if app.openapi_url is None:
        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_token)])
        async def openapi():
            return app.openapi()
