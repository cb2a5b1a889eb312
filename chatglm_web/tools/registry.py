"""ChatGLM3 tools: one Python module per tool in a folder, each call checked and run in a worker.

Adding a tool
-------------
Drop one ``.py`` file into the tools folder (``assets/tools/`` by default); the app is not
touched. The module declares::

    NAME = "get_weather"                      # letters, digits, "_" or "-"; starts with a letter
    DESCRIPTION = "Current weather of a city"  # what the model reads to decide when to call it
    PARAMETERS = {                             # a JSON schema of the arguments (an object)
        "type": "object",
        "properties": {"city": {"type": "string", "description": "city name, e.g. Beijing"},
                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
        "additionalProperties": False,
    }

    def run(city, unit="celsius"):             # gets the checked arguments as keywords
        return {"city": city, "temperature": 21, "unit": unit}   # JSON-serializable, or a str

Files whose name starts with ``_`` are not tools (rename ``x.py`` to ``_x.py`` to switch a tool
off). The folder is read once, at start-up: restart the app after changing it.

What loading checks, per file: the module imports; ``NAME``, ``DESCRIPTION`` (non-empty str) and
``PARAMETERS`` (a JSON-serializable dict with ``"type": "object"`` that passes jsonschema's
``check_schema``; every ``required`` name is a declared property) are there; ``run`` is callable,
accepts every declared property as a keyword, and needs no argument the schema does not require;
no two files use the same ``NAME``. A file that fails is skipped with a logged warning naming the
file and the reason (also kept in ``ToolRegistry.problems``), so one broken tool never takes the
others down; ``from_folder(..., strict=True)`` raises :class:`ToolLoadError` instead.

Running a call
--------------
``ToolRegistry.call(name, arguments, timeout)`` never raises for bad model output: an unknown
tool, arguments the schema rejects (the message names the argument and what was expected), an
exception in the tool, a result that is not JSON, a tool that runs past the timeout or crashes its
process all come back as ``ToolResult(ok=False, content=<a sentence for the model>, error=<short
account for the page>)``. A result is the function's return value as JSON text
(``json.dumps(..., ensure_ascii=False)``; a returned str is used as it is), cut to
``result_limit`` characters with a note saying so.

Tool code never runs in the server process. Each call runs in a worker process started with
``python -c`` (a fresh interpreter: no fork of the threaded server, and unlike multiprocessing's
spawn it does not re-import the server's ``__main__``), kept warm between calls (up to
``max_workers`` of them, for calls that arrive together). A worker that runs past the timeout is
killed with its whole process group and replaced on the next call. Loading imports each module in
a worker too, so a module that hangs or crashes on import is reported like any other problem.
Workers get the server's environment as it was when they started (e.g.
``CHATGLM_WEB_SEARCH_DIR``).

Public API::

    registry = ToolRegistry.from_folder(default_tools_folder())
    registry.tools["calculator"] -> Tool(name, description, parameters, module_path); .spec()
    registry.specs() -> [{"name", "description", "parameters"}, ...]   # for the system message
    registry.call("calculator", {"expression": "2**10"}) -> ToolResult(ok, content, error, seconds)
    registry.problems -> ["<file>: <what is wrong>", ...]
    registry.close()
    TOOLS_SYSTEM_PROMPT   # the official tools system prompt; the specs go in the message's "tools"
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jsonschema

log = logging.getLogger(__name__)

TOOLS_SYSTEM_PROMPT = ("Answer the following questions as best as you can. "
                       "You have access to the following tools:")
DEFAULT_TIMEOUT = 10.0
RESULT_LIMIT = 8000
MAX_WORKERS = 4
WARM_WORKERS = 2          # idle workers kept for the next calls; extra ones are stopped
LOAD_TIMEOUT = 30.0       # importing one tool module while loading
START_TIMEOUT = 30.0      # a worker's interpreter start-up (slow on a busy machine)
ERROR_CHARS = 500         # an exception message longer than this is cut
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
DECLARATIONS = ("NAME", "DESCRIPTION", "PARAMETERS", "run")
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding chatglm_web/


class ToolLoadError(Exception):
    """A tool module (or the tools folder) is not usable; the message names the file."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict
    module_path: Path

    def spec(self) -> dict:
        """The tool as ChatGLM3's system message lists it."""
        return {"name": self.name, "description": self.description,
                "parameters": copy.deepcopy(self.parameters)}


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    content: str             # observation text for the model
    error: str | None = None  # short account for the page when not ok
    seconds: float = 0.0


