"""The processes that run tool code for ``registry.ToolRegistry``: never the server's own.

Each worker is a fresh interpreter started with ``python -c`` (no fork of the threaded server, and
unlike multiprocessing's spawn it does not re-import the server's ``__main__``). It imports tool
modules and runs their ``run`` functions, one request at a time; ``WorkerPool`` keeps up to
``max_workers`` of them, ``warm`` idle ones between calls, and kills a worker that runs past its
timeout with its whole process group.

    pool = WorkerPool(max_workers=4, warm=2)
    pool.request({"op": "describe", "path": path}, timeout=30, wait=30)   # what a module declares
    pool.request({"op": "run", "path": path, "arguments": {...}, "limit": 8000}, timeout=10, wait=10)
    pool.close()

Raises ``WorkerTimeout`` (killed), ``WorkerDied`` / ``WorkerStartFailed``, ``PoolBusy`` (no worker
free within ``wait``) and ``PoolClosed``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

MAX_WORKERS = 4
WARM_WORKERS = 2          # idle workers kept for the next calls; extra ones are stopped
START_TIMEOUT = 30.0      # a worker's interpreter start-up (slow on a busy machine)
ERROR_CHARS = 500         # an exception message longer than this is cut
DECLARATIONS = ("NAME", "DESCRIPTION", "PARAMETERS", "run")  # what a tool module declares
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding chatglm_web/


# ----------------------------------------------------------------------------------------------
# The worker process: imports tool modules and runs their functions, one request at a time.
# Protocol: one JSON object per line on the worker's own copies of stdin/stdout; the tool's own
# prints go to stderr and its stdin is /dev/null, so a tool cannot disturb the protocol.


def serve_worker() -> None:
    """Entry point of a worker process (``python -c "...; serve_worker()"``)."""
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    sys.stdin = open(os.devnull, encoding="utf-8")
    sys.stdout = sys.stderr
    modules: dict[str, object] = {}

    def reply(message: dict) -> None:
        replies.write(json.dumps(message).encode("ascii") + b"\n")
        replies.flush()

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    reply({"ready": True, "pid": os.getpid()})
    for line in requests:
        request = json.loads(line)
        if request["op"] == "exit":
            break
        if request["op"] == "describe":
            answer = _describe_module(request["path"], modules)
        else:
            answer = _run_tool(request["path"], request["arguments"], request["limit"], modules)
        reply({"id": request["id"], **answer})


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """End the worker when the server is gone, even while a tool hangs (an idle worker also ends
    on its closed stdin)."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def _import_module(path: str, modules: dict) -> object:
    import importlib.util

    module = modules.get(path)
    if module is None:
        spec = importlib.util.spec_from_file_location(f"chatglm_web_tool_{Path(path).stem}", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"not a Python module: {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # as an import would (dataclasses, pickle look it up)
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[spec.name]
            raise
        modules[path] = module
    return module


def _describe_module(path: str, modules: dict) -> dict:
    """What the module declares, as JSON: the types and values of NAME, DESCRIPTION, PARAMETERS
    and the signature of run. Judging it is :func:`tool_from_description`'s job."""
    import inspect

    try:
        module = _import_module(path, modules)
    except BaseException as e:  # noqa: BLE001 - a module's import may raise anything, SystemExit too
        return {"error": f"importing it failed: {_exception_text(e)}"}
    types, values, not_json = {}, {}, {}
    for key in DECLARATIONS:
        if hasattr(module, key):
            value = getattr(module, key)
            types[key] = type(value).__name__
            if key != "run":
                try:
                    values[key] = json.loads(json.dumps(value, allow_nan=False))
                except (TypeError, ValueError) as e:
                    not_json[key] = str(e)
    run = getattr(module, "run", None)
    described = {"callable": callable(run), "type": type(run).__name__, "signature": None,
                 "keywords": [], "required": [], "var_keyword": False, "positional_only_required": []}
    if callable(run):
        try:
            signature = inspect.signature(run)
        except (TypeError, ValueError):
            signature = None
        if signature is not None:
            kinds = inspect.Parameter
            params = list(signature.parameters.values())
            described.update(
                signature=str(signature),
                keywords=[p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)],
                required=[p.name for p in params if p.default is kinds.empty
                          and p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)],
                var_keyword=any(p.kind is kinds.VAR_KEYWORD for p in params),
                positional_only_required=[p.name for p in params
                                          if p.kind is kinds.POSITIONAL_ONLY and p.default is kinds.empty])
    return {"types": types, "values": values, "not_json": not_json, "run": described}


