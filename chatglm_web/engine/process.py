"""The engine in a process of its own: the model and its decode loop run apart from the web server.

    engine, chat_format, info = EngineProcess.start(settings, max_batch_size=8, max_queue=32)
    request = engine.submit(prompt_ids, params, stop_ids)   # the Engine's surface: EngineBusy at once when full
    async for events in request.batches(): ...              # the Engine's events
    request.cancel()                                        # frees the slot in the engine process
    engine.shutdown()

Why: the web server (Gradio's queue, FastAPI, detokenizing, server-sent events) and the decode loop
are all Python. In one process they share one interpreter lock, so every piece of page work delays
the next decode step of every user; with many users the page's work grows with the token rate and
the engine slows down exactly when it is needed most. Here the engine process does nothing but
generate, and the web process nothing but serve.

The child process (``spawn``: safe with CUDA and with the threads a server has) loads the model
with the same code as an in-process start (``loading.load_chat_model``), runs an ``Engine`` and
sends back the model's chat format and info, so the web process holds no weights. One
``multiprocessing`` pipe carries pickled tuples:

    web -> engine   ("submit", id, prompt_ids, params, stop_ids) | ("cancel", id) | ("stop",)
    engine -> web   ("ready", chat_format, info) | ("failed", message)
                    ("events", [(id, kind, value), ...], steps, max_batch_seen)

Events are sent in batches: whatever all requests produced since the last send, so the cost per
message stays flat as users are added. Admission (``--max-batch-size`` running, ``--max-queue``
waiting, busy beyond) is decided here in the web process, at once, with the Engine's rules; the
engine process frees a slot before it reports the request done, so it never refuses what was
admitted. If the engine process dies, every open request ends with an error, ``alive`` turns
false (``/healthz`` answers 503) and the web server stays up. The engine process ends when the web
process closes the pipe, however that happens.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import queue
import signal
import threading

from chatglm_web.engine.scheduler import Engine, GenerationRequest, Outcome, check_engine_capacity, describe_failure, split_load
from chatglm_web.generation import SamplingParams
from chatglm_web.settings import StartupError

log = logging.getLogger(__name__)

START_TIMEOUT = 3600.0  # a first start may download the model


class EngineStartError(StartupError, RuntimeError):
    """The engine process could not load the model; the message is one line for the user."""


class _RemoteRequest(GenerationRequest):
    """A request whose generation runs in the engine process; cancelling it tells that process."""

    def __init__(self, engine: "EngineProcess", *args):
        super().__init__(*args)
        self._engine = engine

    def cancel(self) -> None:
        if not self.cancelled and not self._finished:
            self._engine._send(("cancel", self.id))
        super().cancel()


class EngineProcess:
    """An ``Engine`` running in a child process, with the Engine's request surface."""

    def __init__(self, connection, process, *, max_batch_size: int, max_queue: int, context_length: int):
        self._connection = connection
        self._process = process
        self.max_batch_size = max(1, max_batch_size)
        self.max_queue = max(0, max_queue)
        self.context_length = context_length
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._open: dict[int, _RemoteRequest] = {}
        self._stopping = False
        self._dead = False
        self.steps = 0
        self.max_batch_seen = 0
        self.finished = collections.Counter()
        self._reader = threading.Thread(target=self._read, name="chatglm-web-engine-reader", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, settings, *, max_batch_size: int = 8, max_queue: int = 32, timeout: float = START_TIMEOUT):
        """Start the engine process and wait until its model is loaded: (engine, chat_format, info).

        Raises ``EngineStartError`` with the loader's one-line message when the model cannot load.
        """
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_engine_main, name="chatglm-web-engine", daemon=True,
                                  args=(child_end, settings.without_secrets(), max_batch_size, max_queue))
        process.start()
        child_end.close()
        try:
            if not parent_end.poll(timeout):
                raise EngineStartError(f"the engine process did not load the model within {timeout:.0f} s")
            message = parent_end.recv()
        except (EOFError, OSError):
            message = ("failed", f"the engine process exited while loading the model (exit code "
                                 f"{_exit_code(process)})")
        except BaseException:
            process.kill()
            raise
        if message[0] != "ready":
            process.join(10)
            if process.is_alive():
                process.kill()
            raise EngineStartError(message[1])
        _, chat_format, info = message
        engine = cls(parent_end, process, max_batch_size=max_batch_size, max_queue=max_queue,
                     context_length=info.context_length)
        return engine, chat_format, info

    # -- the Engine's surface -------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_ids=()) -> GenerationRequest:
        if not prompt_ids:
            raise ValueError("empty prompt")
        with self._lock:
            if not self.alive:
                raise RuntimeError("the generation engine has stopped")
            self._check_capacity()
            request = _RemoteRequest(self, list(prompt_ids), params, set(stop_ids), self.context_length)
            request._on_done = lambda outcome, request_id=request.id: self._done(request_id, outcome)
            self._open[request.id] = request
        self._send(("submit", request.id, request.prompt_ids, params, sorted(request.stop_ids)))
        return request

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting), counted as the Engine counts them."""
        return split_load(len(self._open), self.max_batch_size)

    @property
    def alive(self) -> bool:
        return not self._stopping and not self._dead and self._process.is_alive()

    def check_capacity(self) -> None:
        with self._lock:
            self._check_capacity()

    def _check_capacity(self) -> None:
        check_engine_capacity(*self.load, self.max_batch_size, self.max_queue)

    def shutdown(self) -> None:
        self._stopping = True
        self._send(("stop",))
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._connection.close()
        self._fail_open("the engine stopped")

    @property
    def pid(self) -> int | None:
        return self._process.pid

    # -- plumbing -------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._connection.send(message)
        except (OSError, ValueError):  # the engine process is gone: the reader fails the open requests
            pass

    def _done(self, request_id: int, outcome: Outcome) -> None:
        self.finished.update([outcome.reason])
        with self._lock:
            self._open.pop(request_id, None)

    def _read(self) -> None:
        """Deliver the engine process's events to their requests until it ends."""
        try:
            while True:
                kind, *rest = self._connection.recv()
                if kind != "events":
                    continue
                events, self.steps, self.max_batch_seen = rest
                for request_id, event, value in events:
                    request = self._open.get(request_id)
                    if request is not None:
                        request._emit(event, value)
        except (EOFError, OSError):
            pass
        except Exception:  # a bug here must still end every open request
            log.exception("reading the engine process's events failed")
        self._dead = True
        if not self._stopping:
            log.error("the engine process ended (exit code %s)", _exit_code(self._process))
        self._fail_open("the generation engine stopped; the server's log says why")

    def _fail_open(self, error: str) -> None:
        with self._lock:
            requests = list(self._open.values())
        for request in requests:
            request._end("error", error)


