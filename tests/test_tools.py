"""Tool registry (chatglm_web/tools/registry.py) and the built-in tools in assets/tools/."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jsonschema
import pytest

from chatglm_web.families.chatglm3.tool_prompts import TOOLS_SYSTEM_PROMPT
from chatglm_web.tools.registry import (Tool, ToolLoadError, ToolRegistry, ToolResult,
                                        default_tools_folder)
from waiting import wait_until

REPO = Path(__file__).resolve().parent.parent
BUILT_INS = ["calculator", "current_time", "search_documents", "unit_conversion"]


def write_tool(folder: Path, filename: str, source: str) -> Path:
    path = folder / filename
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def simple_tool(name: str, body: str = "return {'echo': text}", *, imports: str = "") -> str:
    """Source of a tool module taking one string argument ``text``."""
    return f"""
{imports}
NAME = {name!r}
DESCRIPTION = "test tool {name}"
PARAMETERS = {{"type": "object", "properties": {{"text": {{"type": "string"}}}}, "required": []}}

def run(text="", **_):
    {body}
"""


def process_gone(pid: int, within: float = 5.0) -> bool:
    """True once ``pid`` no longer runs (gone, or a zombie nobody reaped yet)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        status = Path(f"/proc/{pid}/status")
        try:
            if "\nState:\tZ" in status.read_text():
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


# ---- the real folder ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry():
    with ToolRegistry.from_folder(default_tools_folder()) as loaded:
        yield loaded


def test_default_folder_is_the_repositorys_assets_tools():
    assert default_tools_folder() == REPO / "assets" / "tools"
    assert default_tools_folder().is_dir()


def test_system_prompt_is_the_official_one():
    assert TOOLS_SYSTEM_PROMPT == ("Answer the following questions as best as you can. "
                                   "You have access to the following tools:")


def test_real_folder_loads_every_built_in(registry):
    assert sorted(registry.tools) == BUILT_INS
    assert registry.problems == []
    for name, tool in registry.tools.items():
        assert isinstance(tool, Tool) and tool.name == name
        assert tool.module_path == default_tools_folder() / f"{name}.py"
        assert tool.description.strip()


def test_specs_have_the_shape_chatglm3_lists(registry):
    specs = registry.specs()
    assert [s["name"] for s in specs] == list(registry.tools)
    for spec in specs:
        assert set(spec) == {"name", "description", "parameters"}
        assert spec["parameters"]["type"] == "object"
        jsonschema.Draft202012Validator.check_schema(spec["parameters"])
        json.dumps(spec, indent=4, ensure_ascii=False)  # what the system message holds


def test_spec_is_a_copy(registry):
    spec = registry.tools["calculator"].spec()
    spec["parameters"]["properties"].clear()
    assert registry.tools["calculator"].spec()["parameters"]["properties"]


def test_unknown_tool(registry):
    result = registry.call("weather", {"city": "Beijing"})
    assert isinstance(result, ToolResult)
    assert not result.ok and result.error == "unknown tool 'weather'"
    assert "calculator" in result.content  # the model is told what exists


def test_timeout_must_be_a_positive_number(registry):
    for bad in (0, -1, float("nan"), float("inf"), "10"):
        with pytest.raises(ValueError, match="timeout"):
            registry.call("calculator", {"expression": "1"}, timeout=bad)


# ---- a team's own tools -------------------------------------------------------------------------