def default_tools_folder() -> Path:
    """``<repo>/assets/tools``, found relative to the package."""
    return _PACKAGE_ROOT / "assets" / "tools"


# ----------------------------------------------------------------------------------------------
# Loading: from what a worker found in a module to a checked Tool


def tool_files(folder: Path) -> list[Path]:
    """The tool modules of ``folder``: ``*.py`` files not starting with ``_``, by name."""
    return sorted(p for p in folder.glob("*.py") if not p.name.startswith("_") and p.is_file())


def tool_from_description(path: Path, found: dict) -> Tool:
    """A :class:`Tool` from a worker's description of the module at ``path`` (see
    :func:`_describe_module`); raises :class:`ToolLoadError` naming the file and the problem."""
    def fail(problem: str) -> ToolLoadError:
        return ToolLoadError(f"{path}: {problem}")

    if "error" in found:
        raise fail(found["error"])
    types, values = found["types"], found["values"]
    for key in DECLARATIONS:
        if key not in types:
            what = "a function run(**arguments)" if key == "run" else "a module-level variable"
            raise fail(f"{key} is missing ({what})")
    for key in ("NAME", "DESCRIPTION"):
        if types[key] != "str":
            raise fail(f"{key} must be a str, not {types[key]}")
    name, description = values["NAME"], values["DESCRIPTION"]
    if not NAME_PATTERN.fullmatch(name):
        raise fail(f"NAME {name!r} must be 1 to 64 letters, digits, '_' or '-', starting with a letter")
    if not description.strip():
        raise fail("DESCRIPTION is empty")
    if types["PARAMETERS"] != "dict":
        raise fail(f"PARAMETERS must be a dict (a JSON schema), not {types['PARAMETERS']}")
    if "PARAMETERS" in found.get("not_json", {}):
        raise fail(f"PARAMETERS is not JSON: {found['not_json']['PARAMETERS']}")
    parameters = values["PARAMETERS"]
    _check_parameters_schema(parameters, fail)
    _check_run_signature(found["run"], parameters, fail)
    return Tool(name=name, description=description, parameters=parameters, module_path=path)