def _exit_code(process) -> int | None:
    """The process's exit code, once it has ended (waiting up to 5 s); None if it still runs."""
    process.join(5)
    return process.exitcode


def _engine_main(connection, settings, max_batch_size: int, max_queue: int) -> None:
    """The engine process: load the model, then generate in this main thread while a side thread takes
    the web process's submits and cancels."""
    # Ctrl-C reaches the whole process group: the web process shuts down, and this one ends with its pipe
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from chatglm_web.engine.cpu_linear import prepack_linear_layers
    from chatglm_web.families.loading import load_chat_model
    from chatglm_web.settings import error_line

    try:
        loaded = load_chat_model(settings)
    except Exception as error:
        connection.send(("failed", error_line(error)))
        return
    if loaded.model.device.type == "cpu":
        prepack_linear_layers(loaded.model)  # fp32 weights in oneDNN's layout: faster CPU decode steps
    engine = Engine(loaded.model, max_batch_size=max_batch_size, max_queue=max_queue,
                    context_length=loaded.info.context_length, own_thread=False)
    connection.send(("ready", loaded.chat_format, loaded.info))
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    sender = threading.Thread(target=_send_events, args=(connection, outbox, engine), daemon=True)
    commands = threading.Thread(target=_serve_commands, args=(connection, engine, outbox), daemon=True)
    sender.start()
    commands.start()
    try:
        engine.run()
    finally:
        outbox.put(None)
        sender.join(5)


def _serve_commands(connection, engine: Engine, outbox: queue.SimpleQueue) -> None:
    """Submits and cancels from the web process, until it says stop or goes away; then the engine stops."""
    requests: dict[int, GenerationRequest] = {}  # the unfinished ones, for cancels
    lock = threading.Lock()  # a request may finish (engine thread) before submit() returns here

    def deliver(request_id: int, kind: str, value) -> None:
        if kind == "done":
            with lock:
                requests.pop(request_id, None)
        outbox.put((request_id, kind, value))

    try:
        while True:
            command, *args = connection.recv()
            if command == "submit":
                request_id, prompt_ids, params, stop_ids = args
                try:
                    request = engine.submit(
                        prompt_ids, params, stop_ids, on_event=lambda kind, value, i=request_id: deliver(i, kind, value))
                except Exception as error:  # not expected: the web process admits within the same limits
                    deliver(request_id, "done", Outcome("error", describe_failure(error)))
                    continue
                with lock:  # its "done" is either already delivered (finished) or comes after this
                    if not request._finished:
                        requests[request_id] = request
            elif command == "cancel":
                with lock:
                    request = requests.get(args[0])
                if request is not None:
                    request.cancel()
            elif command == "stop":
                break
    except (EOFError, OSError):  # the web process is gone
        pass
    finally:
        engine.shutdown()


def _send_events(connection, outbox: queue.SimpleQueue, engine: Engine) -> None:
    """Send the events in batches: each send takes everything that is waiting."""
    while True:
        item = outbox.get()
        batch = []
        while item is not None:
            batch.append(item)
            try:
                item = outbox.get_nowait()
            except queue.Empty:
                break
        if batch:
            try:
                connection.send(("events", batch, engine.steps, engine.max_batch_seen))
            except (OSError, ValueError):
                return
        if item is None:
            return