TEAM_TOOLS = {
    "echo.py": simple_tool("echo", "return {'echo': text, 'pid': os.getpid()}", imports="import os"),
    "chinese.py": simple_tool("chinese", "return {'城市': '北京', 'text': text}"),
    "plain.py": simple_tool("plain", "return 'plain text, not JSON: ' + text"),
    "boom.py": simple_tool("boom", "raise ValueError('bad input ' + text)"),
    "exits.py": simple_tool("exits", "raise SystemExit(3)"),
    "crash.py": simple_tool("crash", "os._exit(7)", imports="import os"),
    "not_json.py": simple_tool("not_json", "return {1, 2}"),
    "nan.py": simple_tool("nan", "return float('nan')"),
    "big.py": simple_tool("big", "return '界' * 20000"),
    "big_json.py": simple_tool("big_json", "return list(range(10000))"),
    "sleepy.py": simple_tool("sleepy", "open(text, 'w').write(str(os.getpid())); time.sleep(3600)",
                             imports="import os, time"),
    "spinner.py": simple_tool("spinner", "while True: pass"),
    "parent.py": simple_tool(
        "parent",
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'])\n"
        "    open(text, 'w').write(str(child.pid)); time.sleep(3600)",
        imports="import subprocess, sys, time"),
    "noisy.py": simple_tool("noisy", "print('{\"not\": \"the reply\"}'); print(sys.stdin.read()); return 'quiet'",
                            imports="import sys"),
    "marker.py": """
        NAME = "marker"
        DESCRIPTION = "writes a file, so a test sees whether it ran"
        PARAMETERS = {"type": "object", "properties": {"path": {"type": "string"},
                                                       "count": {"type": "integer", "minimum": 1}},
                      "required": ["path", "count"], "additionalProperties": False}

        def run(path, count):
            open(path, "w").write(str(count))
            return count
    """,
    "strict.py": """
        NAME = "strict"
        DESCRIPTION = "several kinds of argument"
        PARAMETERS = {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "tags": {"type": "array", "items": {"type": "string"}},
                "options": {"type": "object", "properties": {"hourly": {"type": "boolean"}},
                            "additionalProperties": False},
            },
            "required": ["city"],
            "additionalProperties": False,
        }

        def run(city, unit="celsius", days=1, tags=(), options=None):
            return {"city": city, "unit": unit, "days": days, "tags": list(tags), "options": options}
    """,
    "_helper.py": "raise RuntimeError('files starting with _ are not tools')\n",
    "README.txt": "not a module\n",
}


@pytest.fixture(scope="module")
def team_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("team_tools")
    for filename, source in TEAM_TOOLS.items():
        write_tool(folder, filename, source)
    return folder


@pytest.fixture(scope="module")
def team(team_folder):
    with ToolRegistry.from_folder(team_folder) as loaded:
        yield loaded


def test_team_folder_loads_every_module_and_skips_underscore_files(team):
    expected = {Path(f).stem for f in TEAM_TOOLS if f.endswith(".py") and not f.startswith("_")}
    assert set(team.tools) == expected
    assert team.problems == []


def test_team_tool_runs_in_a_warm_worker_process(team):
    first = team.call("echo", {"text": "hi"})
    second = team.call("echo", {"text": "again"})
    assert first.ok and first.error is None and first.seconds > 0   # its duration is measured
    assert json.loads(first.content)["echo"] == "hi"
    pid = json.loads(first.content)["pid"]
    assert pid != os.getpid()                         # not in the server's process
    assert json.loads(second.content)["pid"] == pid   # the same worker, kept warm


def test_result_is_json_text_keeping_chinese(team):
    result = team.call("chinese", {"text": "你好"})
    assert result.ok
    assert result.content == json.dumps({"城市": "北京", "text": "你好"}, ensure_ascii=False)


def test_a_returned_str_is_the_content_as_it_is(team):
    assert team.call("plain", {"text": "x"}).content == "plain text, not JSON: x"


def test_exception_in_the_tool(team):
    result = team.call("boom", {"text": "42"})
    assert not result.ok
    assert result.error == "ValueError: bad input 42"
    assert "ValueError: bad input 42" in result.content
    assert team.call("echo", {"text": "still"}).ok


def test_system_exit_in_the_tool_is_an_error_not_a_dead_worker(team):
    pid = json.loads(team.call("echo", {}).content)["pid"]
    result = team.call("exits", {})
    assert not result.ok and result.error == "SystemExit: 3"
    assert json.loads(team.call("echo", {}).content)["pid"] == pid


def test_a_crashing_tool_is_reported_and_replaced(team):
    result = team.call("crash", {})
    assert not result.ok
    assert "crashed" in result.error and "exit code 7" in result.error
    assert team.call("echo", {"text": "after"}).ok


@pytest.mark.parametrize("name", ["not_json", "nan"])
def test_a_result_that_is_not_json(team, name):
    result = team.call(name, {})
    assert not result.ok
    assert "not JSON" in result.error


def test_long_result_is_truncated_with_a_note(team):
    result = team.call("big", {})
    assert result.ok
    assert result.content.startswith("界" * 8000)
    assert "界" * 8001 not in result.content
    assert "truncated" in result.content and "20000" in result.content
    assert len(result.content) < 8200


