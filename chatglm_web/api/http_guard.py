"""What every HTTP request meets before Gradio's routes and the API's: one ASGI middleware, ``HttpGuard``.

In order:

1. **Size.** A body over ``body_limit()`` bytes is answered 413 before it is read: a larger Content-Length at
   once, and a body without one (chunked) as soon as the bytes that arrived pass the limit.
2. **Login** (with ``--auth``). Every route needs the login, except those in ``needs_no_login()``: the login
   page and what it loads, the login form's POST, ``/healthz``, and the API (``/v1``, ``/metrics``), which
   checks its own credentials (Bearer key, or the login as HTTP Basic). Logged in means what Gradio itself
   means (``logged_in_user()``).
   The MCP routes (``--mcp``, ``/gradio_api/mcp``) need the API's credentials (``Credentials``) whenever there
   are any (``--api-key`` or ``--auth``), checked here; their tools run without calling back into Gradio's
   own routes (``api.mcp``).
3. **Uploads.** Requests that write files into Gradio's upload folder are refused (``refuses_upload()``):
   the page has no upload control.
4. **Failed logins** are throttled per client address (``LoginThrottle``): after ``MAX_FAILED_LOGINS``
   failures within ``LOGIN_WINDOW_SECONDS``, that client's next attempts get 429 with Retry-After until the
   oldest failure has left the window. The page's login form is counted here, HTTP Basic/Bearer on the API in
   ``openai_api`` with the same ``LoginThrottle``.

Refusals have the API's error shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import base64
import collections
import hmac
import math
import time

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

MIN_BODY_BYTES = 8 * 2**20  # 8 MiB: the smallest body limit
BODY_BYTES_PER_INPUT_CHAR = 16  # ... raised to this many bytes per character of --max-input-chars
MAX_FAILED_LOGINS = 10  # failed logins one client address may make within LOGIN_WINDOW_SECONDS
LOGIN_WINDOW_SECONDS = 60
MAX_TRACKED_CLIENTS = 10_000  # client addresses the throttle remembers at once (its memory bound)

# Routes that write files into Gradio's upload folder (POST). Reading files (``/gradio_api/file=``) and upload
# progress (``/gradio_api/upload_progress``) write nothing and stay as Gradio has them.
FILE_WRITE_ROUTES = frozenset({"/gradio_api/upload", "/gradio_api/process_recording", "/upload"})
# Reached before logging in (GET and HEAD), from a request trace of the login page in a browser: the page
# (Gradio answers it with the login form while nobody is logged in) with its JS/CSS and theme, the tab's icon,
# and the start-up call Gradio's launch() makes to itself (a no-op afterwards). /healthz is for load balancers.
PUBLIC_PAGES = frozenset({"/", "/theme.css", "/favicon.ico", "/gradio_api/startup-events", "/healthz"})
PUBLIC_PREFIXES = ("/assets/", "/static/")  # the front end's files, the same for everyone
LOGIN_FORM = "/login"  # POST: Gradio's login form
OWN_CREDENTIALS = ("/v1/", "/metrics")  # the API: Bearer key or the login as HTTP Basic (openai_api)
MCP_PREFIX = "/gradio_api/mcp"  # Gradio's MCP server (--mcp): the same credentials, checked by the guard


def body_limit(max_input_chars: int) -> int:
    """The largest request body taken, in bytes: 8 MiB, or 16 bytes per character of the input limit where that
    is more (a message at the limit written as JSON escapes of 6 bytes a character, with room for its history)."""
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_INPUT_CHAR * max_input_chars)


def route_path(scope) -> str:
    """The request's path without the app's root path and without a trailing slash (``/`` stays ``/``)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/") or "/"


def is_mcp(path: str) -> bool:
    return path == MCP_PREFIX or path.startswith(MCP_PREFIX + "/")


def needs_no_login(method: str, path: str) -> bool:
    """Whether a request may be made without the login (``path`` as ``route_path()`` gives it)."""
    if path == "/metrics" or path.startswith(OWN_CREDENTIALS[0]) or is_mcp(path):
        return True  # checked by the API itself, or by the guard's credentials check
    if method == "POST":
        return path == LOGIN_FORM
    return method in ("GET", "HEAD") and (path in PUBLIC_PAGES or path.startswith(PUBLIC_PREFIXES))


