"""The code interpreter's sandboxed kernel, each test with a real ipykernel (no mocks)."""

from __future__ import annotations

import errno
import os
import select
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from chatglm_web.tools import sandbox as sandbox_module
from chatglm_web.tools.sandbox import (CodeSandbox, SandboxBusy, SandboxClosed, SandboxLimits, SandboxPool,
                                       SandboxUnavailable, check_sandbox_support)

REPO = Path(__file__).resolve().parents[1]
FAST = SandboxLimits(wall_seconds=3, interrupt_grace_seconds=5, startup_seconds=60)  # a busy machine


@pytest.fixture
def make_sandbox():
    made = []

    def make(limits=FAST):
        made.append(CodeSandbox(limits))
        return made[-1]

    yield make
    for box in made:
        box.close()


def wait_for_exit(pid: int, timeout: float) -> bool:
    """True once the process has exited (zombie or reaped); waits on a pidfd, no polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def test_output_state_and_observation(make_sandbox):
    box = make_sandbox()
    first = box.execute("x = 41\nprint('hello')")
    assert (first.text, first.error, first.images) == ("hello\n", None, [])
    second = box.execute("x + 1")
    assert second.text == "42\n" and not second.restarted
    assert second.observation() == "```result\n42\n```"
    assert Path(box.execute("import os; print(os.getcwd())").text.strip()) == box.scratch_dir


def test_infinite_loop_is_interrupted_then_killed_when_deaf(make_sandbox):
    box = make_sandbox()
    box.execute("kept = 'still here'")
    start = time.monotonic()
    looped = box.execute("print('before', flush=True)\nwhile True:\n    pass")
    assert FAST.wall_seconds <= time.monotonic() - start < FAST.wall_seconds + FAST.interrupt_grace_seconds
    assert looped.timed_out and not looped.restarted
    assert looped.text == "before\n" and "longer than 3 s" in looped.error
    assert box.execute("print(kept)").text == "still here\n"   # interrupted, same kernel

    start = time.monotonic()
    deaf = box.execute("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass")
    assert time.monotonic() - start < FAST.wall_seconds + FAST.interrupt_grace_seconds + 5
    assert deaf.timed_out and deaf.restarted and "restarted" in deaf.error
    assert "NameError" in box.execute("kept").error   # a fresh kernel
    assert box.execute("print(6 * 7)").text == "42\n"


def test_memory_limit(make_sandbox):
    box = make_sandbox(SandboxLimits(wall_seconds=20))   # default 1 GiB address space
    big = box.execute("data = bytearray(2 * 1024**3)")
    assert big.restarted or "MemoryError" in big.error
    assert box.execute("print(len(bytearray(50 * 1024**2)))").text == f"{50 * 1024**2}\n"


def test_kernel_death_and_cpu_limit_restart(make_sandbox):
    box = make_sandbox(SandboxLimits(wall_seconds=90, cpu_seconds=4))
    died = box.execute("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert died.restarted and "killed" in died.error
    assert box.execute("print('back')").text == "back\n"
    spun = box.execute("while True:\n    pass")   # CPU runs out long before the wall limit
    assert spun.restarted and not spun.timed_out and "CPU time (4 s)" in spun.error
    assert box.execute("print('back again')").text == "back again\n"


PROBE_NETWORK = textwrap.dedent("""
    import socket
    outcomes = {}
    cases = {
        "tcp 127.0.0.1": (socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", PORT)),
        "tcp 1.1.1.1": (socket.AF_INET, socket.SOCK_STREAM, ("1.1.1.1", 80)),
        "udp 8.8.8.8": (socket.AF_INET, socket.SOCK_DGRAM, ("8.8.8.8", 53)),
        "tcp6 ::1": (socket.AF_INET6, socket.SOCK_STREAM, ("::1", PORT)),
        "raw packet": (socket.AF_PACKET, socket.SOCK_RAW, None),
        "netlink": (socket.AF_NETLINK, socket.SOCK_RAW, None),
    }
    for name, (family, kind, address) in cases.items():
        try:
            s = socket.socket(family, kind)
        except OSError as e:
            outcomes[name] = "create: " + type(e).__name__
            continue
        try:
            s.connect(address) if address else None
            outcomes[name] = "connected"
        except OSError as e:
            outcomes[name] = "connect: " + type(e).__name__
    a, b = socket.socketpair()   # unix sockets stay usable (ZeroMQ's ipc transport needs them)
    a.send(b"ok")
    outcomes["unix"] = b.recv(2).decode()
    print(outcomes)
""")


def test_network_is_refused(make_sandbox):
    import socket
    with socket.socket() as listener:   # a real listener the kernel must not reach
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        box = make_sandbox()
        result = box.execute(PROBE_NETWORK.replace("PORT", str(listener.getsockname()[1])))
        assert result.error is None, result.error
        outcomes = eval(result.text)
        assert outcomes.pop("unix") == "ok"
        assert outcomes and set(outcomes.values()) == {"create: PermissionError"}, outcomes
        with pytest.raises(BlockingIOError):
            listener.accept()
    urlopen = box.execute("import urllib.request\nurllib.request.urlopen('http://1.1.1.1', timeout=3)")
    assert "PermissionError" in urlopen.error


def test_writes_confined_to_scratch_and_app_secrets_hidden(make_sandbox, monkeypatch, tmp_path):
    monkeypatch.setenv("CHATGLM_SANDBOX_TEST_SECRET", "s3cret")
    box = make_sandbox()
    targets = [f"/tmp/chatglm-sandbox-escape-{os.getpid()}", os.path.expanduser("~/sandbox-escape"),
               str(REPO / "sandbox-escape"), str(tmp_path / "escape"),
               os.path.join(os.path.dirname(os.__file__), "sandbox_escape.py")]
    probe = textwrap.dedent(f"""
        import os
        for path in {targets!r}:
            try:
                open(path, "w").write("x")
                print(path, "WRITTEN")
            except OSError as e:
                print(path, type(e).__name__)
        with open("inside.txt", "w") as f:
            f.write("inside")
        os.mkdir("sub")
        with open("sub/deeper.txt", "w") as f:
            f.write("deeper")
        print("secret" if "CHATGLM_SANDBOX_TEST_SECRET" in os.environ else "no secret")
        try:
            print(open("/proc/{os.getpid()}/environ").read()[:20])
        except OSError as e:
            print("app environ", type(e).__name__)
    """)
    try:
        result = box.execute(probe)
        assert result.error is None, result.error
        lines = result.text.splitlines()
        assert lines[:len(targets)] == [f"{path} PermissionError" for path in targets]
        assert lines[len(targets):] == ["no secret", "app environ PermissionError"]
        assert not any(os.path.exists(path) for path in targets)
    finally:   # should the sandbox ever leak, leave nothing behind
        for path in targets:
            if os.path.isfile(path):
                os.remove(path)
    assert (box.scratch_dir / "inside.txt").read_text() == "inside"
    assert (box.scratch_dir / "sub" / "deeper.txt").read_text() == "deeper"


def test_sessions_are_isolated_and_pool_is_bounded():
    pool = SandboxPool(FAST, max_sessions=2)
    try:
        alice, bob = pool.get("alice"), pool.get("bob")
        assert pool.get("alice") is alice
        assert alice.execute("secret = 'alice'\nopen('mine.txt', 'w').write('alice')").error is None
        assert "NameError" in bob.execute("secret").error
        peek = bob.execute(f"import os\nprint(os.listdir({str(alice.scratch_dir)!r}))")
        assert "PermissionError" in peek.error
        steal = bob.execute(f"open({str(alice.scratch_dir / 'mine.txt')!r}).read()")
        assert "PermissionError" in steal.error
        alice_pid = alice.kernel_pid
        kill = bob.execute(f"import os, signal\nos.kill({alice_pid}, signal.SIGKILL)")
        assert "PermissionError" in kill.error   # Landlock ABI >= 6 scopes signals
        with pytest.raises(SandboxBusy, match="2 code interpreter kernels"):
            pool.get("carol")
        pool.close("alice")
        assert wait_for_exit(alice_pid, 10)
        assert pool.get("carol") is not alice and len(pool) == 2
    finally:
        pool.close_all()
    assert len(pool) == 0 and bob.kernel_pid is None


def test_pool_removes_directories_left_by_dead_apps():
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    stale = Path(tempfile.mkdtemp(prefix=f"chatglm-sandbox-{int(finished.stdout)}-"))
    live = Path(tempfile.mkdtemp(prefix=f"chatglm-sandbox-{os.getppid()}-"))
    try:
        (stale / "scratch").mkdir()
        SandboxPool(FAST).close_all()
        assert not stale.exists() and live.exists()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)


def test_matplotlib_png(make_sandbox):
    box = make_sandbox(SandboxLimits(wall_seconds=60))
    result = box.execute("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
    assert result.error is None, result.error
    assert len(result.images) == 1 and result.images[0].startswith(b"\x89PNG\r\n\x1a\n")
    assert "【image】" in result.observation() and "<Figure" not in result.text
    assert list((box.scratch_dir / ".config" / "matplotlib").glob("fontlist-*.json"))  # its cache


def test_output_truncated_and_traceback_without_ansi(make_sandbox):
    box = make_sandbox(SandboxLimits(wall_seconds=20, output_chars=1000))
    long = box.execute("print('x' * 5000)")
    assert long.text.startswith("x" * 1000) and "x" * 1001 not in long.text
    assert "output truncated to 1000 characters: 4001 more not shown" in long.text
    assert len(long.observation()) < 1200
    failed = box.execute("def f():\n    raise ValueError('\\x1b[31mboom\\x1b[0m')\nf()")
    assert "\x1b" not in failed.error and "ValueError: boom" in failed.error
    assert "Traceback" in failed.error and failed.text == ""
    assert failed.observation().endswith("ValueError: boom\n```")


def test_close_kills_the_process_group_and_removes_scratch(make_sandbox):
    box = make_sandbox()
    started = box.execute("import os, subprocess, sys\n"
                          "child = subprocess.Popen(['sleep', '600'])\n"
                          "print(os.getpid(), child.pid)")
    kernel_pid, child_pid = map(int, started.text.split())
    assert kernel_pid == box.kernel_pid
    escape = box.execute("subprocess.run([sys.executable, '-c', 'import os; os.setsid()'], check=True)")
    assert "CalledProcessError" in (escape.error or "")   # the child's setsid() was refused
    scratch = box.scratch_dir
    box.close()
    with pytest.raises(ProcessLookupError):
        os.kill(kernel_pid, 0)   # killed and reaped
    assert wait_for_exit(child_pid, 10)
    assert not scratch.exists() and not scratch.parent.exists()
    with pytest.raises(SandboxClosed):
        box.execute("1")
    box.close()   # idempotent


def test_close_during_an_execution_stops_it(make_sandbox):
    box = make_sandbox(SandboxLimits(wall_seconds=60))
    box.execute("import time")
    outcome = []

    def run():
        try:
            outcome.append(box.execute("time.sleep(60)"))
        except SandboxClosed as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    start = time.monotonic()
    worker.start()
    box.close()   # before or during the execution: either way it ends at once
    worker.join(15)
    assert time.monotonic() - start < 15 and isinstance(outcome[0], SandboxClosed)


APP = textwrap.dedent(r"""
    import os, signal, sys, threading
    from chatglm_web.tools.sandbox import CodeSandbox, SandboxLimits
    box = CodeSandbox(SandboxLimits(wall_seconds=20))
    worker = threading.Thread(target=box.execute, args=("x = 1",))   # a short-lived request thread
    worker.start()
    worker.join()
    print(box.execute("import os; print(os.getpid() + x - 1)").text.strip(), flush=True)
    print(box.execute("import ctypes, signal\n"
                      "libc = ctypes.CDLL(None, use_errno=True)\n"
                      "sig = ctypes.c_int()\n"
                      "libc.prctl(2, ctypes.byref(sig))\n"        # PR_GET_PDEATHSIG
                      "print(signal.Signals(sig.value).name, libc.prctl(1, 0), ctypes.get_errno())"
                      ).text.strip(), flush=True)                # PR_SET_PDEATHSIG 0: refused
    sys.stdin.readline()
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_kernel_dies_with_the_app():
    app = subprocess.Popen([sys.executable, "-c", APP], cwd=REPO, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        kernel_pid = int(app.stdout.readline())   # the kernel outlived the thread that started it
        assert app.stdout.readline().split() == ["SIGKILL", "-1", str(errno.EPERM)]
        pidfd = os.pidfd_open(kernel_pid)
        app.stdin.write("die\n")
        app.stdin.flush()
        assert app.wait(30) == -9
        assert select.select([pidfd], [], [], 10)[0], "the kernel outlived the app"
        os.close(pidfd)
    finally:
        app.kill()
        app.wait()
        for left in Path(tempfile.gettempdir()).glob(f"chatglm-sandbox-{app.pid}-*"):
            shutil.rmtree(left)   # what the next SandboxPool would delete


def test_fails_closed_when_a_layer_is_missing(make_sandbox, monkeypatch):
    check_sandbox_support()   # this host has everything
    monkeypatch.setattr(sandbox_module, "_MIN_LANDLOCK_ABI", 99)
    with pytest.raises(SandboxUnavailable, match="Landlock ABI .* too old"):
        check_sandbox_support()
    box = make_sandbox()
    with pytest.raises(SandboxUnavailable, match="Landlock ABI .* too old"):
        box.execute("print('must not run')")
    assert box.kernel_pid is None
