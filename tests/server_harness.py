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
    event = None
    with http.stream("GET", f"gradio_api/call/chat/{event_id}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line[len("event:"):].strip()
                continue
            if not line.startswith("data:"):
                continue
            payload = json.loads(line[len("data:"):])
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
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line[len("data:"):])
            if message.get("event_id") != event_id:
                continue
            seen.append(message)
            if message.get("msg") == "process_completed":
                return seen
    raise AssertionError(f"the event stream ended before the event completed: {seen}")


def page_turn_handlers(config: dict) -> dict[str, int]:
    """The page's handlers of a turn started with Enter in the message box: begin (no queue: checks the
    message, keeps it in States), show (no queue: the message in the chat, Stop), respond (queued: the reply),
    finish (no queue: Send back, the conversation stored)."""
    [textbox] = [c["id"] for c in config["components"] if c["props"].get("elem_id") == "chat-input"]
    [begin] = [i for i, dep in enumerate(config["dependencies"])
               if [textbox, "submit"] in dep["targets"] and dep.get("backend_fn")]
    dependencies = {dep["id"]: (i, dep) for i, dep in enumerate(config["dependencies"])}

    def after(index: int) -> int:
        parent = config["dependencies"][index]["id"]
        found = [i for i, dep in dependencies.values() if dep["trigger_after"] == parent and dep["backend_fn"]
                 and not dep["trigger_only_on_failure"]]
        assert len(found) == 1, f"{len(found)} steps after step {parent}"
        return found[0]

    show = after(begin)
    respond = after(show)
    return {"begin": begin, "show": show, "respond": respond, "finish": after(respond)}


def page_turn(http, history: list, message: str, session_hash: str, *, max_new_tokens: int = 8, seed: int = 3):
    """One turn through the page's handlers with a client-supplied conversation ``history`` (what the browser
    sends as the Chatbot's value): (begin's response, the reply's stream messages)."""
    config = page_config(http)
    handlers = page_turn_handlers(config)
    types = {c["id"]: c for c in config["components"]}

    def value(component_id):   # what the browser sends for each input: the message, the chat, the drawer
        props = types[component_id]["props"]
        elem = props.get("elem_id")
        if elem == "chat-input":
            return message
        if types[component_id]["type"] == "chatbot":
            return history
        return {"max-new-tokens": max_new_tokens, "seed": seed}.get(elem, props.get("value"))

    begin = config["dependencies"][handlers["begin"]]
    began = run_fn(http, handlers["begin"], [value(i) for i in begin["inputs"]], session_hash)
    show = config["dependencies"][handlers["show"]]
    run_fn(http, handlers["show"], [value(i) for i in show["inputs"]], session_hash)
    respond = config["dependencies"][handlers["respond"]]
    return began, run_queued(http, handlers["respond"], [value(i) for i in respond["inputs"]], session_hash)
