"""A sandboxed Jupyter kernel per browser session, for ChatGLM3's code interpreter.

In code-interpreter mode ChatGLM3 writes Python; the app runs it in an ipykernel driven through
jupyter_client (:class:`CodeSandbox`), one kernel per browser session, started on the session's
first real execution (:class:`SandboxPool`), and feeds :meth:`ExecutionResult.observation` back
to the model.

Isolation. ``sandbox_launcher.py`` (stdlib only) sets up every layer between the fork and the
exec of the kernel, so not one line of the model's code runs before they hold, and the code is
never run when one is missing (:class:`SandboxUnavailable` names it):

* its own PID, mount, network, IPC and UTS namespaces: a private ``/proc`` with only its own
  processes; the temporary directory, ``/run``, ``/dev/shm`` and ``/var/tmp`` are empty tmpfs
  mounts, so no other kernel's files, connection file or sockets (nor the host's unix sockets
  there) can be reached; no network but a loopback that is down;
* a control group (``cgroup.py``): ``max_tasks`` processes and threads, ``memory_bytes`` for
  everything its processes hold (memfd and tmpfs included);
* a scratch directory of its own, a tmpfs of ``scratch_bytes`` (the kernel's cwd and its only
  writable place), gone with the kernel;
* rlimits (address space per process, CPU seconds, size of one file, no core dumps), no
  capabilities, no_new_privs, Landlock (read only system and Python directories, write only the
  scratch) and a seccomp filter (no sockets but AF_UNIX, no setsid/setpgid, no io_uring);
* a clean environment: none of the app's variables (tokens, keys); the connection file's path is
  in the kernel's environment, not on any command line.

From the app's side: wall-clock time per execution (SIGINT to the kernel's process group, then
SIGKILL and a fresh kernel on the next run); after every execution every process the code
started is killed (the cgroup lists them); output size (text truncated, images capped); the
kernel's life: killed with its process group on :meth:`CodeSandbox.close`, on
:meth:`SandboxPool.close`, at interpreter exit, and when the app dies by any signal (the launcher's
parent-death signal kills it, its init follows, and the PID namespace goes with the init). Groups
and directories left by a dead app are removed when the next :class:`SandboxPool` is made.

What it does not do: see "Security model" in the README.
"""

from __future__ import annotations

import atexit
import base64
import json
import logging
import math
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Empty

from chatglm_web.tools import sandbox_launcher as launcher
from chatglm_web.tools.cgroup import CgroupUnavailable, KernelCgroup, remove_stale_groups

log = logging.getLogger(__name__)

__all__ = ["CodeSandbox", "ExecutionResult", "SandboxBusy", "SandboxClosed", "SandboxLimits",
           "SandboxPool", "SandboxUnavailable", "check_sandbox_support"]


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be established on this host; the message names what is missing."""


class SandboxBusy(RuntimeError):
    """No code interpreter kernel can be had now; the message says when to try again."""


class SandboxClosed(RuntimeError):
    """The sandbox was closed (its session ended)."""


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int = 1 << 30           # all memory of a kernel's processes (cgroup), and each one's address space
    max_tasks: int = 128                  # processes and threads of one kernel (cgroup pids.max)
    scratch_bytes: int = 256 << 20        # the scratch directory in total (a tmpfs; counted in memory_bytes too)
    file_bytes: int = 256 << 20           # largest file the code may write (RLIMIT_FSIZE)
    wall_seconds: float = 30.0            # per execution
    cpu_seconds: int = 60                 # over a kernel's life (RLIMIT_CPU), then it is restarted
    output_chars: int = 20_000            # text kept per execution (error text: the same again)
    max_images: int = 10                  # images kept per execution
    startup_seconds: float = 60.0         # for a kernel to answer after it is launched
    interrupt_grace_seconds: float = 3.0  # after SIGINT, before SIGKILL


@dataclass
class ExecutionResult:
    text: str             # all text output in order, truncated to limits.output_chars
    error: str | None     # the traceback (ANSI-free) or a plain account of what stopped the code
    images: list[bytes]   # PNG bytes
    timed_out: bool = False
    restarted: bool = False   # the kernel died or was killed; the next run gets a fresh one

    def observation(self) -> str:
        """What the model sees, in ChatGLM3's format; each image is written as 【image】."""
        lines = [self.text.rstrip("\n")] if self.text else []
        lines += ["【image】"] * len(self.images)
        if self.error:
            lines.append(self.error.rstrip("\n"))
        body = "\n".join(lines)
        return f"```result\n{body}\n```"


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")

