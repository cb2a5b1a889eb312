"""Issue 17: secrets given to the app never show on a command line (``/proc/<pid>/cmdline`` is readable by every
user) nor in the environment of a process it starts. The app runs as users start it (``python app.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest
from server_harness import app_process, free_port

from chatglm_web import browser_secret
from chatglm_web.server import hide_all_secrets
from chatglm_web.settings import SettingsError, parse_settings, read_secret_file

REPO = Path(__file__).resolve().parents[1]
API_KEY, PASSWORD = "sk-cmdline-8c1f2e", "pw-cmdline-5d9a7b"
ENV_KEY, FILE_PASSWORD, STATE_SECRET = "sk-environ-41b7c3", "pw-file-0e6f2a", "state-environ-93d1aa"


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATGLM_WEB_", "GRADIO_SERVER_"))}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def processes_where(field: int, value: int) -> list[int]:
    """Pids whose /proc/PID/stat ``field`` (counted after the command name: 0 state, 1 parent, 2 process group)
    is ``value``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2:].split()[field]) == value:
                pids.append(int(entry.name))
    return pids


def process_group(pgid: int) -> list[int]:
    """The app and every process it started (``app_process`` gives it a process group of its own)."""
    return processes_where(2, pgid)


def visible(pid: int) -> dict[str, bytes]:
    """What other processes can read of ``pid``: its command line (everyone) and environment (its owner)."""
    out = {}
    for name in ("cmdline", "environ"):
        try:
            out[name] = Path(f"/proc/{pid}/{name}").read_bytes()
        except OSError:  # ended meanwhile
            out[name] = b""
    return out


def assert_hidden(app, *secrets: str) -> None:
    pids = process_group(app.pid)
    assert app.pid in pids and len(pids) >= 2, f"expected the app and its engine process, got {pids}"
    for pid in pids:
        for name, data in visible(pid).items():
            for secret in secrets:
                assert secret.encode() not in data, f"/proc/{pid}/{name} holds {secret!r}: {data[:300]!r}"


