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

Tool code never runs in the server process. Each call runs in a worker process (``workers.py``) started
with ``python -c`` (a fresh interpreter: no fork of the threaded server, and unlike multiprocessing's
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

The system message that offers the specs is the model family's (``families.family.ToolCalls``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jsonschema

from chatglm_web.tools.workers import (DECLARATIONS, ERROR_CHARS, MAX_WORKERS, WARM_WORKERS, PoolBusy, PoolClosed, WorkerDied,
                      WorkerPool, WorkerStartFailed, WorkerTimeout)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
RESULT_LIMIT = 8000
LOAD_TIMEOUT = 30.0       # importing one tool module while loading
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding chatglm_web/ (and assets/)
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


class ToolLoadError(Exception):
    """A tool module (or the tools folder) is not usable; the message names the file."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict
    module_path: Path

    def spec(self) -> dict:
        """The tool as a system message's ``tools`` lists it."""
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