# PR_SET_PDEATHSIG fires when the *thread* that forked the kernel ends, so kernels are always
# launched from this one long-lived thread, never from a request's worker thread.
_launcher_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-launcher")
_live: set[CodeSandbox] = set()
_live_lock = threading.Lock()
_CONNECTION_FILE_ENV = "CHATGLM_KERNEL_CONNECTION_FILE"

# ipykernel_launcher, less IOPub's pipe for output from forked children: that pipe binds
# tcp://127.0.0.1, and libzmq aborts (errno_assert) when the seccomp filter refuses the socket.
# Without it such output is lost, as ipykernel itself does when the bind fails. The connection
# file's path comes from the environment, so that it is on no command line. No parent poller: the
# kernel's parent is its namespace's PID 1 (which ipykernel takes for a dead parent), and it dies
# with its namespace anyway.
_KERNEL_MAIN = f"""
import os, sys
if sys.path[0] == "":
    del sys.path[0]
os.environ.pop("JPY_PARENT_PID", None)
for name in ("TMPDIR", "MPLCONFIGDIR", "XDG_CACHE_HOME"):   # the scratch is an empty tmpfs until now
    os.makedirs(os.environ[name], exist_ok=True)
from ipykernel import iostream, kernelapp
assert hasattr(iostream.IOPubThread, "_setup_pipe_in"), "ipykernel changed: update sandbox.py"
iostream.IOPubThread._setup_pipe_in = lambda self: setattr(self, "_pipe_flag", False)
kernelapp.launch_new_instance(argv=sys.argv[1:] + ["-f", os.environ.pop({_CONNECTION_FILE_ENV!r})])
"""


def _readable_paths() -> list[str]:
    """What the interpreter, ipykernel and the usual libraries need to read."""
    paths = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/dev", "/proc", "/sys",
             sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)), *site.getsitepackages()]
    if site.ENABLE_USER_SITE and site.getusersitepackages() in sys.path:
        paths.append(site.getusersitepackages())
    return list(dict.fromkeys(paths))


def sandboxes_dir() -> Path:
    """Where every kernel's directory is made: one folder, so that it can be hidden as a whole."""
    return Path(tempfile.gettempdir()) / "chatglm-sandboxes"


