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
with the same code as an in-process start (``families.loading.load_chat_model``), runs an ``Engine``
and sends back the model's chat format and info, so the web process holds no weights. One
``multiprocessing`` pipe carries the messages below as data (frozen dataclasses, pickled), with the
engine's own typed events (``events.py``) inside:

    web -> engine   Submit(request_id, prompt_ids, params, stop_ids) | Cancel(request_id) | Stop()
    engine -> web   Ready(chat_format, info) | Failed(message) | Events([(request_id, event), ...])

Events are sent in batches: whatever all requests produced since the last send, so the cost per
message stays flat as users are added. Admission (``--max-batch-size`` running, ``--max-queue``
waiting, busy beyond) is decided here in the web process, at once, with the engine's own
``AdmissionPolicy``; the
engine process frees a slot before it reports the request done, so it never refuses what was
admitted. If the engine process dies, every open request ends with an error, ``alive`` turns
false (``/healthz`` answers 503) and the web server stays up. The engine process ends when the web
process closes the pipe, however that happens.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import threading
from dataclasses import dataclass

from chatglm_web.engine.admission import AdmissionPolicy
from chatglm_web.engine.events import Done, EngineEvent, describe_failure
from chatglm_web.engine.request import GenerationRequest
from chatglm_web.engine.scheduler import Engine
from chatglm_web.generation import FinishReason, SamplingParams
from chatglm_web.settings import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE, StartupError

log = logging.getLogger(__name__)

START_TIMEOUT = 3600.0  # a first start may download the model


class EngineStartError(StartupError, RuntimeError):
    """The engine process could not load the model; the message is one line for the user."""


# -- the messages on the pipe -------------------------------------------------------------------
@dataclass(frozen=True)
class Submit:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: tuple[int, ...]


@dataclass(frozen=True)
class Cancel:
    request_id: int


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Ready:
    chat_format: object
    info: object


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass(frozen=True)
class Events:
    events: list[tuple[int, EngineEvent]]


class EngineProcess:
    """An ``Engine`` running in a child process, with the engine's surface (``protocol.GenerationEngine``)."""

    def __init__(self, connection, process, *, max_batch_size: int, max_queue: int, context_length: int):
        self._connection = connection
        self._process = process
        self.admission = AdmissionPolicy(max_batch_size, max_queue)
        self.context_length = context_length
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._open: dict[int, GenerationRequest] = {}
        self._stopping = False
        self._dead = False
        self._reader = threading.Thread(target=self._read, name="chatglm-web-engine-reader", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, settings, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_queue: int = DEFAULT_MAX_QUEUE,
              timeout: float = START_TIMEOUT):
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
            message = Failed(f"the engine process exited while loading the model (exit code {_exit_code(process)})")
        except BaseException:
            process.kill()
            raise
        if not isinstance(message, Ready):
            process.join(10)
            if process.is_alive():
                process.kill()
            raise EngineStartError(message.message if isinstance(message, Failed) else f"unexpected {message!r}")
        engine = cls(parent_end, process, max_batch_size=max_batch_size, max_queue=max_queue,
                     context_length=message.info.context_length)
        return engine, message.chat_format, message.info

    # -- the engine's surface -------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_ids=()) -> GenerationRequest:
        with self._lock:
            if not self.alive:
                raise RuntimeError("the generation engine has stopped")
            self._check_capacity()
            request = GenerationRequest(prompt_ids, params, stop_ids, self.context_length,
                                        on_done=lambda done: self._forget(request.id),
                                        on_cancel=lambda: self._send(Cancel(request.id)))
            self._open[request.id] = request
        self._send(Submit(request.id, request.prompt_ids, params, tuple(sorted(request.stop_ids))))
        return request

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting), counted as the engine counts them."""
        return self.admission.split(len(self._open))

    @property
    def alive(self) -> bool:
        return not self._stopping and not self._dead and self._process.is_alive()

    def check_capacity(self) -> None:
        with self._lock:
            self._check_capacity()

    def _check_capacity(self) -> None:
        self.admission.check(*self.load)

    def shutdown(self) -> None:
        self._stopping = True
        self._send(Stop())
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
    def _send(self, message) -> None:
        try:
            with self._send_lock:
                self._connection.send(message)
        except (OSError, ValueError):  # the engine process is gone: the reader fails the open requests
            pass

    def _forget(self, request_id: int) -> None:
        with self._lock:
            self._open.pop(request_id, None)

    def _read(self) -> None:
        """Deliver the engine process's events to their requests until it ends."""
        try:
            while True:
                message = self._connection.recv()
                if not isinstance(message, Events):
                    continue
                for request_id, event in message.events:
                    request = self._open.get(request_id)
                    if request is not None:
                        request.deliver(event)
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
            request.end(FinishReason.ERROR, error)


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
    from chatglm_web.families.loading import load_chat_model
    from chatglm_web.settings import error_line

    try:
        loaded = load_chat_model(settings)
    except Exception as error:
        connection.send(Failed(error_line(error)))
        return
    engine = Engine(loaded.model, max_batch_size=max_batch_size, max_queue=max_queue,
                    context_length=loaded.info.context_length, own_thread=False)
    engine.step.pack_for_cpu()  # fp32 CPU weights in oneDNN's layout: faster decode steps (this process's alone)
    connection.send(Ready(loaded.chat_format, loaded.info))
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    sender = threading.Thread(target=_send_events, args=(connection, outbox), daemon=True)
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

    def deliver(request_id: int, event: EngineEvent) -> None:
        if isinstance(event, Done):
            with lock:
                requests.pop(request_id, None)
        outbox.put((request_id, event))

    try:
        while True:
            command = connection.recv()
            if isinstance(command, Submit):
                try:
                    request = engine.submit(command.prompt_ids, command.params, command.stop_ids,
                                            on_event=lambda event, i=command.request_id: deliver(i, event))
                except Exception as error:  # not expected: the web process admits within the same limits
                    deliver(command.request_id, Done(FinishReason.ERROR, describe_failure(error)))
                    continue
                with lock:  # its Done is either already delivered (finished) or comes after this
                    if request.done is None:
                        requests[command.request_id] = request
            elif isinstance(command, Cancel):
                with lock:
                    request = requests.get(command.request_id)
                if request is not None:
                    request.cancel()
            elif isinstance(command, Stop):
                break
    except (EOFError, OSError):  # the web process is gone
        pass
    finally:
        engine.shutdown()


def _send_events(connection, outbox: queue.SimpleQueue) -> None:
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
                connection.send(Events(batch))
            except (OSError, ValueError):
                return
        if item is None:
            return