def _run_tool(path: str, arguments: dict, limit: int, modules: dict) -> dict:
    try:
        result = _import_module(path, modules).run(**arguments)
    except BaseException as e:  # noqa: BLE001 - the tool's failure is reported, the worker lives on
        return {"ok": False, "kind": "exception", "error": _exception_text(e)}
    if isinstance(result, str):
        text = result
    else:
        try:
            text = json.dumps(result, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            return {"ok": False, "kind": "not_json",
                    "error": f"the tool returned a {type(result).__name__} that is not JSON ({e})"}
    return {"ok": True, "content": text[:limit], "chars": len(text)}


def _exception_text(e: BaseException) -> str:
    message = str(e)
    if len(message) > ERROR_CHARS:
        message = message[:ERROR_CHARS] + "…"
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


# ----------------------------------------------------------------------------------------------
# The server side of the workers


class WorkerTimeout(Exception):
    pass


class WorkerDied(Exception):
    pass


class WorkerStartFailed(WorkerDied):
    pass


class _Worker:
    """One worker process and the thread that reads its replies."""

    _WORKER_CODE = "from chatglm_web.tools.workers import serve_worker; serve_worker()"

    def __init__(self, start_timeout: float = START_TIMEOUT):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen([sys.executable, "-c", self._WORKER_CODE], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, close_fds=True,
                                        start_new_session=(os.name == "posix"))
        self._replies: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        threading.Thread(target=self._read, name=f"tool-worker-{self.process.pid}", daemon=True).start()
        try:
            self._next_reply(start_timeout)
        except (WorkerTimeout, WorkerDied) as e:
            self.kill()
            raise WorkerStartFailed(f"the tool worker process did not start ({e})") from None

    def _read(self) -> None:
        for line in self.process.stdout:
            self._replies.put(line)
        self._replies.put(None)

    def _next_reply(self, timeout: float) -> dict:
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise WorkerTimeout(f"no answer within {timeout:g} s") from None
        if line is None:
            self._replies.put(None)
            try:
                code = self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            raise WorkerDied(f"the worker process ended (exit code {code})")
        return json.loads(line)

    def request(self, message: dict, timeout: float) -> dict:
        request_id = next(self._ids)
        try:
            self.process.stdin.write(json.dumps({"id": request_id, **message}).encode("ascii") + b"\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return self._next_reply(0.5)  # raises WorkerDied (or WorkerTimeout if somehow alive)
        deadline = time.monotonic() + timeout
        while True:
            answer = self._next_reply(max(0.0, deadline - time.monotonic()))
            if answer.get("id") == request_id:
                return answer

    def stop(self) -> None:
        """Ask the worker to exit; kill it if it does not within a second."""
        try:
            self.process.stdin.write(b'{"op": "exit"}\n')
            self.process.stdin.flush()
            self.process.wait(timeout=1)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def kill(self) -> None:
        """Kill the worker and anything it started (its own process group)."""
        if self.process.poll() is None:
            try:
                if os.name == "posix":
                    os.killpg(self.process.pid, signal.SIGKILL)
                else:
                    self.process.kill()
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("tool worker %s did not exit after SIGKILL", self.process.pid)
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


class PoolBusy(Exception):
    pass


class PoolClosed(Exception):
    pass


class WorkerPool:
    """Up to ``max_workers`` warm workers; each request takes an idle one (or starts one), and a
    worker that times out or dies is killed and dropped, so the next request gets a fresh one."""

    def __init__(self, max_workers: int = MAX_WORKERS, warm: int = WARM_WORKERS,
                 start_timeout: float = START_TIMEOUT):
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._slots = threading.BoundedSemaphore(max_workers)
        self._warm = warm
        self._start_timeout = start_timeout
        self._idle: list[_Worker] = []
        self._live: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False

    def request(self, message: dict, timeout: float, wait: float) -> dict:
        """The worker's answer to ``message``; WorkerTimeout/WorkerDied after killing the worker,
        PoolBusy when no worker is free within ``wait`` s, PoolClosed after :meth:`close`."""
        if self._closed:
            raise PoolClosed
        if not self._slots.acquire(timeout=wait):
            raise PoolBusy
        try:
            worker = self._take()
            try:
                answer = worker.request(message, timeout)
            except (WorkerTimeout, WorkerDied):
                self._drop(worker)
                raise
            self._give_back(worker)
            return answer
        finally:
            self._slots.release()

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise PoolClosed
            while self._idle:
                worker = self._idle.pop()
                if worker.process.poll() is None:
                    return worker
                self._live.discard(worker)
        worker = _Worker(self._start_timeout)
        with self._lock:
            if self._closed:
                worker.kill()
                raise PoolClosed
            self._live.add(worker)
        return worker

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._warm:
                self._idle.append(worker)
                return
            self._live.discard(worker)
        worker.stop()

    def _drop(self, worker: _Worker) -> None:
        with self._lock:
            self._live.discard(worker)
        worker.kill()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, busy = list(self._idle), self._live - set(self._idle)
            self._idle.clear()
            self._live.clear()
        for worker in idle:
            worker.stop()
        for worker in busy:
            worker.kill()
