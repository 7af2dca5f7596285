"""Bearer tokens: one comparison for gRPC metadata and HTTP headers, and the FastAPI dependency both HTTP apps use."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request


def token_matches(header: str | None, token: str) -> bool:
    return header is not None and hmac.compare_digest(header.encode(), f"Bearer {token}".encode())


def require_token(request: Request) -> None:
    """FastAPI dependency: 401 unless the app's configured token (if any) is presented."""
    token = request.app.state.settings.token
    if token and not token_matches(request.headers.get("authorization"), token):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