def refuses_upload(method: str, path: str, uploads_allowed: bool = False) -> bool:
    """Whether the request would write files into Gradio's upload folder and uploads are not allowed.

    The page has no upload control, so none are. A feature that takes files (documents, say) passes
    ``uploads_allowed=True`` to ``HttpGuard``; the body limit and Gradio's ``max_file_size`` still cap them."""
    return not uploads_allowed and method == "POST" and path in FILE_WRITE_ROUTES


def logged_in_user(app, cookies: dict) -> str | None:
    """Who is logged in, exactly as Gradio decides it (``get_current_user`` in ``gradio/routes.py``): the cookie
    ``access-token-<app.cookie_id>``, else ``access-token-unsecure-<app.cookie_id>``, looked up in
    ``app.tokens`` (filled by Gradio's ``/login``). Gradio has no public function for this; its App's
    ``cookie_id`` and ``tokens`` are plain attributes, and tests/test_login_hardening.py checks they still are."""
    token = cookies.get(f"access-token-{app.cookie_id}") or cookies.get(f"access-token-unsecure-{app.cookie_id}")
    return app.tokens.get(token)


def client_address(scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


class LoginThrottle:
    """Failed logins per client address, over a sliding window.

    After ``max_failures`` failures within ``window`` seconds a client is refused (``retry_after()`` says for how
    many seconds) until its oldest failure is older than the window. A success forgets the client's failures.
    Nothing is slowed down while a client is under the limit. At most ``MAX_TRACKED_CLIENTS`` addresses are
    remembered (the oldest are forgotten first). Used from the event loop only.
    """

    def __init__(self, max_failures: int = MAX_FAILED_LOGINS, window: float = LOGIN_WINDOW_SECONDS,
                 clock=time.monotonic):
        self.max_failures, self.window, self.clock = max_failures, window, clock
        self._failures: dict[str, collections.deque] = {}

    def _recent(self, client: str) -> collections.deque | None:
        failures = self._failures.get(client)
        if failures is not None:
            while failures and failures[0] <= self.clock() - self.window:
                failures.popleft()
            if not failures:
                del self._failures[client]
                return None
        return failures

    def retry_after(self, client: str) -> int | None:
        """Whole seconds until ``client`` may try again, or None when it may now."""
        failures = self._recent(client)
        if failures is None or len(failures) < self.max_failures:
            return None
        return max(1, math.ceil(failures[-self.max_failures] + self.window - self.clock()))

    def failed(self, client: str) -> None:
        failures = self._recent(client)
        if failures is None:
            if len(self._failures) >= MAX_TRACKED_CLIENTS:
                for other in list(self._failures):
                    self._recent(other)  # forgets those whose failures have all left the window
                while len(self._failures) >= MAX_TRACKED_CLIENTS:
                    del self._failures[next(iter(self._failures))]  # the longest remembered
            failures = self._failures[client] = collections.deque(maxlen=self.max_failures)
        failures.append(self.clock())

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


def error_response(status: int, message: str, *, kind: str, code: str, headers: dict | None = None) -> JSONResponse:
    """A refusal in the API's (OpenAI's) error shape."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status, headers=headers)


def failed_logins_message(wait: int) -> str:
    return f"Too many failed logins from your address: try again in {wait} s."


def too_many_failed_logins(wait: int) -> JSONResponse:
    return error_response(429, failed_logins_message(wait), kind="rate_limit_error", code="too_many_failed_logins",
                          headers={"Retry-After": str(wait)})


class Credentials:
    """What a request may carry instead of the page's login cookie: ``Authorization: Bearer <api key>`` (with
    ``--api-key``) or the login as HTTP Basic (with ``--auth``). Wrong credentials count as a failed login of the
    client in the shared ``LoginThrottle``; a client over its limit is refused before they are looked at."""

    def __init__(self, api_key: str | None = None, auth: tuple[str, str] | None = None,
                 throttle: LoginThrottle | None = None):
        self.api_key, self.auth, self.throttle = api_key, auth, throttle

    @property
    def any(self) -> bool:
        return bool(self.api_key or self.auth)

    def matches(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if self.api_key and scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                                                self.api_key.encode()):
            return True
        if self.auth and scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip()).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                user = password = ""
            return (hmac.compare_digest(user.encode(), self.auth[0].encode())
                    & hmac.compare_digest(password.encode(), self.auth[1].encode()))
        return False

    def problem(self, header: str, client: str, what: str = "This") -> dict | None:
        """None when ``header`` holds valid credentials (or none are needed); else the refusal as keywords of
        ``error_response`` (status, message, kind, code, headers): 429 for a client over its failed logins, 401."""
        if not self.any:
            return None
        if header and self.throttle is not None:
            wait = self.throttle.retry_after(client)
            if wait is not None:
                return {"status": 429, "message": failed_logins_message(wait), "kind": "rate_limit_error",
                        "code": "too_many_failed_logins", "headers": {"Retry-After": str(wait)}}
        if self.matches(header):
            if self.throttle is not None:
                self.throttle.succeeded(client)
            return None
        if header and self.throttle is not None:
            self.throttle.failed(client)
        return {"status": 401, "message": f"{what} needs {self.wanted}.", "kind": "invalid_request_error",
                "code": "invalid_api_key", "headers": None}

    def refusal(self, header: str, client: str, what: str = "This") -> JSONResponse | None:
        """``problem()`` as the response to answer."""
        problem = self.problem(header, client, what)
        return None if problem is None else error_response(**problem)

    @property
    def wanted(self) -> str:
        return "an 'Authorization: Bearer <api key>' header" if self.api_key else "the page's login as HTTP Basic auth"


class _BodyTooLarge(Exception):
    """Raised into the app by ``receive`` when the body passes the limit; the guard answers 413 instead."""


class HttpGuard:
    """The ASGI middleware (see the module's docstring). ``throttle`` is shared with the API's credential check."""

    def __init__(self, app, *, max_body_bytes: int, login_required: bool = False,
                 throttle: LoginThrottle | None = None, uploads_allowed: bool = False,
                 credentials: Credentials | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.login_required = login_required
        self.throttle = throttle
        self.uploads_allowed = uploads_allowed
        self.credentials = credentials or Credentials(throttle=throttle)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and self.login_required and not self._logged_in(scope):
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], route_path(scope)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._too_large(scope, receive, send, f"{declared:,} bytes")
            return
        if is_mcp(path):
            refusal = self.credentials.refusal(HTTPConnection(scope).headers.get("authorization", ""),
                                               client_address(scope), "The MCP server")
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        elif self.login_required and not needs_no_login(method, path) and not self._logged_in(scope):
            await error_response(401, "Not logged in: this server needs its login (open the page and log in).",
                                 kind="authentication_error", code="login_required")(scope, receive, send)
            return
        if refuses_upload(method, path, self.uploads_allowed):
            await error_response(403, "File uploads are not accepted here: this app has no upload feature.",
                                 kind="permission_error", code="uploads_disabled")(scope, receive, send)
            return
        if method == "POST" and path == LOGIN_FORM and self.throttle is not None:
            await self._login(scope, receive, send)
            return
        await self._forward(scope, receive, send)

    def _logged_in(self, scope) -> bool:
        return logged_in_user(scope["app"], HTTPConnection(scope).cookies) is not None

    async def _login(self, scope, receive, send):
        """Gradio's login form, throttled: 200 is a success, 400 (wrong user or password) a failure."""
        client = client_address(scope)
        wait = self.throttle.retry_after(client)
        if wait is not None:
            await too_many_failed_logins(wait)(scope, receive, send)
            return
        status = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self._forward(scope, receive, watch)
        if status.get("code") == 200:
            self.throttle.succeeded(client)
        elif status.get("code") in (400, 401):
            self.throttle.failed(client)

    async def _forward(self, scope, receive, send):
        """The request to the app, its body counted as it is read: past the limit the app's reading fails, and
        whatever the app would answer is replaced by 413 (unless its answer had begun: then it is cut off)."""
        state = {"received": 0, "too_large": False, "started": False}

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body_bytes:
                    state["too_large"] = True
                    if state["started"]:
                        return {"type": "http.disconnect"}
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            if state["too_large"]:
                return  # the app's own answer to a request it could not read: the 413 goes out instead
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["too_large"]:
                raise
        if state["too_large"] and not state["started"]:
            await self._too_large(scope, receive, send, f"more than {self.max_body_bytes:,} bytes")

    async def _too_large(self, scope, receive, send, size: str):
        message = (f"The request body is too large: {size}; the limit is {self.max_body_bytes:,} bytes "
                   f"({self.max_body_bytes / 2**20:.0f} MiB).")
        response = error_response(413, message, kind="invalid_request_error", code="request_too_large",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