def test_result_limit_is_an_option(team_folder):
    with ToolRegistry.from_folder(team_folder, result_limit=100) as small:
        result = small.call("big_json", {})
        assert result.ok
        assert result.content.startswith(json.dumps(list(range(10000)))[:100])
        assert "truncated" in result.content and len(result.content) < 200
        prefix = "plain text, not JSON: "
        exactly = small.call("plain", {"text": "a" * (100 - len(prefix))}).content
        assert exactly == prefix + "a" * (100 - len(prefix))  # at the limit: whole, no note
        over = small.call("plain", {"text": "a" * (101 - len(prefix))}).content
        assert over.startswith(exactly) and "truncated: the result has 101 characters" in over


def test_prints_and_stdin_of_a_tool_do_not_disturb_the_worker(team):
    result = team.call("noisy", {})
    assert result.ok and result.content == "quiet"
    assert team.call("echo", {"text": "next"}).ok


# ---- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arguments, error", [
    ({}, "missing required argument 'city'"),
    ({"city": 5}, "argument 'city': 5 is not of type 'string'"),
    ({"city": ""}, "argument 'city': '' should be non-empty"),
    ({"city": "Beijing", "unit": "kelvinz"}, "argument 'unit': 'kelvinz' is not one of ['celsius', 'fahrenheit']"),
    ({"city": "Beijing", "days": 8}, "argument 'days': 8 is greater than the maximum of 7"),
    ({"city": "Beijing", "days": 1.5}, "argument 'days': 1.5 is not of type 'integer'"),
    ({"city": "Beijing", "days": True}, "argument 'days': True is not of type 'integer'"),
    ({"city": "Beijing", "country": "CN"}, "unexpected argument 'country'"),
    ({"city": "Beijing", "tags": ["a", 3]}, "argument 'tags[1]': 3 is not of type 'string'"),
    ({"city": "Beijing", "options": {"hourly": "yes"}}, "argument 'options.hourly': 'yes' is not of type 'boolean'"),
    ({"city": "Beijing", "options": {"daily": True}}, "argument 'options': Additional properties are not allowed"),
    ([1, 2], "the arguments must be a JSON object, not list"),
    ({"city": {1, 2}}, "arguments are not JSON"),
])
def test_arguments_are_checked_against_the_schema(team, arguments, error):
    result = team.call("strict", arguments)
    assert not result.ok
    assert result.error.startswith(error), result.error
    assert error in result.content  # the model is told precisely too


def test_every_argument_problem_is_named(team):
    result = team.call("strict", {"unit": "kelvin", "days": 0})
    assert not result.ok
    for part in ("missing required argument 'city'", "argument 'days'", "argument 'unit'"):
        assert part in result.error


def test_valid_arguments_reach_the_tool(team):
    result = team.call("strict", {"city": "北京", "unit": "fahrenheit", "days": 7, "tags": ("a", "b"),
                                  "options": {"hourly": True}})
    assert result.ok, result.error
    assert json.loads(result.content) == {"city": "北京", "unit": "fahrenheit", "days": 7, "tags": ["a", "b"],
                                          "options": {"hourly": True}}


def test_a_tool_does_not_run_when_its_arguments_are_invalid(team, tmp_path):
    marker = tmp_path / "ran"
    assert not team.call("marker", {"path": str(marker), "count": 0}).ok
    assert not team.call("marker", {"path": str(marker), "count": 1, "extra": 1}).ok
    assert not marker.exists()
    assert team.call("marker", {"path": str(marker), "count": 2}).ok
    assert marker.read_text() == "2"


# ---- timeouts and workers -----------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["sleepy", "spinner"])
def test_a_tool_past_its_timeout_is_stopped_and_the_next_call_works(team, tool, tmp_path):
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    result = team.call(tool, {"text": str(pid_file)}, timeout=1.5)
    elapsed = time.monotonic() - started
    assert not result.ok
    assert result.error == "the tool took longer than 1.5 s"
    assert "took longer than 1.5 s" in result.content
    assert elapsed >= 1.5   # it had its full time (how soon after it was stopped depends on the machine's load)
    if pid_file.exists():
        assert process_gone(int(pid_file.read_text()))
    after = team.call("echo", {"text": "after"}, timeout=10)
    assert after.ok and json.loads(after.content)["echo"] == "after"


def test_a_timeout_kills_what_the_tool_started(team, tmp_path):
    pid_file = tmp_path / "child"
    result = team.call("parent", {"text": str(pid_file)}, timeout=3)
    assert not result.ok and "took longer" in result.error
    assert pid_file.exists()
    assert process_gone(int(pid_file.read_text()))


