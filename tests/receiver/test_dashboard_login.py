"""The dashboard in a browser: a login form takes the token and sets an HttpOnly cookie that opens
the dashboard's pages, and only those; without the token everything stays 401."""

import time

import pytest
from fastapi.testclient import TestClient

from channel.nodes import free_port
from common.settings import Settings
from receiver.dashboard import COOKIE
from receiver.http import create_app

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    settings = Settings(token=TOKEN, sweep_dir=tmp_path_factory.mktemp("sweep"))
    with TestClient(create_app(settings, "127.0.0.1", free_port(), "tiny-llama")) as client:
        for _ in range(600):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        yield client


def test_without_the_token_the_dashboard_is_401_with_a_login_form(http):
    page = http.get("/")
    assert page.status_code == 401
    assert '<form method="post" action="/login">' in page.text and 'type="password" name="token"' in page.text
    assert "recent transfers" not in page.text
    assert http.get("/dashboard/sweep.png").status_code == 401
    assert http.get("/login").status_code == 200


def test_a_wrong_token_sets_no_cookie(http):
    reply = http.post("/login", data={"token": "wrong"}, follow_redirects=False)
    assert reply.status_code == 401 and "Wrong token." in reply.text
    assert COOKIE not in reply.cookies and "set-cookie" not in reply.headers


def test_the_token_in_the_form_opens_the_dashboard_and_only_the_dashboard(tmp_path_factory):
    settings = Settings(token=TOKEN, sweep_dir=tmp_path_factory.mktemp("sweep"))
    app = create_app(settings, "127.0.0.1", free_port(), "tiny-llama")
    with TestClient(app) as browser:
        reply = browser.post("/login", data={"token": TOKEN}, follow_redirects=False)
        assert reply.status_code == 303 and reply.headers["location"] == "/"
        set_cookie = reply.headers["set-cookie"]
        assert set_cookie.startswith(f"{COOKIE}=") and "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie
        assert TOKEN not in set_cookie  # the cookie proves the token without holding it
        page = browser.get("/")  # the client sends the cookie back, as a browser does
        assert page.status_code == 200 and "recent transfers" in page.text
        assert '<form method="post" action="/logout">' in page.text
        # The API still wants the bearer header: a cookie the browser sends by itself deletes nothing.
        assert browser.get("/v1/sessions").status_code == 401
        assert browser.delete("/v1/sessions/x").status_code == 401
        assert browser.get("/metrics").status_code == 401
        # A forged cookie is not enough.
        browser.cookies.clear()
        browser.cookies.set(COOKIE, "0" * 64)
        assert browser.get("/").status_code == 401
        # Logging out clears it.
        browser.post("/login", data={"token": TOKEN})
        assert browser.get("/").status_code == 200
        browser.post("/logout")
        assert browser.get("/").status_code == 401
