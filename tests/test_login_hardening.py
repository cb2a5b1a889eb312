"""Issue 17, the page part: uploads, the login and failed logins, against the real app on loopback (a generated
tiny checkpoint), with plain httpx as any client or attacker has it, and gradio_client as a user's script."""

from __future__ import annotations

import base64
import json
import re
import uuid

import httpx
import pytest
from gradio_client import Client

from chatglm_web.api.http_guard import (LOGIN_WINDOW_SECONDS, MAX_FAILED_LOGINS, MAX_TRACKED_CLIENTS, LoginThrottle,
                                    logged_in_user)
from server_harness import gradio_temp_dir, raw_exchange, running_server

USER, PASSWORD = "alice", "s3cret-pass"


@pytest.fixture(scope="module")
def upload_dir(tmp_path_factory):
    """A fresh GRADIO_TEMP_DIR (Gradio's upload folder) for this module's servers."""
    with gradio_temp_dir(tmp_path_factory.mktemp("gradio-uploads")) as path:
        yield path


@pytest.fixture(scope="module")
def open_server(chatglm3_checkpoint, upload_dir):
    with running_server(model=str(chatglm3_checkpoint)) as srv:
        yield srv


@pytest.fixture(scope="module")
def server(chatglm3_checkpoint, upload_dir):
    with running_server(model=str(chatglm3_checkpoint), auth=f"{USER}:{PASSWORD}") as srv:
        yield srv


def login(url: str, password: str = PASSWORD) -> httpx.Response:
    return httpx.post(url + "login", data={"username": USER, "password": password})


def logged_in(url: str) -> httpx.Client:
    """An httpx client holding the login cookie, as the browser does after the login form."""
    response = login(url)
    assert response.status_code == 200, response.text
    return httpx.Client(base_url=url, cookies=response.cookies, timeout=60)


def files_in(path) -> list:
    return [p for p in path.rglob("*") if p.is_file()]


# -- row 5: uploads ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["gradio_api/upload", "gradio_api/upload/", "gradio_api/process_recording"])
def test_uploads_are_refused_and_nothing_is_written(open_server, upload_dir, path):
    before = files_in(upload_dir)
    files = [("files", (f"f{i}.bin", b"\0" * 4096)) for i in range(3)]
    response = httpx.post(open_server.url + path, files=files, follow_redirects=True)
    assert response.status_code == 403, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "uploads_disabled" and "upload" in error["message"]
    assert files_in(upload_dir) == before


def test_300_files_of_1_mb_in_one_request_are_refused_unread(open_server):
    """The issue's attack: 300 MB declared; the answer comes before any of it is sent."""
    port = int(open_server.url.rstrip("/").rsplit(":", 1)[1])
    head = (f"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {300 << 20}\r\n\r\n").encode()
    status, _, body = raw_exchange(port, head, timeout=20)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"


def test_file_reading_routes_stay_gradios(open_server):
    """Only writes are blocked: upload progress and file= answer as Gradio does (no such upload, no such file)."""
    progress = httpx.get(open_server.url + "gradio_api/upload_progress", params={"upload_id": "none"}, timeout=30)
    assert progress.status_code == 404 and "Upload not found" in progress.text
    missing = httpx.get(open_server.url + "gradio_api/file=/no/such/file.txt")
    assert missing.status_code in (403, 404) and "uploads_disabled" not in missing.text


# -- row 6: everything needs the login ---------------------------------------------------------------------------

SESSION = uuid.uuid4().hex[:11]
# (method, path, JSON body): routes a visitor without the login reached before (heartbeat and cancel answered,
# and closing a heartbeat runs that session's unload), and Gradio's other routes
GUARDED = [
    ("GET", f"gradio_api/heartbeat/{SESSION}", None),
    ("POST", "gradio_api/cancel", {"session_hash": SESSION, "fn_index": 0, "event_id": "none"}),
    ("POST", "gradio_api/reset", {"event_id": "none"}),
    ("POST", "gradio_api/stream/none", {"data": [], "fn_index": 0, "session_hash": SESSION}),
    ("POST", "gradio_api/stream/none/close", None),
    ("GET", "gradio_api/app_id", None),
    ("GET", "gradio_api/token", None),
    ("POST", "gradio_api/queue/join", {"data": ["hi"], "fn_index": 0, "session_hash": SESSION}),
    ("GET", f"gradio_api/queue/data?session_hash={SESSION}", None),
    ("POST", "gradio_api/run/predict", {"data": [], "fn_index": 0, "session_hash": SESSION}),
    ("POST", "gradio_api/call/chat", {"data": ["hi"]}),
    ("GET", "gradio_api/info", None),
    ("GET", "config", None),
    ("GET", "manifest.json", None),
    ("GET", "gradio_api/upload_progress?upload_id=x", None),
    ("POST", "gradio_api/upload", None),
]


def request(http, method: str, path: str, body) -> int:
    """The status of one request (a streaming answer, like the heartbeat's, is closed after its headers)."""
    with http.stream(method, path, json=body, timeout=30) as response:
        if response.status_code == 401:
            response.read()
            assert response.json()["error"]["code"] == "login_required", response.text
        return response.status_code