def test_a_hanging_tool_does_not_block_other_calls(team, tmp_path):
    slow: list[ToolResult] = []
    thread = threading.Thread(target=lambda: slow.append(team.call("sleepy", {"text": str(tmp_path / "p")},
                                                                     timeout=20)))
    thread.start()
    try:
        wait_until(lambda: (tmp_path / "p").exists(), 30, "the hanging tool to start")
        quick = team.call("echo", {"text": "meanwhile"})
        assert quick.ok
        assert not slow and thread.is_alive()  # answered while the hanging call has not returned
    finally:
        thread.join(60)
    assert slow and not slow[0].ok and "took longer" in slow[0].error


def test_workers_end_when_the_server_is_killed(team_folder, tmp_path):
    """A server killed mid-call leaves no hanging worker behind."""
    pid_file = tmp_path / "worker"
    server = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from chatglm_web.tools.registry import ToolRegistry
        registry = ToolRegistry.from_folder({str(team_folder)!r})
        registry.call("sleepy", {{"text": {str(pid_file)!r}}}, timeout=600)
    """)])
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        worker = int(pid_file.read_text())
    finally:
        server.kill()
        server.wait()
    assert process_gone(worker, within=10)


def test_close_stops_the_workers(team_folder):
    registry = ToolRegistry.from_folder(team_folder)
    pid = json.loads(registry.call("echo", {}).content)["pid"]
    registry.close()
    assert process_gone(pid)
    result = registry.call("echo", {})
    assert not result.ok and result.error == "the tool registry is closed"


# ---- loading problems ---------------------------------------------------------------------------

GOOD = simple_tool("good")
VALID_PARAMETERS = '{"type": "object", "properties": {"x": {"type": "string"}}, "required": []}'
BROKEN = {
    "no_name": ('DESCRIPTION = "d"\nPARAMETERS = {"type": "object"}\ndef run(): pass\n',
                "NAME is missing"),
    "int_name": ('NAME = 5\nDESCRIPTION = "d"\nPARAMETERS = {"type": "object"}\ndef run(): pass\n',
                 "NAME must be a str, not int"),
    "spaced_name": ('NAME = "my tool"\nDESCRIPTION = "d"\nPARAMETERS = {"type": "object"}\ndef run(): pass\n',
                    "NAME 'my tool' must be"),
    "no_description": ('NAME = "t"\nPARAMETERS = {"type": "object"}\ndef run(): pass\n',
                       "DESCRIPTION is missing"),
    "empty_description": ('NAME = "t"\nDESCRIPTION = "  "\nPARAMETERS = {"type": "object"}\ndef run(): pass\n',
                          "DESCRIPTION is empty"),
    "no_parameters": ('NAME = "t"\nDESCRIPTION = "d"\ndef run(): pass\n', "PARAMETERS is missing"),
    "list_parameters": ('NAME = "t"\nDESCRIPTION = "d"\nPARAMETERS = []\ndef run(): pass\n',
                        "PARAMETERS must be a dict (a JSON schema), not list"),
    "string_schema": ('NAME = "t"\nDESCRIPTION = "d"\nPARAMETERS = {"type": "string"}\ndef run(): pass\n',
                      'PARAMETERS must have "type": "object"'),
    "invalid_schema": ('NAME = "t"\nDESCRIPTION = "d"\n'
                       'PARAMETERS = {"type": "object", "properties": {"x": {"type": "strng"}}}\n'
                       'def run(x=None): pass\n',
                       "PARAMETERS is not a valid JSON schema at 'properties/x/type'"),
    "bad_required": ('NAME = "t"\nDESCRIPTION = "d"\n'
                     'PARAMETERS = {"type": "object", "properties": {}, "required": "x"}\ndef run(): pass\n',
                     "PARAMETERS is not a valid JSON schema at 'required'"),
    "undeclared_required": ('NAME = "t"\nDESCRIPTION = "d"\n'
                            'PARAMETERS = {"type": "object", "properties": {}, "required": ["x"]}\n'
                            'def run(x): pass\n',
                            "PARAMETERS requires 'x' but does not declare it in 'properties'"),
    "set_in_schema": ('NAME = "t"\nDESCRIPTION = "d"\n'
                      'PARAMETERS = {"type": "object", "properties": {"x": {"enum": {1, 2}}}}\ndef run(x=1): pass\n',
                      "PARAMETERS is not JSON"),
    "no_run": (f'NAME = "t"\nDESCRIPTION = "d"\nPARAMETERS = {VALID_PARAMETERS}\n', "run is missing"),
    "run_not_callable": (f'NAME = "t"\nDESCRIPTION = "d"\nPARAMETERS = {VALID_PARAMETERS}\nrun = 3\n',
                         "run must be a function, not int"),
    "run_refuses_argument": (f'NAME = "t"\nDESCRIPTION = "d"\nPARAMETERS = {VALID_PARAMETERS}\ndef run(): pass\n',
                             "run() does not accept the declared argument(s) 'x'"),
    "run_needs_more": (f'NAME = "t"\nDESCRIPTION = "d"\nPARAMETERS = {VALID_PARAMETERS}\ndef run(x, y): pass\n',
                       "run() needs 'x', 'y', which PARAMETERS does not list in 'required'"),
    "positional_only": ('NAME = "t"\nDESCRIPTION = "d"\n'
                        'PARAMETERS = {"type": "object", "properties": {"x": {}}, "required": ["x"]}\n'
                        'def run(x, /): pass\n',
                        "run() has positional-only parameters (x)"),
    "syntax_error": ("NAME = 't'\ndef run(:\n", "importing it failed: SyntaxError"),
    "import_error": ("import no_such_module_anywhere\n",
                     "importing it failed: ModuleNotFoundError: No module named 'no_such_module_anywhere'"),
    "raises_on_import": ("raise RuntimeError('needs an API key')\n",
                         "importing it failed: RuntimeError: needs an API key"),
    "exits_on_import": ("import sys\nsys.exit(2)\n", "importing it failed: SystemExit: 2"),
    "crashes_on_import": ("import os\nos._exit(9)\n", "importing it ended the worker process"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_module_is_reported_naming_its_file_and_the_others_load(tmp_path, case, caplog):
    source, problem = BROKEN[case]
    write_tool(tmp_path, "good.py", GOOD)
    broken = write_tool(tmp_path, f"{case}.py", source)
    with caplog.at_level("WARNING", logger="chatglm_web.tools.registry"):
        registry = ToolRegistry.from_folder(tmp_path)
    with registry:
        assert list(registry.tools) == ["good"]
        assert len(registry.problems) == 1
        assert registry.problems[0].startswith(f"{broken}: "), registry.problems
        assert problem in registry.problems[0], registry.problems[0]
        assert str(broken) in caplog.text and problem in caplog.text
        assert registry.call("good", {"text": "fine"}).ok


def test_strict_loading_raises_naming_the_file(tmp_path):
    write_tool(tmp_path, "good.py", GOOD)
    broken = write_tool(tmp_path, "broken.py", BROKEN["no_run"][0])
    with pytest.raises(ToolLoadError, match=f"^{broken}: run is missing"):
        ToolRegistry.from_folder(tmp_path, strict=True)


def test_a_module_that_hangs_on_import_is_reported(tmp_path):
    write_tool(tmp_path, "good.py", GOOD)
    hangs = write_tool(tmp_path, "hangs.py", "import time\ntime.sleep(3600)\n")
    with ToolRegistry.from_folder(tmp_path, load_timeout=2) as registry:
        assert list(registry.tools) == ["good"]
        assert registry.problems == [f"{hangs}: importing it took longer than 2 s"]
        assert registry.call("good", {}).ok


def test_duplicate_names_keep_the_first_file(tmp_path):
    write_tool(tmp_path, "a_echo.py", simple_tool("echo", "return 'first'"))
    second = write_tool(tmp_path, "b_echo.py", simple_tool("echo", "return 'second'"))
    with ToolRegistry.from_folder(tmp_path) as registry:
        assert registry.problems == [f"{second}: NAME 'echo' is already used by a_echo.py"]
        assert registry.call("echo", {}).content == "first"


def test_missing_folder(tmp_path):
    with pytest.raises(ToolLoadError, match="tools folder not found"):
        ToolRegistry.from_folder(tmp_path / "nope")


def test_empty_folder(tmp_path):
    with ToolRegistry.from_folder(tmp_path) as registry:
        assert registry.tools == {} and registry.specs() == [] and registry.problems == []


# ---- built-in: calculator -----------------------------------------------------------------------


@pytest.mark.parametrize("expression, value", [
    ("1 + 2 * 3", 7),
    ("(1 + 2) * 3", 9),
    ("2 ** 10", 1024),
    ("2 ^ 10", 1024),
    ("-3 ** 2", -9),
    ("7 // 2 + 7 % 2", 4),
    ("7 / 2", 3.5),
    ("10 ** 100", 10 ** 100),
    ("2 ** -1", 0.5),
    ("sqrt(16) + abs(-2)", 6.0),
    ("log(8, 2)", 3.0),
    ("round(pi, 3)", 3.142),
    ("factorial(20)", 2432902008176640000),
    ("comb(10, 3) + perm(4, 2)", 132),
    ("max(1, 5, 3) - min(4, 2)", 3),
    ("gcd(12, 18)", 6),
    ("floor(2.7) + ceil(2.1)", 5),
    ("３×（２＋１）÷３", 3.0),   # full-width digits and signs, × and ÷
    ("(" * 100 + "1" + ")" * 100, 1),
])
def test_calculator(registry, expression, value):
    result = registry.call("calculator", {"expression": expression})
    assert result.ok, result.error
    answer = json.loads(result.content)
    assert answer == {"expression": expression, "result": value}


def test_calculator_trigonometry(registry):
    answer = json.loads(registry.call("calculator", {"expression": "sin(pi / 6) + cos(0) + degrees(atan(1))"}).content)
    assert answer["result"] == pytest.approx(0.5 + 1 + 45)


@pytest.mark.parametrize("expression, error", [
    ("9**9**9**9", "too large"),
    ("10**10**10", "too large"),
    ("2**100000", "too large"),
    ("(2**3000) * (2**3000)", "too large"),
    ("factorial(100000)", "too large"),
    ("comb(10**300, 10**299)", "too large"),
    ("lcm(2**3000, 3**2000)", "too large"),
    ("2.0 ** 10000", "too large"),
    ("exp(1000)", "too large"),
    ("1e309", "too large"),
    ("1 / 0", "ZeroDivisionError: division by zero"),
    ("5 // 0", "ZeroDivisionError: division by zero"),
    ("5 % 0.0", "ZeroDivisionError: division by zero"),
    ("sqrt(-1)", "sqrt() is not defined there"),
    ("log(0)", "log() is not defined there"),
    ("(-8) ** (1/3)", "not a real number"),
    ("__import__('os').system('touch /tmp/pwned')", "attribute access"),
    ("__import__('os')", "unknown function '__import__'"),
    ("eval('1')", "unknown function 'eval'"),
    ("open('/etc/passwd')", "unknown function 'open'"),
    ("().__class__.__bases__[0].__subclasses__()", "attribute access"),
    ("(1).real", "attribute access"),
    ("x + 1", "unknown name 'x'"),
    ("sqrt", "call it with parentheses"),
    ("'a' * 10**9", "only numbers"),
    ("[1] * 10**9", "List is not allowed"),
    ("[x for x in range(10**9)]", "ListComp is not allowed"),
    ("(lambda: 1)()", "unknown function"),
    ("1 if True else 2", "IfExp is not allowed"),
    ("True + 1", "only numbers"),
    ("1j * 1j", "only numbers"),
    ("1 << 10000", "operator << is not allowed"),
    ("sqrt(x=4)", "plain arguments only"),
    ("sqrt(1, 2)", "sqrt() takes 1 argument, got 2"),
    ("factorial(2.5)", "whole numbers"),
    ("import os", "not a valid expression"),
    ("1; 2", "not a valid expression"),
    ("-" * 400 + "1", "more than 300 parts"),
    ("-(" * 160 + "1" + ")" * 160, "more than 300 parts"),
])
def test_calculator_refuses_quickly(registry, expression, error):
    result = registry.call("calculator", {"expression": expression}, timeout=5)
    assert not result.ok
    assert error in result.error, result.error
    assert "took longer" not in result.error  # refused, not timed out
    assert not Path("/tmp/pwned").exists()


def test_calculator_expression_length_is_bounded_by_the_schema(registry):
    result = registry.call("calculator", {"expression": "1+" * 300 + "1"})
    assert not result.ok
    quoted = "'" + "1+" * 22 + "…" + "1+" * 4 + "1'"
    assert result.error == f"argument 'expression': {quoted} (601 characters) is too long"


# ---- built-in: current_time ---------------------------------------------------------------------


def test_current_time_defaults_to_utc(registry):
    result = registry.call("current_time", {})
    assert result.ok, result.error
    answer = json.loads(result.content)
    moment = datetime.fromisoformat(answer["datetime"])
    assert answer["timezone"] == "UTC" and answer["utc_offset"] == "+00:00"
    assert abs(moment - datetime.now(timezone.utc)) < timedelta(minutes=1)
    assert answer["date"] == moment.date().isoformat()
    assert answer["weekday"] == moment.strftime("%A")


def test_current_time_in_a_zone(registry):
    answer = json.loads(registry.call("current_time", {"timezone": "Asia/Shanghai"}).content)
    moment = datetime.fromisoformat(answer["datetime"])
    assert answer["timezone"] == "Asia/Shanghai" and answer["utc_offset"] == "+08:00"
    assert moment.utcoffset() == timedelta(hours=8)
    assert abs(moment - datetime.now(timezone.utc)) < timedelta(minutes=1)
    assert answer["unix_time"] == pytest.approx(time.time(), abs=60)


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../../etc/passwd", "/etc/localtime", "Beijing"])
def test_current_time_unknown_zone(registry, zone):
    result = registry.call("current_time", {"timezone": zone})
    assert not result.ok
    assert f"unknown time zone {zone!r}" in result.error and "Asia/Shanghai" in result.error


# ---- built-in: unit_conversion ------------------------------------------------------------------


@pytest.mark.parametrize("value, source, target, expected", [
    (100, "C", "F", 212),
    (32, "F", "C", 0),
    (-40, "C", "F", -40),
    (0, "K", "C", -273.15),
    (300, "K", "F", 80.33),
    (1, "mi", "km", 1.609344),
    (12, "in", "cm", 30.48),
    (1, "chi", "cm", 33.3333333333),
    (1, "jin", "g", 500),
    (1, "lb", "kg", 0.45359237),
    (1, "gal", "L", 3.785411784),
    (1, "m3", "L", 1000),
    (36, "km/h", "m/s", 10),
    (1, "kn", "km/h", 1.852),
    (1.5, "h", "min", 90),
    (1, "wk", "d", 7),
    (1, "GiB", "MB", 1073.741824),
    (100, "Mbit", "MB", 12.5),
    (8, "bit", "B", 1),
])
def test_unit_conversion(registry, value, source, target, expected):
    result = registry.call("unit_conversion", {"value": value, "from_unit": source, "to_unit": target})
    assert result.ok, result.error
    answer = json.loads(result.content)
    assert answer["result"] == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert (answer["from_unit"], answer["to_unit"], answer["value"]) == (source, target, value)


@pytest.mark.parametrize("arguments, error", [
    ({"value": 1, "from_unit": "kg", "to_unit": "m"}, "cannot convert mass (kg) to length (m)"),
    ({"value": 1, "from_unit": "C", "to_unit": "km/h"}, "cannot convert temperature (C) to speed (km/h)"),
    ({"value": -300, "from_unit": "C", "to_unit": "F"}, "-300 C is below absolute zero"),
    ({"value": 1, "from_unit": "kg", "to_unit": "kelvinz"}, "argument 'to_unit': 'kelvinz' is not one of ["),
    ({"value": "1", "from_unit": "kg", "to_unit": "g"}, "argument 'value': '1' is not of type 'number'"),
    ({"value": 1, "from_unit": "kg"}, "missing required argument 'to_unit'"),
])
def test_unit_conversion_errors(registry, arguments, error):
    result = registry.call("unit_conversion", arguments)
    assert not result.ok
    assert error in result.error, result.error


def test_unit_conversion_schema_lists_every_unit_it_knows(registry):
    module = load_builtin("unit_conversion")
    properties = registry.tools["unit_conversion"].parameters["properties"]
    assert properties["from_unit"]["enum"] == properties["to_unit"]["enum"] == module.UNITS
    assert len(set(module.UNITS)) == len(module.UNITS)
    for unit in module.UNITS:  # every unit converts to itself
        assert module.convert(1.0, unit, unit) == pytest.approx(1.0)


# ---- built-in: search_documents -----------------------------------------------------------------


def load_builtin(name: str):
    """A built-in tool module imported in this process, for checks below the registry."""
    spec = importlib.util.spec_from_file_location(f"builtin_tool_{name}", default_tools_folder() / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("query, file, in_snippet", [
    ("年假有几天？", "leave_policy_zh.txt", "年假5天"),
    ("病假需要什么证明", "leave_policy_zh.txt", "病假证明"),
    ("长城有多长", "great_wall_zh.md", "21196.18千米"),
    ("八达岭", "great_wall_zh.md", "延庆区"),
    ("hotel limit in China", "travel_policy.md", "900 CNY"),
    ("How long is the context of chatglm3-6b-32k?", "chatglm3_faq.md", "32,768"),
    ("per diem for meals", "travel_policy.md", "45 EUR"),
    ("GPU memory with 4-bit quantization", "chatglm3_faq.md", "5 GB"),
])
def test_search_sample_documents(registry, query, file, in_snippet):
    result = registry.call("search_documents", {"query": query})
    assert result.ok, result.error
    answer = json.loads(result.content)
    best = answer["results"][0]
    assert best["file"] == file, answer
    assert in_snippet in best["snippet"]
    assert answer["files_searched"] == 4


def test_search_without_match(registry):
    answer = json.loads(registry.call("search_documents", {"query": "quantum chromodynamics 量子色动力学"}).content)
    assert answer["results"] == [] and "no document matches" in answer["note"]


def test_search_max_results(registry):
    answer = json.loads(registry.call("search_documents", {"query": "the", "max_results": 1}).content)
    assert len(answer["results"]) == 1
    assert not registry.call("search_documents", {"query": "the", "max_results": 50}).ok
    assert not registry.call("search_documents", {"query": ""}).ok


@pytest.fixture
def search_folder(tmp_path):
    """A document folder with traps: links out of it, a binary file, a file over the size bound."""
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("password: hunter2 zebra", encoding="utf-8")
    (docs / "zoo.txt").write_text("The zoo keeps a zebra and two lions.\n", encoding="utf-8")
    (docs / "sub" / "inner.md").write_text("The giraffe lives in the sub folder.\n", encoding="utf-8")
    (docs / "gbk.txt").write_bytes("熊猫是中国的国宝，主要生活在四川。".encode("gbk"))
    (docs / "link_out.txt").symlink_to(outside / "secret.txt")
    (docs / "dir_out").symlink_to(outside, target_is_directory=True)
    (docs / "link_in.txt").symlink_to(docs / "zoo.txt")
    (docs / "image.png").write_bytes(b"\x89PNG zebra giraffe")
    (docs / ".hidden.txt").write_text("zebra zebra zebra", encoding="utf-8")
    return docs


def test_search_stays_inside_its_folder(search_folder):
    search = load_builtin("search_documents")
    answer = search.search("zebra password hunter2", search_folder, 10)
    files = [r["file"] for r in answer["results"]]
    assert "zoo.txt" in files
    assert not any("hunter2" in r["snippet"] or "secret" in r["file"] or "dir_out" in r["file"]
                   for r in answer["results"])
    assert sorted(p.name for p in search.document_files(search_folder)) == ["gbk.txt", "inner.md", "link_in.txt",
                                                                            "zoo.txt"]


def test_search_reads_subfolders_and_gbk(search_folder):
    search = load_builtin("search_documents")
    assert search.search("giraffe", search_folder)["results"][0]["file"] == "sub/inner.md"
    best = search.search("熊猫生活在哪里", search_folder)["results"][0]
    assert best["file"] == "gbk.txt" and "四川" in best["snippet"]


def test_search_reads_a_bounded_part_of_each_file(tmp_path):
    search = load_builtin("search_documents")
    (tmp_path / "huge.txt").write_text("filler words here\n" * (search.MAX_FILE_BYTES // 18 + 10) + "needle\n")
    (tmp_path / "small.txt").write_text("a needle in a small file\n")
    answer = search.search("needle", tmp_path, 10)
    assert [r["file"] for r in answer["results"]] == ["small.txt"]   # the huge file's needle lies past the bound


def test_search_snippet_is_bounded(tmp_path):
    search = load_builtin("search_documents")
    (tmp_path / "long.txt").write_text("word " * 2000 + "target sentence here. " + "more " * 2000)
    result = search.search("target", tmp_path)["results"][0]
    assert "target" in result["snippet"] and len(result["snippet"]) <= search.SNIPPET_CHARS + 2


def test_search_folder_comes_from_the_environment(search_folder, monkeypatch):
    monkeypatch.setenv("CHATGLM_WEB_SEARCH_DIR", str(search_folder))
    with ToolRegistry.from_folder(default_tools_folder()) as registry:  # workers start with this env
        answer = json.loads(registry.call("search_documents", {"query": "giraffe"}).content)
    assert answer["results"][0]["file"] == "sub/inner.md" and answer["files_searched"] == 4


def test_search_in_a_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATGLM_WEB_SEARCH_DIR", str(tmp_path / "missing"))
    with ToolRegistry.from_folder(default_tools_folder()) as registry:
        result = registry.call("search_documents", {"query": "x"})
    assert not result.ok and "FileNotFoundError: the document folder does not exist" in result.error
