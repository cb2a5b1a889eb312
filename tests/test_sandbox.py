"""The code interpreter's sandboxed kernel, each test with a real ipykernel (no mocks)."""

from __future__ import annotations

import json
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

from chatglm_web.tools import cgroup as cgroup_module
from chatglm_web.tools import sandbox as sandbox_module
from chatglm_web.tools import sandbox_launcher
from chatglm_web.tools.cgroup import KernelCgroup
from waiting import wait_until

from chatglm_web.tools.sandbox import (CodeSandbox, SandboxBusy, SandboxClosed, SandboxLimits, SandboxPool,
                                       SandboxUnavailable, check_sandbox_support, sandboxes_dir)

REPO = Path(__file__).resolve().parents[1]
FAST = SandboxLimits(wall_seconds=3, interrupt_grace_seconds=5, startup_seconds=60)  # a busy machine


def _support() -> str | None:
    """The app's own check (what --code-interpreter requires), so the tests run exactly where the app does."""
    try:
        check_sandbox_support()
    except SandboxUnavailable as error:
        return str(error)
    return None


UNSUPPORTED = _support()
pytestmark = pytest.mark.skipif(UNSUPPORTED is not None, reason=f"the app refuses the sandbox here: {UNSUPPORTED}")


def kernel_view(box: CodeSandbox, path: Path) -> Path:
    """``path`` as the kernel sees it (its scratch is a tmpfs in its own mount namespace)."""
    return Path(f"/proc/{box.kernel_pid}/root") / path.relative_to("/")


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
    assert time.monotonic() - start >= FAST.wall_seconds   # it had its full time
    assert looped.timed_out and not looped.restarted
    assert looped.text == "before\n" and "longer than 3 s" in looped.error
    assert box.execute("print(kept)").text == "still here\n"   # interrupted, same kernel

    deaf = box.execute("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass")
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
    # the whole temporary directory is hidden, unless the Python installation is in it (then only the sandboxes)
    tmp_hidden = os.path.realpath(tempfile.gettempdir()) in sandbox_module._covered_paths()
    box = make_sandbox()
    targets = [f"/tmp/chatglm-sandbox-escape-{os.getpid()}", os.path.expanduser("~/sandbox-escape"),
               str(REPO / "sandbox-escape"), str(tmp_path / "escape"), "/etc/sandbox-escape",
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
        # refused by Landlock, or not there at all: the temporary directory is an empty tmpfs in its namespace, so
        # a folder inside it (pytest's tmp_path, or this checkout when it was cloned under the temporary
        # directory) does not exist there
        temporary = os.path.realpath(tempfile.gettempdir()) + os.sep

        def hidden(path: str) -> bool:
            return tmp_hidden and os.path.dirname(os.path.realpath(path)).startswith(temporary)

        assert [line.rsplit(" ", 1) for line in lines[:len(targets)]] == [
            [path, "FileNotFoundError" if hidden(path) else "PermissionError"] for path in targets]
        assert lines[len(targets):] == ["no secret", "app environ FileNotFoundError"]   # no app in its /proc
        assert not any(os.path.exists(path) for path in targets)
    finally:   # should the sandbox ever leak, leave nothing behind
        for path in targets:
            if os.path.isfile(path):
                os.remove(path)
    assert kernel_view(box, box.scratch_dir / "inside.txt").read_text() == "inside"
    assert kernel_view(box, box.scratch_dir / "sub" / "deeper.txt").read_text() == "deeper"
    assert not (box.scratch_dir / "inside.txt").exists()   # the scratch is the kernel's own tmpfs


def test_sessions_are_isolated_from_each_other(make_sandbox):
    """Another kernel's processes, files, connection file and sockets are out of reach, not just refused."""
    alice, bob = make_sandbox(), make_sandbox()
    assert alice.execute("secret = 'alice'\nopen('mine.txt', 'w').write('alice')").error is None
    assert "NameError" in bob.execute("secret").error
    alice_run = alice.scratch_dir.parent / "run"
    sockets = sorted(str(p) for p in alice_run.glob("zmq-*"))
    assert len(sockets) == 5 and (alice_run / "connection.json").exists()   # what bob must not reach
    probe = textwrap.dedent(f"""
        import os, socket
        seen = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        print(os.getpid(), seen)
        argv = [open(f"/proc/{{pid}}/cmdline", "rb").read() for pid in seen if os.path.exists(f"/proc/{{pid}}")]
        print("connection file on a command line" if any(b"connection" in a or b"run/" in a for a in argv)
              else "no connection file on a command line")
        for path in {[str(alice.scratch_dir), str(alice_run), str(alice_run / "connection.json")]!r}:
            try:
                os.listdir(path) if not path.endswith(".json") else open(path).read()
                print(path, "READ")
            except OSError as e:
                print(path, type(e).__name__)
        for path in {sockets!r}:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                print(path, "CONNECTED")
            except OSError as e:
                print(path, type(e).__name__)
        try:
            os.kill({alice.kernel_pid}, 9)
            print("killed")
        except OSError as e:
            print("kill", type(e).__name__)
    """)
    result = bob.execute(probe)
    assert result.error is None, result.error
    lines = result.text.splitlines()
    assert lines[0] == "2 [1, 2]"   # its own PID namespace: its init and itself, nothing of the host
    assert lines[1] == "no connection file on a command line"
    assert all(line.endswith(" FileNotFoundError") for line in lines[2:-1]), lines
    assert lines[-1] == "kill ProcessLookupError"
    assert alice.execute("print(secret)").text == "alice\n"
    assert alice.execute("print(open('mine.txt').read())").text == "alice\n"


def test_the_kernel_sees_no_secret_of_the_app(make_sandbox):
    """No process of the app is visible to a kernel, so neither its command line nor its environment is."""
    secret = "pytest-secret-3f9a"
    app = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "--api-key", secret])
    try:
        box = make_sandbox()
        result = box.execute(textwrap.dedent(f"""
            import os
            found = []
            for pid in (p for p in os.listdir("/proc") if p.isdigit()):
                for name in ("cmdline", "environ"):
                    try:
                        if {secret!r}.encode() in open(f"/proc/{{pid}}/{{name}}", "rb").read():
                            found.append((pid, name))
                    except OSError:
                        pass
            print(found, os.path.exists("/proc/{app.pid}"))
        """))
        assert result.error is None and result.text == "[] False\n", result
        assert secret.encode() in Path(f"/proc/{app.pid}/cmdline").read_bytes()   # the probe could have seen it
    finally:
        app.kill()
        app.wait()