@pytest.mark.parametrize("method, path, body", GUARDED, ids=[f"{m} {p.split('?')[0]}" for m, p, _ in GUARDED])
def test_every_route_needs_the_login(server, method, path, body):
    with httpx.Client(base_url=server.url) as anonymous:
        assert request(anonymous, method, path, body) == 401
    with logged_in(server.url) as user:
        assert request(user, method, path, body) != 401


def test_the_login_page_renders_without_the_login(server):
    """What the login page loads in a browser (a request trace): the page, its JS/CSS, the theme."""
    page = httpx.get(server.url)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assets = set(re.findall(r'(?:src|href)="[./]*((?:assets|static)/[^"]+)"', page.text))
    assert assets, page.text[:500]
    for asset in sorted(assets) + ["theme.css", "favicon.ico"]:
        assert httpx.get(server.url + asset).status_code == 200, asset
    assert httpx.get(server.url + "healthz").status_code == 200  # for load balancers


def test_gradio_client_with_the_login_chats(server):
    client = Client(server.url, auth=(USER, PASSWORD), verbose=False)
    reply, stats = client.predict("hi", "", 0.8, 0.8, 4, 0, 1.0, 1, "Chat", api_name="/chat")
    assert "reply 4 tokens" in stats or "4 tokens" in stats, stats


def test_the_guard_reads_gradios_own_login_state(server):
    """HttpGuard decides 'logged in' from Gradio's App.cookie_id and App.tokens (no public API for it): they
    must still be what Gradio's /login writes, or the guard would lock everybody out (or nobody)."""
    app = server.page.app
    response = login(server.url)
    token = response.cookies[f"access-token-{app.cookie_id}"]
    assert response.cookies[f"access-token-unsecure-{app.cookie_id}"] == token
    assert app.tokens[token] == USER
    assert logged_in_user(app, {f"access-token-unsecure-{app.cookie_id}": token}) == USER
    assert logged_in_user(app, {f"access-token-{app.cookie_id}": "forged"}) is None
    assert logged_in_user(app, {}) is None


# -- row 6: failed logins ----------------------------------------------------------------------------------------

def test_failed_logins_are_throttled_on_the_page_and_the_api_together(chatglm3_checkpoint):
    """MAX_FAILED_LOGINS failures from one address, half on the login form and half as HTTP Basic on the API:
    every further attempt is 429 with Retry-After, the right password too; before that, a success is instant
    and forgets the failures."""
    with running_server(model=str(chatglm3_checkpoint), auth=f"{USER}:{PASSWORD}") as srv:
        wrong_basic = {"Authorization": "Basic " + base64.b64encode(f"{USER}:wrong".encode()).decode()}
        for _ in range(MAX_FAILED_LOGINS - 1):
            assert login(srv.url, "wrong").status_code == 400
        allowed = login(srv.url)  # under the limit: let in, not throttled, and the count starts again
        assert allowed.status_code == 200 and "retry-after" not in allowed.headers
        for i in range(MAX_FAILED_LOGINS):
            if i % 2:
                assert login(srv.url, "wrong").status_code == 400
            else:
                assert httpx.get(srv.url + "v1/models", headers=wrong_basic).status_code == 401
        refusals = [login(srv.url, "wrong"), login(srv.url),
                    httpx.get(srv.url + "v1/models", auth=(USER, PASSWORD)),
                    httpx.get(srv.url + "v1/models", headers=wrong_basic)]
        for response in refusals:
            assert response.status_code == 429, response.text
            assert 0 < int(response.headers["Retry-After"]) <= LOGIN_WINDOW_SECONDS
            assert "try again" in response.json()["error"]["message"]
        assert httpx.get(srv.url + "healthz").status_code == 200


def test_the_throttle_lets_a_client_try_again_once_the_window_has_passed():
    now = [1000.0]
    throttle = LoginThrottle(clock=lambda: now[0])
    for _ in range(MAX_FAILED_LOGINS):
        assert throttle.retry_after("1.2.3.4") is None
        throttle.failed("1.2.3.4")
        now[0] += 1
    assert throttle.retry_after("1.2.3.4") == LOGIN_WINDOW_SECONDS - MAX_FAILED_LOGINS
    assert throttle.retry_after("5.6.7.8") is None  # per client
    now[0] += LOGIN_WINDOW_SECONDS - MAX_FAILED_LOGINS  # the first failure leaves the window
    assert throttle.retry_after("1.2.3.4") is None
    throttle.failed("1.2.3.4")
    assert throttle.retry_after("1.2.3.4") == 1  # the second failure leaves the window in 1 s
    throttle.succeeded("1.2.3.4")
    assert throttle.retry_after("1.2.3.4") is None


def test_the_throttle_remembers_a_bounded_number_of_clients():
    throttle = LoginThrottle()
    for i in range(MAX_TRACKED_CLIENTS + 50):
        throttle.failed(f"client-{i}")
    assert len(throttle._failures) <= MAX_TRACKED_CLIENTS
