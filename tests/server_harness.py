"""Start the real app (same wiring as ``app.py``) in-process on a free loopback port."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from chatglm_web.server import build_app
from chatglm_web.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    backend: object
    page: object

    @property
    def engine(self):
        return self.backend.engine


@contextmanager
def gradio_temp_dir(path):
    """GRADIO_TEMP_DIR (Gradio's upload and cache folder, read when an app is built) set to ``path`` while inside."""
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous


@contextmanager
def running_server(**settings):
    # the engine in this process (tests look at its counters and patch it); app_process() and
    # tests/test_engine_process.py run the engine in its own process, as app.py does by default
    settings = Settings(**{"precision": "fp32", "device": "cpu", "port": free_port(), "engine_process": False,
                           **settings})
    settings.model_explicit = True
    page, backend, launch_kwargs = build_app(settings)
    page.launch(server_name="127.0.0.1", server_port=settings.port, prevent_thread_lock=True, quiet=True,
                auth=settings.auth_pair, **launch_kwargs)  # the login as main() sets it
    try:
        yield RunningServer(f"http://127.0.0.1:{settings.port}/", backend, page)
    finally:
        page.close()
        backend.shutdown()  # the local engine, or nothing for a remote backend



@contextmanager
def app_process(args: list, *, cwd, env: dict, ready: str = "Running on local URL", timeout: float = 240):
    """``python <args>`` as its own process (the app as users start it), yielded once it printed ``ready``;
    terminated (killed if need be) afterwards with every process it started (an engine process, ZeroGPU's
    forked workers): its own process group. Its output lines (stdout and stderr) are in ``proc.log``, which
    keeps growing while it runs."""
    import sys

    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: queue.SimpleQueue = queue.SimpleQueue()
    proc.log = []

    def read():
        for line in proc.stdout:
            proc.log.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        while not any(ready in line for line in proc.log):
            line = lines.get(timeout=timeout)
            assert line is not None, "the app exited:\n" + "".join(proc.log[-40:])
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it started and left behind
        except ProcessLookupError:
            pass


def raw_exchange(port: int, head: bytes, chunks=(), timeout: float = 30, timing: dict | None = None):
    """Send ``head`` and then ``chunks`` over a plain socket while a second thread reads; stop sending once the
    server has answered (or closed). Returns (status, headers, body) of its answer; ``timing`` gets the
    ``time.monotonic()`` when everything was sent ("sent") and when the answer began to arrive ("answered")."""
    timing = {} if timing is None else timing
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        box = {"data": b""}

        def read():
            try:
                while b"\r\n\r\n" not in box["data"] or len(box["data"].partition(b"\r\n\r\n")[2]) < length():
                    part = sock.recv(65536)
                    if not part:
                        break
                    timing.setdefault("answered", time.monotonic())
                    box["data"] += part
            except OSError as error:
                box["error"] = error

        def length() -> int:
            head_part = box["data"].partition(b"\r\n\r\n")[0].decode("latin-1").lower()
            for line in head_part.split("\r\n"):
                if line.startswith("content-length:"):
                    return int(line.split(":", 1)[1])
            return 0

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        sock.sendall(head)
        for chunk in chunks:
            if not reader.is_alive() or box["data"]:
                break  # the server has answered (or closed): it does not want the rest
            try:
                sock.sendall(chunk)
            except OSError:  # closed by the server mid-body
                break
        timing["sent"] = time.monotonic()
        reader.join(timeout)
        data = box["data"]
        assert b"\r\n\r\n" in data, f"no answer within {timeout} s: {box.get('error')!r} {data[:200]!r}"
    header_bytes, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = header_bytes.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


# -- Gradio's HTTP API, as any client (or attacker) reaches it -----------------------------------------------------


def chat_args(message, *, system="", temperature=0.8, top_p=0.8, max_new_tokens=24, top_k=0,
              repetition_penalty=1.0, seed=-1, mode="Chat") -> list:
    """The ``/chat`` endpoint's arguments, in its order."""
    return [message, system, temperature, top_p, max_new_tokens, top_k, repetition_penalty, seed, mode]


WAITING_MARK = "\u23f3"  # the page's "waiting for a free slot" line starts with it


@dataclass
class ChatResult:
    """What one ``/chat`` call over HTTP came back with."""

    status: int = 0  # HTTP status of the submit (200: accepted into Gradio's queue)
    event: str | None = None  # last server-sent event: "complete" | "error"; None if refused or left early
    reply: str | None = None  # the reply text of the last update that had one
    stats: str | None = None  # the statistics line of the last update
    error: str | None = None  # the message of an error event, or the detail of an HTTP refusal
    updates: list = field(default_factory=list)  # (reply text or None, statistics line) of every streamed update
    disconnected: bool = False  # the client left mid-stream (``leave_when``)

    @property
    def replies(self) -> list[str]:
        """The streamed reply texts (updates that only say "waiting for a slot" are left out)."""
        return [r for r, _ in self.updates if r and not r.startswith(WAITING_MARK)]

    @property
    def waiting_lines(self) -> list[str]:
        """The "waiting for a free slot" lines the client was shown (in the reply or the statistics line)."""
        return [t for update in self.updates for t in update if isinstance(t, str) and t.startswith(WAITING_MARK)]

    @property
    def waited(self) -> bool:
        return bool(self.waiting_lines)

    @property
    def message(self) -> str:
        """The error or refusal message ('' when there was none)."""
        return self.error or ""


def post_json(http, path: str, body):
    """POST ``body`` as JSON exactly as given: NaN stays NaN and a lone surrogate travels as its escape."""
    return http.post(path, content=json.dumps(body).encode("ascii"), headers={"content-type": "application/json"})


def sse_events(lines):
    """The (event name, JSON payload) of each ``data:`` line of a server-sent event stream; the event name is the
    last ``event:`` line before it (None when the stream names none, as Gradio's queue stream)."""
    event = None
    for line in lines:
        if line.startswith("event:"):
            event = line[len("event:"):].strip()
        elif line.startswith("data:"):
            yield event, json.loads(line[len("data:"):])


def requests_ended(server, reason: str) -> int:
    """How many requests the app's metrics (the body of ``GET /metrics``) count as ended for ``reason``: stop,
    length, cancelled (the client went away mid-reply), error or rejected."""
    from prometheus_client.parser import text_string_to_metric_families

    text = server.backend.metrics.exposition().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "chatglm_web_requests_finished_total" and sample.labels.get("reason") == reason:
                return int(sample.value)
    raise AssertionError(f"the metrics count no requests ended for {reason!r}")


def chat_over_http(http, data: list, *, session_hash: str | None = None, leave_when=None,
                   on_accepted=None) -> ChatResult:
    """One ``/chat`` call through ``/gradio_api/call/chat`` with plain httpx, its stream read to the end.

    ``leave_when(result)`` is asked after every streamed update and heartbeat; when it says True the
    connection is closed there (a client that goes away mid-reply). ``on_accepted(result)`` is called
    once the first update or the final event arrives (the request was answered, queued or started).
    """
    body = {"data": data}
    if session_hash:
        body["session_hash"] = session_hash
    result = ChatResult()
    response = post_json(http, "gradio_api/call/chat", body)
    result.status = response.status_code
    if response.status_code != 200:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = None
        result.error = str(detail if detail is not None else response.text)
        if on_accepted:
            on_accepted(result)
        return result
    event_id = response.json()["event_id"]
    with http.stream("GET", f"gradio_api/call/chat/{event_id}") as stream:
        for event, payload in sse_events(stream.iter_lines()):
            if event == "heartbeat":
                pass
            elif event == "error":
                result.event = "error"
                result.error = _error_text(payload)
            elif isinstance(payload, list) and payload:
                reply = payload[0] if isinstance(payload[0], str) else None  # [] or None: no chat text
                stats = payload[-1] if len(payload) > 1 and isinstance(payload[-1], str) else None
                result.updates.append((reply, stats))
                result.reply = reply if reply is not None else result.reply
                result.stats = stats if stats is not None else result.stats
                if event == "complete":
                    result.event = "complete"
            if on_accepted and (result.updates or result.event):
                on_accepted(result)
                on_accepted = None
            if result.event:
                break
            if leave_when is not None and leave_when(result):
                result.disconnected = True
                break  # leaving the with-block closes the connection
    return result


def _error_text(payload) -> str | None:
    if isinstance(payload, dict):
        message = payload.get("error")
        return None if message is None else str(message)
    return None if payload is None else str(payload)


def run_fn(http, fn_index: int, data: list, session_hash: str):
    """Call one of the page's unqueued event handlers by index, as the browser does (``/gradio_api/run/predict``)."""
    return post_json(http, "gradio_api/run/predict", {"data": data, "fn_index": fn_index, "session_hash": session_hash})


def dir_bytes(path, contains: str | None = None) -> int:
    """Bytes in the files under ``path`` (only files whose text contains ``contains``, when given)."""
    total = 0
    root = Path(path)
    if not root.exists():
        return 0
    for file in root.rglob("*"):
        try:
            if not file.is_file():
                continue
            if contains is not None and contains.encode() not in file.read_bytes():
                continue
            total += file.stat().st_size
        except OSError:  # removed meanwhile (another server's cache cleanup)
            continue
    return total


# -- the page's own event handlers, called as the browser calls them ---------------------------------------------

def page_config(http) -> dict:
    return http.get("config").json()


def run_queued(http, fn_index: int, data: list, session_hash: str) -> list[dict]:
    """Run a queued handler of the page as the browser does: join the queue, read the session's event stream
    until the event completes. Returns the stream's messages; the last is ``process_completed``."""
    joined = http.post("gradio_api/queue/join", json={"data": data, "fn_index": fn_index,
                                                       "session_hash": session_hash, "event_data": None})
    assert joined.status_code == 200, joined.text
    event_id, seen = joined.json()["event_id"], []
    with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
        for _, message in sse_events(stream.iter_lines()):
            if message.get("event_id") != event_id:
                continue
            seen.append(message)
            if message.get("msg") == "process_completed":
                return seen
    raise AssertionError(f"the event stream ended before the event completed: {seen}")


def _followers(config: dict, parent_id: int) -> list[int]:
    return [i for i, dep in enumerate(config["dependencies"]) if dep["trigger_after"] == parent_id]


def page_turn_handlers(config: dict) -> dict[str, int]:
    """The page's handlers of a turn started with Enter in the message box: begin (no queue: checks the
    message, outputs the plan), show (no queue: the message in the tree and the chat, Stop), respond (queued:
    the reply), finish (no queue: Send back); between them the steps that store the conversation."""
    [textbox] = [c["id"] for c in config["components"] if c["props"].get("elem_id") == "chat-input"]
    [begin] = [i for i, dep in enumerate(config["dependencies"])
               if [textbox, "submit"] in dep["targets"] and dep.get("backend_fn")]
    chain, index = [begin], begin
    while True:   # the steps that follow when begin succeeded, in order (a refusal's failure step left out)
        found = [i for i in _followers(config, config["dependencies"][index]["id"])
                 if not config["dependencies"][i]["trigger_only_on_failure"]]
        if not found:
            break
        assert len(found) == 1, f"{len(found)} steps after step {index}"
        index = found[0]
        chain.append(index)
    backend = [i for i in chain if config["dependencies"][i]["backend_fn"]]
    [respond] = [i for i in backend if config["dependencies"][i].get("queue") is not False]
    return {"begin": begin, "show": backend[1], "respond": respond, "finish": backend[backend.index(respond) + 1]}


# -- the page as a browser drives it -------------------------------------------------------------------------------

#: localStorage / sessionStorage keys of ``chatglm_web/page/store.js``
CONVERSATION_PREFIX, META_PREFIX, TAB_KEY = "chatglm-web:conversation:", "chatglm-web:meta:", "chatglm-web:tab"


def _value(output):
    """What an output of a handler sets: an update's value (``NOTHING`` when it leaves the value as it is)."""
    if isinstance(output, dict) and output.get("__type__") == "update":
        return output.get("value", NOTHING)
    return output


NOTHING = object()


@dataclass
class Step:
    index: int            # the dependency's index in the page's config (its fn_index)
    ok: bool              # whether it succeeded (a refusal is an error the page's failure step explains)
    data: list | None     # its outputs, as the browser got them (None for a front-end step)
    response: object = None   # the HTTP response (unqueued) or the event stream's messages (queued)
    updates: list = field(default_factory=list)   # a queued step's streamed outputs, each in full


class PageClient:
    """One browser tab on the page, over Gradio's HTTP API: every handler is called as the front end calls it,
    with the values the page shows, and the part of ``store.js`` (``localStorage`` and this tab's
    ``sessionStorage`` entry, read before a step and written after one) played by two plain dicts. The
    server reads them exactly as it reads a browser's, so a test can also put anything there."""

    def __init__(self, http, session_hash: str | None = None, *, config: dict | None = None,
                 local: dict | None = None, wide: bool = True):
        import uuid

        from chatglm_web.page.conversation_list import APPLY_JS

        self.http = http
        self.session = session_hash or uuid.uuid4().hex
        self.config = config if config is not None else page_config(http)
        self.components = {c["id"]: c for c in self.config["components"]}
        self.dependencies = self.config["dependencies"]
        self.local: dict[str, str] = local if local is not None else {}   # localStorage, shared by a browser's tabs
        self.tab: str | None = None                                        # sessionStorage chatglm-web:tab
        self.wide = wide
        self.values: dict[int, object] = {}   # what the page shows now, where a handler or the visitor set it
        self.props: dict[int, dict] = {}      # the other properties handlers set (a list's choices, visible ...)
        self.apply_js = APPLY_JS
        [self.store_ops] = {dep["inputs"][0] for dep in self.dependencies if dep.get("js") == APPLY_JS}

    # -- the page's parts --
    def element(self, elem_id: str) -> int:
        [found] = [i for i, c in self.components.items() if c["props"].get("elem_id") == elem_id]
        return found

    def handler(self, elem_id: str, event: str) -> int:
        target = self.element(elem_id)
        [found] = [i for i, dep in enumerate(self.dependencies) if [target, event] in dep["targets"]
                   and dep["backend_fn"]]
        return found

    def load_handler(self) -> int:
        [found] = [i for i, dep in enumerate(self.dependencies) if "chatglmStore.snapshot()" in (dep.get("js") or "")]
        return found

    def set(self, elem_id: str, value) -> PageClient:
        """The visitor typed or chose ``value`` in the component ``elem_id``."""
        self.values[self.element(elem_id)] = value
        return self

    def shown(self, elem_id: str):
        component = self.element(elem_id)
        return self.values.get(component, self.components[component]["props"].get("value"))

    # -- store.js --
    def metas(self) -> list:
        ids = [key[len(META_PREFIX):] for key in self.local if key.startswith(META_PREFIX)]
        return [[i, self.local.get(META_PREFIX + i), len(self.local.get(CONVERSATION_PREFIX + i) or "")
                 + len(self.local.get(META_PREFIX + i) or "")] for i in ids]

    def stored(self, conversation_id: str | None = None) -> str | None:
        """The sealed entry of a conversation (this tab's by default), as localStorage holds it."""
        conversation_id = conversation_id if conversation_id is not None else self.tab
        return self.local.get(CONVERSATION_PREFIX + conversation_id) if conversation_id else None

    def snapshot(self, share: str | None = None) -> dict:
        return {"data": self.stored(), "metas": self.metas(), "tab": self.tab, "share": share, "wide": self.wide}

    def current(self) -> dict:
        return {"data": self.stored(), "metas": self.metas()}

    def apply(self, ops) -> None:
        if not isinstance(ops, dict):
            return
        for conversation_id in ops.get("remove") or []:
            self.local.pop(CONVERSATION_PREFIX + conversation_id, None)
            self.local.pop(META_PREFIX + conversation_id, None)
        for conversation_id, data, meta in ops.get("put") or []:
            self.local[CONVERSATION_PREFIX + conversation_id] = data
            self.local[META_PREFIX + conversation_id] = meta
        if ops.get("tab"):
            self.tab = ops["tab"]

    # -- running the page's steps --
    def _input(self, component: int, dep: dict, given: dict):
        if component in given:
            return given[component]
        js = dep.get("js") or ""
        if dep["inputs"] and component == dep["inputs"][0] and "chatglmStore.current()" in js:
            return self.current()
        if self.components[component]["type"] == "state":
            return None   # the server keeps the session's own
        return self.values.get(component, self.components[component]["props"].get("value"))

    def _take(self, dep: dict, data: list) -> None:
        for component, output in zip(dep["outputs"], data or []):
            value = _value(output)
            if value is not NOTHING and self.components[component]["type"] != "state":
                self.values[component] = value
            if isinstance(output, dict) and output.get("__type__") == "update":
                self.props.setdefault(component, {}).update(
                    {k: v for k, v in output.items() if k not in ("__type__", "value")})

    def prop(self, elem_id: str, name: str):
        """A property of the component ``elem_id`` as the page shows it now (a handler's last word on it)."""
        component = self.element(elem_id)
        return self.props.get(component, {}).get(name, self.components[component]["props"].get(name))

    def listed(self) -> list[tuple[str, str]]:
        """The conversation list: (title, conversation id) of each entry shown."""
        return [tuple(choice) for choice in self.prop("conversation-list", "choices") or []]

    def _streamed(self, dep: dict, messages: list[dict]) -> list[list]:
        """The outputs of every streamed update, in full (after the first, Gradio sends each as a diff), each
        taken as the page takes it."""
        from gradio_client.utils import apply_diff

        updates, last = [], None
        for message in messages:
            if message.get("msg") != "process_generating" or not message.get("success", True):
                continue
            data = message["output"]["data"]
            last = data if last is None else [apply_diff(old, diff) for old, diff in zip(last, data)]
            updates.append(last)
            self._take(dep, last)
        return updates

    def run(self, index: int, given: dict | None = None, *, followers: bool = True) -> list[Step]:
        """Trigger the dependency ``index`` as the front end does, then (``followers``) every step chained after
        it, in order; ``given``: input values by component id (otherwise what the page shows). The steps run."""
        steps: list[Step] = []
        given = given or {}

        def step(i: int) -> None:
            dep = self.dependencies[i]
            if not dep["backend_fn"]:   # a front-end step: the ones that matter here hand ops to store.js
                if dep.get("js") == self.apply_js:
                    self.apply(self.values.get(self.store_ops))
                steps.append(Step(i, True, None))
                ok = True
            else:
                data = [self._input(c, dep, given) for c in dep["inputs"]]
                if dep.get("queue") is False:
                    response = run_fn(self.http, i, data, self.session)
                    body = response.json() if response.headers.get("content-type", "").startswith(
                        "application/json") else {}
                    ok = response.status_code == 200 and "error" not in body
                    out = body.get("data") if ok else None
                else:
                    response = run_queued(self.http, i, data, self.session)
                    updates = self._streamed(dep, response)
                    ok = bool(response[-1].get("success"))
                    out = (response[-1].get("output") or {}).get("data") if ok else None
                if ok:
                    self._take(dep, out)
                steps.append(Step(i, ok, out, response, updates if dep.get("queue") is not False else []))
            if not followers:
                return
            for j in _followers(self.config, dep["id"]):
                after = self.dependencies[j]
                if (after["trigger_only_on_failure"] and ok) or (after["trigger_only_on_success"] and not ok):
                    continue   # (a plain "then" runs either way, as Gradio runs it)
                step(j)

        step(index)
        return steps

    def load(self, *, legacy=None, settings=None, share: str | None = None, secret: str | None = None) -> Step:
        """Open (or reload) the page: its load step gets what ``store.js`` read (``share``: a link's token;
        ``legacy``: the one conversation an earlier version kept, stored as that version's ``gr.BrowserState``
        stored it, encrypted with the state secret ``secret``, by default this process's) and the settings
        ``gr.BrowserState`` as the browser decrypted it. Returns the load step."""
        from chatglm_web.browser_secret import browser_state_secret
        from chatglm_web.conversations.legacy_storage import seal_browser_state

        index = self.load_handler()
        dep = self.dependencies[index]
        stored_in, settings_state = dep["inputs"]
        snapshot = self.snapshot(share)
        if legacy is not None:
            snapshot["legacy"] = {"conversation": seal_browser_state(legacy, secret or browser_state_secret()),
                                  "settings": None}
        steps = self.run(index, {stored_in: snapshot, settings_state: settings})
        return steps[0]

    def output(self, step: Step, elem_id: str):
        """The value ``step`` gave the component ``elem_id`` (``NOTHING``: it left it as it was)."""
        component = self.element(elem_id)
        outputs = self.dependencies[step.index]["outputs"]
        return _value(step.data[outputs.index(component)]) if step.data and component in outputs else NOTHING

    def chat(self) -> list[dict]:
        """The chat as the page shows it now."""
        return self.shown("chatbot") or []

    def turn(self, message: str, **settings) -> Turn:
        """Type ``message`` and press Enter; ``settings``: the drawer's values by elem_id without the dashes
        (``max_new_tokens=8, seed=3``). Every step of the turn runs, as the browser runs them."""
        for name, value in settings.items():
            self.set(name.replace("_", "-"), value)
        self.set("chat-input", message)
        steps = self.run(self.handler("chat-input", "submit"))
        return Turn(self, steps)


@dataclass
class Turn:
    page: PageClient
    steps: list[Step]

    def _at(self, name: str) -> Step | None:
        index = page_turn_handlers(self.page.config)[name]
        return next((s for s in self.steps if s.index == index), None)

    @property
    def began(self):
        """begin's HTTP response."""
        return self._at("begin").response

    @property
    def refused(self) -> str | None:
        """Why the turn was refused (the statistics line the failure step wrote), or None."""
        if self._at("begin").ok:
            return None
        return self.page.shown("reply-stats")

    @property
    def stream(self) -> list[dict]:
        """The reply's event stream messages (the last is ``process_completed``); [] when it did not start."""
        respond = self._at("respond")
        return respond.response if respond is not None else []

    @property
    def stats(self) -> str:
        return self.page.shown("reply-stats") or ""


def page_turn(http, history: list, message: str, session_hash: str, *, max_new_tokens: int = 8, seed: int = 3):
    """One turn through the page's handlers in a new tab whose browser keeps ``history`` (a conversation in
    the Chatbot's wire format) from an earlier version of the page, which the page takes in when it loads
    (that old storage is the one a browser still sends unsealed): (begin's response, the reply's stream
    messages). ``PageClient`` does the same step by step."""
    page = PageClient(http, session_hash)
    page.load(legacy=history or None)
    turn = page.turn(message, max_new_tokens=max_new_tokens, seed=seed)
    return turn.began, turn.stream