def test_secrets_on_the_command_line_are_hidden_and_still_work(chatglm3_checkpoint):
    port = free_port()
    args = ["app.py", "--model", str(chatglm3_checkpoint), "--precision", "fp32", "--device", "cpu",
            "--port", str(port), "--api-key", API_KEY, f"--auth=alice:{PASSWORD}"]
    with app_process(args, cwd=REPO, env=clean_env()) as app:
        assert_hidden(app, API_KEY, PASSWORD)
        assert b"--api-key\0" in visible(app.pid)["cmdline"]  # the flags stay readable, only the values are gone
        url = f"http://127.0.0.1:{port}/"
        assert httpx.get(url + "v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert httpx.get(url + "v1/models", headers={"Authorization": "Bearer xxxxxxxxxxxxxxxxx"}).status_code == 401
        assert httpx.post(url + "login", data={"username": "alice", "password": PASSWORD}).status_code == 200
        assert any("secret was given on the command line" in line for line in app.log)


def test_secrets_from_the_environment_and_files_stay_out_of_child_processes(chatglm3_checkpoint, tmp_path):
    port = free_port()
    auth_file = tmp_path / "auth"
    auth_file.write_text(f"alice:{FILE_PASSWORD}\n")
    args = ["app.py", "--model", str(chatglm3_checkpoint), "--precision", "fp32", "--device", "cpu",
            "--port", str(port), "--auth-file", str(auth_file)]
    env = clean_env(CHATGLM_WEB_API_KEY=ENV_KEY, CHATGLM_WEB_STATE_SECRET=STATE_SECRET)
    with app_process(args, cwd=REPO, env=env) as app:
        assert_hidden(app, ENV_KEY, FILE_PASSWORD, STATE_SECRET)
        url = f"http://127.0.0.1:{port}/"
        assert httpx.get(url + "v1/models", headers={"Authorization": f"Bearer {ENV_KEY}"}).status_code == 200
        login = httpx.post(url + "login", data={"username": "alice", "password": FILE_PASSWORD})
        assert login.status_code == 200
        page = httpx.get(url, cookies=login.cookies)
        # the state secret was taken (the settings' browser key is derived from it) and never reaches the page
        assert browser_secret.browser_state_key(STATE_SECRET) in page.text and STATE_SECRET not in page.text


def test_tool_workers_get_no_secret(monkeypatch):
    """Tool workers start later, on the first tool call, with the environment of that moment."""
    from chatglm_web.tools.workers import WorkerPool

    monkeypatch.setenv("CHATGLM_WEB_API_KEY", ENV_KEY)
    monkeypatch.setenv("CHATGLM_WEB_BACKEND_API_KEY", "sk-backend-77aa01")
    monkeypatch.setenv(browser_secret.ENV_VAR, STATE_SECRET)
    monkeypatch.setattr(browser_secret, "_taken", None)
    settings = parse_settings([], environ=dict(os.environ))
    hide_all_secrets(settings)
    assert browser_secret.browser_state_secret() == STATE_SECRET  # still answered, from memory
    pool = WorkerPool(max_workers=1, warm=1)
    try:
        tool = REPO / "assets" / "tools" / "calculator.py"
        pool.request({"op": "describe", "path": str(tool)}, timeout=60, wait=60)
        workers = [pid for pid in _children(os.getpid()) if b"serve_worker" in visible(pid)["cmdline"]]
        assert workers, "no tool worker found"
        for pid in workers:
            environ = visible(pid)["environ"]
            for secret in (ENV_KEY, "sk-backend-77aa01", STATE_SECRET):
                assert secret.encode() not in environ
    finally:
        pool.close()


def _children(pid: int) -> list[int]:
    return processes_where(1, pid)


def test_the_engine_process_is_handed_no_secret():
    settings = parse_settings(["--api-key", "k", "--auth", "a:b", "--backend-api-key", "v"], environ={})
    assert (settings.without_secrets().api_key, settings.without_secrets().auth,
            settings.without_secrets().backend_api_key) == (None, None, None)
    assert settings.api_key == "k"


@pytest.mark.parametrize("content, problem", [("", "is empty"), ("\n  \n", "is empty"), (b"\xff\xfe", "not UTF-8")])
def test_a_bad_secret_file_is_a_one_line_error(tmp_path, content, problem):
    path = tmp_path / "secret"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(SettingsError, match=problem):
        read_secret_file(str(path), "--api-key-file")
    with pytest.raises(SettingsError, match="cannot read"):
        read_secret_file(str(tmp_path / "missing"), "--api-key-file")


def test_secret_files_and_their_precedence(tmp_path):
    key = tmp_path / "key"
    key.write_text("from-file\n")
    assert parse_settings(["--api-key-file", str(key)], environ={"CHATGLM_WEB_API_KEY": "env"}).api_key == "from-file"
    assert parse_settings([], environ={"CHATGLM_WEB_API_KEY_FILE": str(key)}).api_key == "from-file"
    assert parse_settings(["--api-key", "flag"], environ={"CHATGLM_WEB_API_KEY_FILE": str(key)}).api_key == "flag"
    with pytest.raises(SettingsError, match="both set"):
        parse_settings(["--api-key", "flag", "--api-key-file", str(key)], environ={})
    auth = tmp_path / "auth"
    auth.write_text("nocolon\n")
    with pytest.raises(SettingsError, match="--auth-file must look like user:password") as error:
        parse_settings(["--auth-file", str(auth)], environ={})
    assert "nocolon" not in str(error.value)  # the error does not repeat the secret


def test_nothing_is_scrubbed_from_other_arguments(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["app.py", "--model", "m", "--api-key", "k3y", "--auth=u:p", "--assets-dir", "k3y0"])
    monkeypatch.setattr(sys, "orig_argv", ["python", *sys.argv])
    monkeypatch.setattr(browser_secret, "_taken", None)
    hide_all_secrets(parse_settings(sys.argv[1:], environ={}))
    assert sys.argv == ["app.py", "--model", "m", "--api-key", "xxx", "--auth=xxx", "--assets-dir", "k3y0"]
    assert sys.orig_argv[1:] == sys.argv