def _check_parameters_schema(parameters: dict, fail) -> None:
    if parameters.get("type") != "object":
        raise fail(f'PARAMETERS must have "type": "object", not {parameters.get("type")!r}')
    validator = jsonschema.validators.validator_for(parameters, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(parameters)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise fail(f"PARAMETERS is not a valid JSON schema"
                   f"{f' at {where!r}' if where else ''}: {e.message}") from None
    properties = parameters.get("properties", {})
    missing = [r for r in parameters.get("required", []) if r not in properties]
    if missing:
        raise fail(f"PARAMETERS requires {', '.join(map(repr, missing))} but does not declare "
                   f"{'it' if len(missing) == 1 else 'them'} in 'properties'")


def _check_run_signature(run: dict, parameters: dict, fail) -> None:
    if not run["callable"]:
        raise fail(f"run must be a function, not {run['type']}")
    if run["signature"] is None:  # a builtin or C function: nothing to check
        return
    keywords, required, var_keyword = run["keywords"], run["required"], run["var_keyword"]
    if run["positional_only_required"]:
        raise fail(f"run() has positional-only parameters ({', '.join(run['positional_only_required'])}); "
                   "arguments are passed as keywords")
    if not var_keyword:
        refused = [p for p in parameters.get("properties", {}) if p not in keywords]
        if refused:
            raise fail(f"run() does not accept the declared argument(s) {', '.join(map(repr, refused))}")
    unsure = [p for p in required if p not in parameters.get("required", [])]
    if unsure:
        raise fail(f"run() needs {', '.join(map(repr, unsure))}, which PARAMETERS does not list in "
                   "'required' (give the parameter a default or require it)")


# ----------------------------------------------------------------------------------------------
# Arguments: checked against the tool's schema, with a message that names the argument


def _json_copy(arguments) -> object:
    """``arguments`` as plain JSON values (tuples become lists); ValueError/TypeError if not JSON."""
    return json.loads(json.dumps(arguments, allow_nan=False))


def describe_schema_error(error: jsonschema.ValidationError) -> str:
    """One sentence for a failed check: which argument, what was expected."""
    path = list(error.absolute_path)
    _shorten_instance(error)
    if error.validator == "required" and isinstance(error.instance, dict):
        match = re.match(r"'(.*)' is a required property", error.message)
        what = f"missing required argument {match.group(1)!r}" if match else error.message
        return what if not path else f"argument {_argument_name(path)!r}: {error.message}"
    if error.validator == "additionalProperties" and not path:
        unexpected = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        if unexpected:
            return f"unexpected argument{'s' if len(unexpected) > 1 else ''} {', '.join(map(repr, unexpected))}"
    if not path:
        return f"arguments: {error.message}"
    return f"argument {_argument_name(path)!r}: {error.message}"


def _shorten_instance(error: jsonschema.ValidationError, most: int = 60) -> None:
    """jsonschema's messages start with the value's repr: keep that short for a long value."""
    text = repr(error.instance)
    if len(text) > most and error.message.startswith(text):
        size = f" ({len(error.instance)} {'characters' if isinstance(error.instance, str) else 'items'})" \
            if isinstance(error.instance, (str, list, dict)) else ""
        error.message = f"{text[:most - 15]}…{text[-10:]}{size}" + error.message[len(text):]


def _argument_name(path: list) -> str:
    name = str(path[0])
    for part in path[1:]:
        name += f"[{part}]" if isinstance(part, int) else f".{part}"
    return name


def argument_problem(validator: jsonschema.protocols.Validator, arguments) -> str | None:
    """None when ``arguments`` pass ``validator``, else every problem (at most 3) in one line."""
    if not isinstance(arguments, dict):
        return f"the arguments must be a JSON object, not {type(arguments).__name__}"
    errors = sorted(validator.iter_errors(arguments), key=lambda e: [str(p) for p in e.absolute_path])
    if not errors:
        return None
    problems = [describe_schema_error(e) for e in errors]
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


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

    _WORKER_CODE = "from chatglm_web.tools.registry import serve_worker; serve_worker()"

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


# ----------------------------------------------------------------------------------------------
# The registry


def _seconds(value: float) -> str:
    return f"{value:g} s"


class ToolRegistry:
    """The tools of a folder and a pool of workers that runs them (see the module docstring)."""

    def __init__(self, tools: Iterable[Tool] = (), *, problems: Iterable[str] = (),
                 result_limit: int = RESULT_LIMIT, max_workers: int = MAX_WORKERS,
                 warm_workers: int = WARM_WORKERS):
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self.tools:
                raise ValueError(f"two tools are named {tool.name!r}")
            self.tools[tool.name] = tool
        self.problems: list[str] = list(problems)
        self.result_limit = result_limit
        self._pool = WorkerPool(max_workers, warm_workers)
        self._validators: dict[str, jsonschema.protocols.Validator] = {}
        self._finalizer = weakref.finalize(self, self._pool.close)

    @classmethod
    def from_folder(cls, folder: Path, *, strict: bool = False, load_timeout: float = LOAD_TIMEOUT,
                    **options) -> "ToolRegistry":
        """The tools of ``folder`` (one module each, see the module docstring). A module that
        fails its checks is skipped with a warning naming the file and recorded in ``problems``;
        with ``strict`` the first such problems raise :class:`ToolLoadError` instead."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ToolLoadError(f"tools folder not found: {folder}")
        registry = cls(**options)
        try:
            for path in tool_files(folder):
                try:
                    tool = registry._load(path, load_timeout)
                except ToolLoadError as e:
                    registry.problems.append(str(e))
                    log.warning("tool skipped: %s", e)
                    continue
                registry.tools[tool.name] = tool
            if strict and registry.problems:
                raise ToolLoadError("; ".join(registry.problems))
        except BaseException:
            registry.close()
            raise
        log.info("tools from %s: %s", folder, ", ".join(registry.tools) or "none")
        return registry

    def _load(self, path: Path, timeout: float) -> Tool:
        try:
            found = self._pool.request({"op": "describe", "path": str(path)}, timeout, wait=timeout)
        except WorkerTimeout:
            raise ToolLoadError(f"{path}: importing it took longer than {_seconds(timeout)}") from None
        except WorkerDied as e:
            raise ToolLoadError(f"{path}: importing it ended the worker process ({e})") from None
        except PoolBusy:
            raise ToolLoadError(f"{path}: no tool worker was free within {_seconds(timeout)}") from None
        tool = tool_from_description(path, found)
        if tool.name in self.tools:
            raise ToolLoadError(f"{path}: NAME {tool.name!r} is already used by "
                                f"{self.tools[tool.name].module_path.name}")
        return tool

    def specs(self) -> list[dict]:
        """Every tool's spec, in the order the folder lists them."""
        return [tool.spec() for tool in self.tools.values()]

    def _validator(self, tool: Tool) -> jsonschema.protocols.Validator:
        validator = self._validators.get(tool.name)
        if validator is None:
            cls = jsonschema.validators.validator_for(tool.parameters, default=jsonschema.Draft202012Validator)
            validator = cls(tool.parameters, format_checker=cls.FORMAT_CHECKER)
            self._validators[tool.name] = validator
        return validator

    def call(self, name: str, arguments: dict, timeout: float = DEFAULT_TIMEOUT) -> ToolResult:
        """Run tool ``name`` with ``arguments`` in a worker; blocks at most about ``timeout`` s
        (plus a worker start-up, or the wait for a free worker); never raises for bad input."""
        if not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        started = time.monotonic()
        result = self._call(name, arguments, timeout)
        result = ToolResult(result.ok, result.content, result.error, time.monotonic() - started)
        log.info("tool %s: %s in %.2f s", name, "ok" if result.ok else f"failed ({result.error})", result.seconds)
        return result

    def _call(self, name: str, arguments: dict, timeout: float) -> ToolResult:
        tool = self.tools.get(name) if isinstance(name, str) else None
        if tool is None:
            available = ", ".join(self.tools) or "none"
            return _failure(f"unknown tool {name!r}", f"There is no tool named {name!r}. Available tools: {available}.")
        try:
            arguments = _json_copy(arguments)
        except (TypeError, ValueError) as e:
            problem = f"arguments are not JSON: {e}"
        else:
            problem = argument_problem(self._validator(tool), arguments)
        if problem:
            return _failure(problem, f"Invalid arguments for the tool {name!r}: {problem}.")
        request = {"op": "run", "path": str(tool.module_path), "arguments": arguments, "limit": self.result_limit}
        try:
            answer = self._pool.request(request, timeout, wait=timeout)
        except WorkerTimeout:
            return _failure(f"the tool took longer than {_seconds(timeout)}",
                            f"The tool {name!r} took longer than {_seconds(timeout)} and was stopped.")
        except WorkerStartFailed as e:
            return _failure(str(e), f"The tool {name!r} could not run: {e}.")
        except WorkerDied as e:
            return _failure(f"the tool's process crashed: {e}", f"The tool {name!r} crashed ({e}).")
        except PoolBusy:
            return _failure(f"every tool worker stayed busy for {_seconds(timeout)}",
                            f"The tool {name!r} could not run: the server's tool workers are busy.")
        except PoolClosed:
            return _failure("the tool registry is closed", f"The tool {name!r} is not available any more.")
        if not answer["ok"]:
            return _failure(answer["error"], f"The tool {name!r} failed: {answer['error']}")
        content = answer["content"]
        if answer["chars"] > len(content):
            content += (f"\n[… truncated: the result has {answer['chars']} characters, "
                        f"only the first {len(content)} are shown]")
        return ToolResult(ok=True, content=content)

    def close(self) -> None:
        """Stop every worker; later calls answer ok=False."""
        self._finalizer()

    def __enter__(self) -> "ToolRegistry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _failure(error: str, content: str) -> ToolResult:
    short = error if len(error) <= ERROR_CHARS else error[:ERROR_CHARS] + "…"
    return ToolResult(ok=False, content=content, error=short)