def _make_root() -> Path:
    base = sandboxes_dir()
    base.mkdir(mode=0o711, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-", dir=base))


def _covered_paths() -> list[str]:
    """Shared directories hidden behind an empty tmpfs in the kernel's mount namespace: the temporary
    directory (other kernels' directories are in it; only their folder when the Python installation is
    there too) and the host's runtime directories with their unix sockets (/run, /dev/shm, /var/tmp)."""
    readable = [os.path.realpath(p) for p in _readable_paths()]

    def holds_readable(path: str) -> bool:
        return path == "/" or any(p == path or p.startswith(path + "/") for p in readable)

    tmp = os.path.realpath(tempfile.gettempdir())
    covered = [tmp if not holds_readable(tmp) else os.path.realpath(sandboxes_dir())]
    for path in ("/run", "/dev/shm", "/var/tmp"):
        real = os.path.realpath(path)
        if os.path.isdir(path) and not os.path.islink(path) and real not in covered and not holds_readable(real):
            covered.append(real)
    return covered


def _launch_env(limits: SandboxLimits, root: Path, run_dir: Path | None, cgroup: KernelCgroup) -> dict[str, str]:
    """The kernel's environment, and the launcher's configuration in it (the launcher removes it)."""
    scratch = root / "scratch"
    config = {"parent_pid": os.getpid(), "memory_bytes": limits.memory_bytes,
              "cpu_seconds": limits.cpu_seconds, "file_bytes": limits.file_bytes,
              "scratch_bytes": limits.scratch_bytes, "min_landlock_abi": launcher.MIN_LANDLOCK_ABI,
              "read": _readable_paths(), "cover": _covered_paths(), "scratch_dir": str(scratch),
              "run_dir": str(run_dir) if run_dir else None, "cgroup_procs": cgroup.procs_files}
    env = _kernel_env(scratch)
    env[launcher.CONFIG_ENV] = json.dumps(config)
    return env


def _launcher_argv(command: list[str]) -> list[str]:
    return [sys.executable, "-I", "-S", launcher.__file__, "--", *command]


def _kernel_env(scratch: Path) -> dict[str, str]:
    """A clean environment: nothing of the app's (tokens, keys), every dot-dir in the scratch dir."""
    bindir = os.path.dirname(os.path.realpath(sys.executable))
    env = {"PATH": os.pathsep.join([bindir, "/usr/local/bin", "/usr/bin", "/bin"]),
           "HOME": str(scratch), "TMPDIR": str(scratch / ".tmp"),
           "MPLCONFIGDIR": str(scratch / ".config" / "matplotlib"),
           "XDG_CACHE_HOME": str(scratch / ".cache"), "XDG_CONFIG_HOME": str(scratch / ".config"),
           "XDG_DATA_HOME": str(scratch / ".local" / "share"), "IPYTHONDIR": str(scratch / ".ipython"),
           "JUPYTER_CONFIG_DIR": str(scratch / ".jupyter"), "JUPYTER_PLATFORM_DIRS": "1",
           "JUPYTER_DATA_DIR": str(scratch / ".local" / "share" / "jupyter"),
           "JUPYTER_RUNTIME_DIR": str(scratch / ".local" / "share" / "jupyter" / "runtime"),
           "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1",
           "PYDEVD_DISABLE_FILE_VALIDATION": "1", "MALLOC_ARENA_MAX": "2",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if site.ENABLE_USER_SITE and site.getusersitepackages() in sys.path:
        env["PYTHONPATH"] = site.getusersitepackages()   # HOME moved; keep the app's user site
    return env


def _log_tail(path: Path, size: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _unavailable_reason(log_text: str) -> str:
    reasons = re.findall(r"^sandbox unavailable: (.*)$", log_text, re.M)
    return reasons[-1] if reasons else log_text


_PROBE = """
import os, socket, sys
try:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
except PermissionError:
    pass
else:
    sys.exit('an AF_INET socket was allowed')
try:
    open('/etc/chatglm-sandbox-probe', 'w')
except PermissionError:
    pass
else:
    sys.exit('a write outside the sandbox was allowed')
if os.getpid() != 2 or sorted(p for p in os.listdir('/proc') if p.isdigit()) != ['1', '2']:
    sys.exit('the kernel sees processes outside its PID namespace')
open('probe.txt', 'w').write('ok')
"""


def check_sandbox_support() -> None:
    """Raise SandboxUnavailable naming what is missing, after setting up every layer for a probe."""
    root = _make_root()
    try:
        (root / "scratch").mkdir()
        try:
            group = KernelCgroup.create(root.name, memory_bytes=256 << 20, max_tasks=16)
        except CgroupUnavailable as exc:
            raise SandboxUnavailable(f"code interpreter sandbox: {exc}") from None
        try:
            env = _launch_env(SandboxLimits(), root, None, group)
            proc = _launcher_thread.submit(
                subprocess.run, _launcher_argv([sys.executable, "-I", "-S", "-c", _PROBE]), cwd=root / "scratch",
                capture_output=True, text=True, timeout=60, env=env).result()
        finally:
            group.remove()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if proc.returncode == launcher.EXIT_UNAVAILABLE:
        raise SandboxUnavailable(f"code interpreter sandbox: {_unavailable_reason(proc.stderr)}")
    if proc.returncode != 0:
        raise SandboxUnavailable(f"code interpreter sandbox self-test failed: {proc.stderr.strip()}")
    log.info("code interpreter %s", proc.stderr.strip())


class _Output:
    """Collects one execution's output within the limits."""

    def __init__(self, limits: SandboxLimits):
        self.limits = limits
        self.parts: list[str] = []
        self.size = self.omitted = self.images_omitted = 0
        self.images: list[bytes] = []
        self.error: str | None = None

    def add_text(self, text: str) -> None:
        text = _ANSI.sub("", text)
        room = max(self.limits.output_chars - self.size, 0)
        self.parts.append(text[:room])
        self.size += min(len(text), room)
        self.omitted += max(len(text) - room, 0)

    def add_data(self, data: dict) -> None:
        if "image/png" in data:
            if len(self.images) < self.limits.max_images:
                self.images.append(base64.b64decode(data["image/png"]))
            else:
                self.images_omitted += 1
        elif "text/plain" in data:
            self.add_text(data["text/plain"].rstrip("\n") + "\n")

    def set_error(self, content: dict) -> None:
        error = _ANSI.sub("", "\n".join(content.get("traceback") or [])).strip()
        error = error or f"{content.get('ename', 'Error')}: {content.get('evalue', '')}"
        limit = self.limits.output_chars
        if len(error) > limit:
            error = f"[traceback truncated: {len(error) - limit} characters not shown]\n" + error[-limit:]
        self.error = error

    def result(self, **flags) -> ExecutionResult:
        text = "".join(self.parts)
        if self.omitted:
            text += (f"\n[output truncated to {self.limits.output_chars} characters: "
                     f"{self.omitted} more not shown]\n")
        if self.images_omitted:
            text += f"[{self.images_omitted} more images not shown]\n"
        return ExecutionResult(text=text, error=self.error, images=self.images, **flags)


def _death_account(returncode: int | None, limits: SandboxLimits, out_of_memory: bool = False) -> str:
    if out_of_memory:
        return (f"the kernel ran out of memory (its processes may hold {limits.memory_bytes >> 20} MiB in all) "
                "and was restarted")
    if returncode == -signal.SIGXCPU:
        return f"the kernel used up its CPU time ({limits.cpu_seconds} s) and was restarted"
    if returncode == -signal.SIGKILL:
        return "the kernel was killed (out of memory or CPU time) and was restarted"
    if returncode is not None and returncode < 0:
        return (f"the kernel crashed ({signal.Signals(-returncode).name}; it may have run out of "
                "memory) and was restarted")
    return f"the kernel exited (status {returncode}) and was restarted"


_DIR_PREFIX = "chatglm-sandbox-"   # + the app's pid + "-" + random: directories and control groups


def _app_alive(name: str) -> bool:
    """Whether the app that made the directory or group ``name`` is still running."""
    pid = name[len(_DIR_PREFIX):].split("-")[0]
    if not pid.isdigit():
        return True   # not one of ours: leave it
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers() -> None:
    """Delete the control groups and directories of sandboxes whose app died (SIGKILL, a crash)."""
    with _live_lock:
        ours = {sandbox._root.name for sandbox in _live}
    removed = remove_stale_groups(_DIR_PREFIX, lambda name: name in ours or _app_alive(name))
    for path in sandboxes_dir().glob(f"{_DIR_PREFIX}*-*"):
        if path.name in ours or path.stat().st_uid != os.getuid() or _app_alive(path.name):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    if removed:
        log.info("removed %d code interpreter sandbox leftovers of a dead app", removed)


class CodeSandbox:
    """One sandboxed kernel. execute() starts it lazily; one execution at a time."""

    def __init__(self, limits: SandboxLimits | None = None):
        self.limits = limits or SandboxLimits()
        self._root = _make_root()
        self.scratch_dir = self._root / "scratch"   # the kernel's cwd (a tmpfs in its mount namespace)
        self._run_dir = self._root / "run"          # connection file, sockets, kernel log
        self.scratch_dir.mkdir()
        self._run_dir.mkdir()
        self._lock = threading.Lock()               # one execution (or start, or close) at a time
        self._km = self._client = self._cgroup = None
        self._pgid: int | None = None
        self._kernel_pid: int | None = None
        self._closed = False
        with _live_lock:
            _live.add(self)

    @property
    def kernel_pid(self) -> int | None:
        """The running kernel's pid as the app sees it (PID 2 in its own namespace), None before it starts."""
        return self._kernel_pid

    @property
    def running(self) -> bool:
        return self._km is not None

    def execute(self, code: str) -> ExecutionResult:
        with self._lock:
            if self._closed:
                raise SandboxClosed("the code interpreter session was closed")
            if self._km is None:
                self._start()
            return self._run(code)

    def close(self) -> None:
        """Kill the kernel (its whole process group) and delete its directories."""
        self._closed = True
        self._kill_group()            # ends a running execute() at once
        with self._lock:
            self._discard()
            shutil.rmtree(self._root, ignore_errors=True)
        with _live_lock:
            _live.discard(self)

    def _kill_group(self) -> None:
        if self._pgid is not None:
            try:
                os.killpg(self._pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _start(self) -> None:
        from jupyter_client import KernelManager
        from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

        try:
            self._cgroup = KernelCgroup.create(self._root.name, memory_bytes=self.limits.memory_bytes,
                                               max_tasks=self.limits.max_tasks)
        except CgroupUnavailable as exc:
            raise SandboxUnavailable(f"code interpreter sandbox: {exc}") from None
        connection_file = self._run_dir / "connection.json"
        env = _launch_env(self.limits, self._root, self._run_dir, self._cgroup)
        env[_CONNECTION_FILE_ENV] = str(connection_file)
        kernel = [sys.executable, "-c", _KERNEL_MAIN, "--HistoryManager.enabled=False",
                  "--InteractiveShell.xmode=Plain"]
        spec = KernelSpec(argv=_launcher_argv(kernel), display_name="sandbox", language="python",
                          interrupt_mode="signal")

        class OneSpec(KernelSpecManager):
            def get_kernel_spec(self, kernel_name):
                return spec

        km = KernelManager(kernel_spec_manager=OneSpec(), transport="ipc", ip=str(self._run_dir / "zmq"),
                           connection_file=str(connection_file))
        log_path = self._run_dir / "kernel.log"
        with open(log_path, "ab") as log_file:
            _launcher_thread.submit(km.start_kernel, env=env, cwd=str(self.scratch_dir), stdout=log_file,
                                    stderr=log_file).result()
        self._km, self._pgid = km, km.provisioner.pid
        self._client = km.blocking_client()
        self._client.start_channels()
        try:
            self._client.wait_for_ready(timeout=self.limits.startup_seconds)
        except RuntimeError as exc:
            returncode = km.provisioner.process.poll() if km.provisioner.process else None
            self._discard()
            text = _log_tail(log_path)
            if returncode == launcher.EXIT_UNAVAILABLE:
                raise SandboxUnavailable(f"code interpreter sandbox: {_unavailable_reason(text)}") from None
            raise RuntimeError(f"the code interpreter's kernel did not start ({exc}): {text}") from None
        members = self._cgroup.members()
        self._kernel_pid = next((pid for pid, ns_pid in members.items() if ns_pid == launcher.KERNEL_PID), None)
        log.debug("code interpreter kernel %s started: %s", self._kernel_pid, _log_tail(log_path, 300))

    def _discard(self) -> None:
        """Kill the kernel, reap it, remove its control group, connection file and sockets."""
        km, client, group = self._km, self._client, self._cgroup
        self._km = self._client = self._cgroup = None
        self._kill_group()
        self._pgid = self._kernel_pid = None
        if client is not None:
            client.stop_channels()
        if km is not None:
            km.shutdown_kernel(now=True)
        if group is not None:
            group.remove()

    def _end_strays(self) -> None:
        """Kill every process the code started (they are in the kernel's cgroup): none outlives its cell."""
        if self._cgroup is not None and not self._cgroup.kill(keep={launcher.INIT_PID, launcher.KERNEL_PID}):
            log.warning("code interpreter: processes started by the code survived 5 s of SIGKILL")

    def _run(self, code: str) -> ExecutionResult:
        limits, km, client = self.limits, self._km, self._client
        out = _Output(limits)
        msg_id = client.execute(code, allow_stdin=False)
        deadline = time.monotonic() + limits.wall_seconds
        interrupted = False
        while True:
            if self._closed:
                self._discard()
                raise SandboxClosed("the code interpreter session was closed")
            now = time.monotonic()
            if now >= deadline and not interrupted:   # SIGINT to the group; KeyboardInterrupt
                km.interrupt_kernel()
                interrupted, deadline = True, now + limits.interrupt_grace_seconds
            elif now >= deadline:                     # deaf to SIGINT: kill it
                self._discard()
                out.error = (f"the code ran longer than {limits.wall_seconds:g} s and was stopped; "
                             "the kernel had to be restarted, so variables and imports are lost")
                return out.result(timed_out=True, restarted=True)
            try:
                msg = client.get_iopub_msg(timeout=min(1.0, max(deadline - now, 0.01)))
            except Empty:
                # close() sets _closed before it kills: a death it caused is seen as a close
                if km.is_alive() or self._closed:
                    continue
                returncode = km.provisioner.process.poll() if km.provisioner.process else None
                out_of_memory = self._cgroup is not None and self._cgroup.oom_kills() > 0
                self._discard()
                out.error = _death_account(returncode, limits, out_of_memory)
                return out.result(restarted=True)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.add_text(content["text"])
            elif kind in ("execute_result", "display_data"):
                out.add_data(content["data"])
            elif kind == "error":
                out.set_error(content)
            elif kind == "status" and content["execution_state"] == "idle":
                break
        self._drain_reply(msg_id)
        self._end_strays()
        if interrupted:
            out.error = f"the code ran longer than {limits.wall_seconds:g} s and was stopped"
        return out.result(timed_out=interrupted)

    def _drain_reply(self, msg_id: str) -> None:
        """Read the execute_reply (sent before idle) so that replies do not pile up."""
        while True:
            try:
                reply = self._client.get_shell_msg(timeout=1)
            except Empty:
                return
            if reply["parent_header"].get("msg_id") == msg_id:
                return


@dataclass
class _Kernel:
    box: CodeSandbox
    client: str | None
    last_used: float
    busy_since: float | None = None   # set while it runs code


class SessionKernel:
    """A browser session's handle on the pool: the kernel is only taken by the first execute()."""

    def __init__(self, pool: "SandboxPool", session_id: str, client: str | None):
        self.pool, self.session_id, self.client = pool, session_id, client

    def execute(self, code: str) -> ExecutionResult:
        return self.pool.execute(self.session_id, code, client=self.client)


class SandboxPool:
    """Kernels for browser sessions: a session gets one on its first execution, not before.

    At most ``max_kernels`` run at once and ``per_client`` per client (an IP address). A kernel idle
    for ``idle_seconds`` is closed. When no room is left, the least recently used kernel that is not
    running code is closed to make room (its session gets a fresh one and is told so); when every
    kernel is running code, SandboxBusy says when one is due to be free."""

    REPLACED = ("[the previous kernel of this conversation was idle and was closed to make room; "
                "variables and imports from before are gone]\n")

    def __init__(self, limits: SandboxLimits | None = None, max_kernels: int = 8, per_client: int = 2,
                 idle_seconds: float = 600.0):
        _remove_leftovers()
        self.limits = limits or SandboxLimits()
        self.max_kernels, self.per_client, self.idle_seconds = max_kernels, per_client, idle_seconds
        self._kernels: dict[str, _Kernel] = {}
        self._replaced: OrderedDict[str, None] = OrderedDict()   # sessions whose kernel was closed for them
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._close_idle_loop, name="sandbox-idle", daemon=True).start()

    def session(self, session_id: str, client: str | None = None) -> SessionKernel:
        return SessionKernel(self, session_id, client)

    def execute(self, session_id: str, code: str, client: str | None = None) -> ExecutionResult:
        kernel, victims = self._take(session_id, client)
        for victim in victims:
            victim.close()
        try:
            result = kernel.box.execute(code)
        finally:
            with self._lock:
                kernel.busy_since, kernel.last_used = None, time.monotonic()
        with self._lock:
            replaced = session_id in self._replaced
            self._replaced.pop(session_id, None)
        if replaced:
            result.text = self.REPLACED + result.text
        return result

    def _take(self, session_id: str, client: str | None) -> tuple[_Kernel, list[CodeSandbox]]:
        now = time.monotonic()
        with self._lock:
            if self._closed.is_set():
                raise SandboxClosed("the code interpreter was shut down")
            kernel = self._kernels.get(session_id)
            victims = []
            if kernel is None:
                mine = [s for s, k in self._kernels.items() if client is not None and k.client == client]
                if len(mine) >= self.per_client:
                    victims.append(self._reclaim(mine, now, f"you already have {self.per_client} code "
                                                 "interpreter kernels running code"))
                elif len(self._kernels) >= self.max_kernels:
                    victims.append(self._reclaim(list(self._kernels), now, f"all {self.max_kernels} code "
                                                 "interpreter kernels are running code"))
                kernel = self._kernels[session_id] = _Kernel(CodeSandbox(self.limits), client, now)
            elif kernel.busy_since is not None:
                raise SandboxBusy("this conversation's kernel is still running code; try again when it is done")
            kernel.busy_since = now
            return kernel, victims

    def _reclaim(self, sessions: list[str], now: float, why: str) -> CodeSandbox:
        """Take the least recently used idle kernel among ``sessions`` (lock held); SandboxBusy if none."""
        idle = [s for s in sessions if self._kernels[s].busy_since is None]
        if not idle:
            due = min(self._kernels[s].busy_since for s in sessions) + self.limits.wall_seconds
            wait = max(1, math.ceil(due + self.limits.interrupt_grace_seconds - now))
            raise SandboxBusy(f"{why}; try again in about {wait} s")
        victim = min(idle, key=lambda s: self._kernels[s].last_used)
        self._mark_replaced(victim)
        return self._kernels.pop(victim).box

    def _mark_replaced(self, session_id: str) -> None:
        self._replaced[session_id] = None
        while len(self._replaced) > 10_000:
            self._replaced.popitem(last=False)

    def close_idle(self) -> int:
        """Close the kernels idle for ``idle_seconds``; how many were closed."""
        now = time.monotonic()
        with self._lock:
            expired = [s for s, k in self._kernels.items()
                       if k.busy_since is None and now - k.last_used >= self.idle_seconds]
            boxes = [self._kernels.pop(s).box for s in expired]
            for session_id in expired:
                self._mark_replaced(session_id)
        for box in boxes:
            box.close()
        return len(boxes)

    def _close_idle_loop(self) -> None:
        while not self._closed.wait(min(30.0, max(self.idle_seconds / 4, 0.05))):
            try:
                self.close_idle()
            except Exception:   # never let the closer die
                log.exception("closing idle code interpreter kernels failed")

    def close(self, session_id: str) -> None:
        with self._lock:
            kernel = self._kernels.pop(session_id, None)
            self._replaced.pop(session_id, None)
        if kernel is not None:
            kernel.box.close()

    def close_all(self) -> None:
        self._closed.set()
        with self._lock:
            kernels, self._kernels = list(self._kernels.values()), {}
        for kernel in kernels:
            kernel.box.close()

    def running_code(self) -> int:
        """How many kernels are running code now."""
        with self._lock:
            return sum(kernel.busy_since is not None for kernel in self._kernels.values())

    def __len__(self) -> int:
        """How many kernels are held (started, or starting)."""
        return len(self._kernels)


@atexit.register
def _kill_all_at_exit() -> None:
    """No waiting at exit (an execution may hold its lock): kill the groups, delete the dirs."""
    with _live_lock:
        sandboxes = list(_live)
    for sandbox in sandboxes:
        sandbox._closed = True
        sandbox._kill_group()
        if sandbox._cgroup is not None:
            sandbox._cgroup.remove(timeout=1.0)
        shutil.rmtree(sandbox._root, ignore_errors=True)