def test_matplotlib_png(make_sandbox):
    box = make_sandbox(SandboxLimits(wall_seconds=60))
    result = box.execute("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
    assert result.error is None, result.error
    assert len(result.images) == 1 and result.images[0].startswith(b"\x89PNG\r\n\x1a\n")
    assert "【image】" in result.observation() and "<Figure" not in result.text
    assert list(kernel_view(box, box.scratch_dir / ".config" / "matplotlib").glob("fontlist-*.json"))  # its cache


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


def test_close_kills_the_kernel_and_removes_its_directories(make_sandbox):
    box = make_sandbox()
    started = box.execute("import os, subprocess, sys\nprint(os.getpid())")
    assert started.text == "2\n"   # PID 2 in its own namespace, under its init
    kernel_pid = box.kernel_pid
    nspid = [line for line in Path(f"/proc/{kernel_pid}/status").read_text().splitlines() if line.startswith("NSpid:")]
    assert nspid[0].split()[1:] == [str(kernel_pid), "2"]
    escape = box.execute("subprocess.run([sys.executable, '-c', 'import os; os.setsid()'], check=True)")
    assert "CalledProcessError" in (escape.error or "")   # the child's setsid() was refused
    root = box.scratch_dir.parent
    group = box._cgroup
    box.close()
    with pytest.raises(ProcessLookupError):
        os.kill(kernel_pid, 0)   # killed and reaped
    assert not root.exists() and not any(Path(d).exists() for d in group.dirs)
    with pytest.raises(SandboxClosed):
        box.execute("1")
    box.close()   # idempotent


DOUBLE_FORK = textwrap.dedent("""
    import os, signal, time
    if os.fork() == 0:
        if os.fork() == 0:   # re-parented to the init once its parent exits
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            time.sleep(600)
        os._exit(0)
    os.wait()
    print(sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
""")


def test_nothing_a_cell_started_outlives_it(make_sandbox):
    box = make_sandbox()
    started = box.execute(DOUBLE_FORK)
    assert started.error is None, started.error
    seen = eval(started.text)
    assert len(seen) == 3 and seen[:2] == [1, 2]   # the grandchild was running while the cell ran
    assert set(box._cgroup.members().values()) == {1, 2}   # and is gone once it returned
    assert box.execute("print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))").text == "[1, 2]\n"
    background = box.execute("import subprocess\nsubprocess.Popen(['sleep', '600'])\nprint('started')")
    assert background.text == "started\n" and set(box._cgroup.members().values()) == {1, 2}


def test_processes_are_capped(make_sandbox):
    box = make_sandbox(SandboxLimits(wall_seconds=60, max_tasks=40))
    result = box.execute(textwrap.dedent("""
        import subprocess
        children, refused = [], None
        for _ in range(300):
            try:
                children.append(subprocess.Popen(["sleep", "60"]))
            except OSError as e:
                refused = type(e).__name__
                break
        print(len(children), refused)
    """))
    assert result.error is None, result.error
    started, refused = result.text.split()
    assert 0 < int(started) < 40 and refused == "BlockingIOError"   # EAGAIN from pids.max
    assert box.execute("print('still works')").text == "still works\n"


def test_memory_cap_counts_memfd(make_sandbox):
    limits = SandboxLimits(wall_seconds=60, memory_bytes=512 << 20)
    box = make_sandbox(limits)
    result = box.execute(textwrap.dedent("""
        import os
        held = []
        try:
            for _ in range(24):   # 1.5 GiB, three times the cap
                fd = os.memfd_create("fill")
                os.write(fd, b"x" * (64 << 20))
                held.append(fd)
                print(len(held) * 64, flush=True)
        except OSError as e:
            print(type(e).__name__)
    """))
    held = [int(line) for line in result.text.split() if line.isdigit()]
    assert max(held, default=0) < 512, held   # the cap counts memfd pages: 1,440 MiB were held before
    assert result.restarted or "OSError" in result.text or "MemoryError" in (result.text + (result.error or ""))
    if result.restarted:
        assert "out of memory" in result.error
    assert box.execute("print('back')").text == "back\n"


def test_scratch_is_capped_in_total(make_sandbox):
    box = make_sandbox(SandboxLimits(wall_seconds=60, scratch_bytes=64 << 20, file_bytes=48 << 20))
    result = box.execute(textwrap.dedent("""
        written = 0
        try:
            for i in range(3):   # each under the file limit, together over the scratch limit
                with open(f"f{i}", "wb") as f:
                    f.write(b"x" * (40 << 20))
                written += 40
        except OSError as e:
            print(written, e.strerror)
    """))
    assert result.text == "40 No space left on device\n", result


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
    worker.start()
    box.close()   # before or during the execution: either way it ends then, not after its 60 s sleep
    worker.join(45)
    assert not worker.is_alive() and isinstance(outcome[0], SandboxClosed)


APP = textwrap.dedent(r"""
    import json, os, signal, sys, threading, time
    from chatglm_web.tools.sandbox import CodeSandbox, SandboxLimits
    box = CodeSandbox(SandboxLimits(wall_seconds=120))
    worker = threading.Thread(target=box.execute, args=("x = 1",))   # a short-lived request thread
    worker.start()
    worker.join()
    cell = threading.Thread(target=box.execute, args=(
        "import subprocess, time\n"
        "subprocess.Popen(['sh', '-c', 'trap \"\" TERM HUP; (sleep 600 &); sleep 600'])\n"
        "time.sleep(600)",), daemon=True)
    cell.start()   # still running when the app dies
    while len(box._cgroup.members()) < 5:   # init, kernel, sh, its sleep and the orphaned sleep
        time.sleep(0.01)
    print(json.dumps(sorted(box._cgroup.members())), flush=True)
    sys.stdin.readline()
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_kernel_and_its_children_die_with_the_app():
    app = subprocess.Popen([sys.executable, "-c", APP], cwd=REPO, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(app.stdout.readline())   # init, kernel, sh and the sleeps it started
        pidfds = [os.pidfd_open(pid) for pid in pids]
        app.stdin.write("die\n")
        app.stdin.flush()
        assert app.wait(30) == -9
        for pid, fd in zip(pids, pidfds):
            assert select.select([fd], [], [], 10)[0], f"{pid} outlived the app"
            os.close(fd)
    finally:
        app.kill()
        app.wait()
    SandboxPool(FAST).close_all()   # what the next app does: its leftovers are removed
    assert not list(sandboxes_dir().glob(f"chatglm-sandbox-{app.pid}-*"))


def test_startup_removes_what_a_dead_app_left():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    name = f"chatglm-sandbox-{int(dead.stdout)}-leftover"
    sandboxes_dir().mkdir(exist_ok=True)
    stale_dir = sandboxes_dir() / name
    live_dir = Path(tempfile.mkdtemp(prefix=f"chatglm-sandbox-{os.getppid()}-", dir=sandboxes_dir()))
    (stale_dir / "scratch").mkdir(parents=True)
    group = KernelCgroup.create(name, memory_bytes=64 << 20, max_tasks=8)
    orphan = subprocess.Popen(["sleep", "600"])   # a process left in the dead app's group
    try:
        Path(group.procs_files[0]).write_text(str(orphan.pid))
        if group.version == "v1":
            Path(group.procs_files[1]).write_text(str(orphan.pid))
        SandboxPool(FAST).close_all()
        assert orphan.wait(10) == -9
        assert not stale_dir.exists() and live_dir.exists()
        assert not any(d.exists() for d in group.dirs)
    finally:
        orphan.kill()
        orphan.wait()
        group.remove()
        shutil.rmtree(stale_dir, ignore_errors=True)
        shutil.rmtree(live_dir, ignore_errors=True)


def test_fails_closed_when_a_layer_is_missing(make_sandbox, monkeypatch):
    check_sandbox_support()   # this host has everything
    monkeypatch.setattr(sandbox_launcher, "MIN_LANDLOCK_ABI", 99)
    with pytest.raises(SandboxUnavailable, match="Landlock ABI .* too old"):
        check_sandbox_support()
    box = make_sandbox()
    with pytest.raises(SandboxUnavailable, match="Landlock ABI .* too old"):
        box.execute("print('must not run')")
    assert box.kernel_pid is None


def test_without_a_cgroup_start_up_names_what_is_missing(make_sandbox, monkeypatch):
    monkeypatch.setattr(cgroup_module, "_mounts", lambda: [])
    with pytest.raises(SandboxUnavailable, match="cgroup with the memory and pids controllers"):
        check_sandbox_support()
    with pytest.raises(SandboxUnavailable, match="memory and pids"):
        make_sandbox().execute("print('must not run')")


# -- the pool: kernels are taken on the first execution, given back when idle, capped per client ------

@pytest.fixture
def make_pool():
    made = []

    def make(**options):
        made.append(SandboxPool(FAST, **options))
        return made[-1]

    yield make
    for pool in made:
        pool.close_all()


def test_a_kernel_starts_on_the_first_execution_not_on_choosing_the_mode(make_pool):
    from chatglm_web.tools.toolbox import INTERPRETER, Toolbox

    pool = make_pool(max_kernels=2)
    toolbox = Toolbox(sandboxes=pool)
    runners = [toolbox.runner(INTERPRETER, f"api-call-{i}", "127.0.0.1") for i in range(8)]   # 8 API calls
    assert len(pool) == 0
    visitor = pool.session("new-visitor", "10.0.0.9")
    assert visitor.execute("print('mine')").text == "mine\n" and len(pool) == 1
    assert runners[0].sandbox.execute("print(1)").text == "1\n" and len(pool) == 2


def test_a_new_visitor_gets_the_least_recently_used_idle_kernel(make_pool):
    pool = make_pool(max_kernels=2)
    alice, bob, carol = (pool.session(name, f"10.0.0.{i}") for i, name in enumerate(["alice", "bob", "carol"]))
    alice.execute("x = 'alice'")
    bob.execute("x = 'bob'")
    assert carol.execute("print('carol')").text == "carol\n" and len(pool) == 2   # alice's kernel went
    assert bob.execute("print(x)").text == "bob\n"
    again = alice.execute("print(x)")   # alice gets a fresh kernel (bob's, now the idlest, goes) and is told
    assert again.text.startswith(SandboxPool.REPLACED) and "NameError" in again.error
    assert alice.execute("print(1)").text == "1\n"   # told once


def test_when_every_kernel_runs_code_the_busy_message_says_when_to_retry(make_pool):
    pool = make_pool(max_kernels=1)
    alice = pool.session("alice", "10.0.0.1")
    alice.execute("import time")
    worker = threading.Thread(target=alice.execute, args=("time.sleep(2)",))
    worker.start()
    try:
        wait_until(lambda: pool.running_code() == 1, 30, "alice's code to run")
        with pytest.raises(SandboxBusy, match=r"all 1 code interpreter kernels are running code; "
                                              r"try again in about \d+ s"):
            pool.session("bob", "10.0.0.2").execute("print('bob')")
    finally:
        worker.join(30)
    assert pool.session("bob", "10.0.0.2").execute("print('bob')").text == "bob\n"


def test_each_client_has_a_cap(make_pool):
    pool = make_pool(max_kernels=4, per_client=1)
    other = pool.session("other", "10.0.0.2")
    other.execute("x = 'other'")
    first, second = pool.session("tab-1", "10.0.0.1"), pool.session("tab-2", "10.0.0.1")
    first.execute("import time")
    assert second.execute("print(2)").text == "2\n"   # the client's own idle kernel made room
    assert len(pool) == 2 and other.execute("print(x)").text == "other\n"   # nobody else's
    worker = threading.Thread(target=second.execute, args=("import time; time.sleep(2)",))
    worker.start()
    try:
        wait_until(lambda: pool.running_code() == 1, 30, "the second tab's code to run")
        with pytest.raises(SandboxBusy, match="you already have 1 code interpreter kernels running code"):
            first.execute("print(1)")
    finally:
        worker.join(30)


def test_idle_kernels_are_closed(make_pool):
    pool = make_pool(idle_seconds=0.5)
    session = pool.session("alice", "10.0.0.1")
    session.execute("x = 1")
    assert len(pool) == 1
    wait_until(lambda: len(pool) == 0, 30, "the idle kernel to be closed")
    again = session.execute("print('fresh')")
    assert again.text == SandboxPool.REPLACED + "fresh\n"
