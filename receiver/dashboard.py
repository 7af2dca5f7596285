"""The dashboard's browser login: a form that takes the bearer token and sets an HttpOnly cookie.

A browser cannot add an `Authorization` header to a page it navigates to, so with a token set the
dashboard would be closed to people. `GET /login` serves a form; `POST /login` checks the token and
sets a cookie holding an HMAC of it (never the token itself), which opens only the dashboard's
pages (`/` and its chart): the API (`/v1/...`, `/metrics`) still takes the bearer header alone, so
a cookie a browser sends on its own cannot delete sessions. Without either, `/` answers 401 with
the form.
"""

from __future__ import annotations

import hashlib
import hmac
import html
from urllib.parse import parse_qs

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from common.auth import token_matches

COOKIE = "kvwire_dashboard"
MAX_FORM_BYTES = 4096

router = APIRouter(include_in_schema=False)


def cookie_value(token: str) -> str:
    """What the cookie holds: proof of the token that does not reveal it."""
    return hmac.new(token.encode(), b"kvwire dashboard", hashlib.sha256).hexdigest()


def may_view(request: Request) -> bool:
    """True without a configured token, or with the bearer header, or with the login cookie."""
    token = request.app.state.settings.token
    if not token or token_matches(request.headers.get("authorization"), token):
        return True
    cookie = request.cookies.get(COOKIE)
    return cookie is not None and hmac.compare_digest(cookie.encode(), cookie_value(token).encode())


def require_view(request: Request) -> None:
    """FastAPI dependency for the dashboard's other resources (its chart)."""
    if not may_view(request):
        raise HTTPException(401, "missing or wrong bearer token; log in at /login",
                            headers={"WWW-Authenticate": "Bearer"})


def login_page(message: str = "", status_code: int = 200) -> HTMLResponse:
    note = f'<p style="color:#b00">{html.escape(message)}</p>' if message else ""
    return HTMLResponse(f"""<!doctype html><html><head><meta charset="utf-8"><title>kvwire receiver: log in</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}input{{font-size:15px;padding:4px}}</style></head><body>
<h1>kvwire receiver</h1>{note}
<form method="post" action="/login"><label>Token (KVWIRE_TOKEN)
<input type="password" name="token" autocomplete="current-password" autofocus></label>
<input type="submit" value="Open the dashboard"></form></body></html>""", status_code=status_code)


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request):
    if not request.app.state.settings.token:
        return RedirectResponse("/", status_code=303)
    return login_page()


@router.post("/login")
async def login(request: Request):
    token = request.app.state.settings.token
    if not token:
        return RedirectResponse("/", status_code=303)
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return login_page("The form is too large.", 413)
    given = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0]
    if not token_matches(f"Bearer {given}", token):
        return login_page("Wrong token.", 401)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(COOKIE, cookie_value(token), httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
async def logout():
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response
