"""A sandboxed Jupyter kernel per browser session, for ChatGLM3's code interpreter.

In code-interpreter mode ChatGLM3 writes Python; the app runs it with :meth:`CodeSandbox.execute`
in an ipykernel driven through jupyter_client, one kernel per browser session
(:class:`SandboxPool`), and feeds :meth:`ExecutionResult.observation` back to the model.

Isolation layers. All but the last are put in place by this very file, run as a tiny launcher
(``python -I -S sandbox.py --bootstrap CONFIG -- python -c <ipykernel_launcher> ...``) between the
fork and the exec of the kernel, so not one line of the model's code runs before they hold. If
a required layer cannot be set up the launcher exits and :class:`SandboxUnavailable` names what
is missing: the code is never run unsandboxed.

1. seccomp filter (required): ``socket()``/``socketpair()`` fail with EACCES for every address
   family but AF_UNIX, so no IPv4/IPv6/packet/netlink socket can even be created; io_uring is
   refused (it could open sockets past the filter); ``setsid()``/``setpgid()`` are refused, so
   every process the code starts stays in the kernel's process group and is killed with it;
   the parent-death signal cannot be cleared; 32-bit and x32 system call entry points are refused.
2. Landlock (required, ABI >= 3, i.e. Linux >= 6.2): read/execute only under the system and
   Python directories, write only in the session's scratch directory (and /dev/null). This holds
   for root too. Landlock also stops the kernel from ptrace-ing or reading ``/proc/PID/environ``
   or ``mem`` of processes outside its sandbox (the app and other sessions' kernels). From
   ABI 4 TCP bind/connect are refused as well (a second net layer); from ABI 6 signals to
   processes outside the sandbox (e.g. killing the app) and abstract unix sockets outside it.
3. No capabilities: the bounding, ambient, inheritable, permitted and effective sets are emptied
   and no_new_privs is set, so a root app still gets a kernel without any privilege.
4. Resource limits (setrlimit): address space (``memory_bytes``), CPU seconds over the kernel's
   life (``cpu_seconds``), size of any one file written (``file_bytes``), no core dumps.
5. A new network namespace (only a down loopback) when the host allows one (root, or
   unprivileged user namespaces). Best effort: layers 1 and 2 already keep the network out.
6. A clean environment (none of the app's variables such as HF_TOKEN), HOME, TMPDIR and the
   matplotlib/IPython/Jupyter config and cache dirs inside the scratch directory, and ZeroMQ over
   unix sockets (``ipc``) in a private directory, so the kernel needs no TCP at all.

From the app's side: wall-clock time per execution (SIGINT to the kernel's process group, then
SIGKILL and a fresh kernel on the next run), output size (text truncated, images capped), and
the kernel's lifetime: killed with its process group on :meth:`CodeSandbox.close`, on
:meth:`SandboxPool.close`, at interpreter exit, and (``PR_SET_PDEATHSIG``) when the app dies.

What this does not do, honestly:

* Unix sockets that exist as files and are writable (a Docker socket, nscd, D-Bus) can still be
  connected to; Landlock cannot refuse connect() on them yet. Keep such sockets out of the app's
  container.
* Reading is allowed under /usr, /etc, /proc, /sys and the Python installation: world-readable
  files there (and root-owned ones, if the app runs as root) can be read.
* After the app itself is killed (SIGKILL, a crash) its kernels die but their directories stay
  until the next SandboxPool is made, which deletes those of dead apps.
* Limits are per process, not per session: a kernel that starts children multiplies its memory
  and CPU allowance (there is no cgroup), and the scratch directory is limited per file, not in
  total. Processes of the kernel are all killed with it, though (layer 1).
* Without Landlock ABI 6 (Linux < 6.12) the kernel may send signals to other processes of the
  same user, the app included.
* /dev/shm is not writable (it is shared by all sessions), so multiprocessing's locks and pools
  fail with PermissionError; output printed by forked children is not shown (see _KERNEL_MAIN).
  /proc/PID/cmdline of every process stays readable, as it is for any unprivileged process.

This file is also the launcher, so it imports only the standard library at module level.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import json
import logging
import os
import re
import resource
import shutil
import signal
import site
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Empty

log = logging.getLogger(__name__)

__all__ = ["CodeSandbox", "ExecutionResult", "SandboxBusy", "SandboxClosed", "SandboxLimits",
           "SandboxPool", "SandboxUnavailable", "check_sandbox_support"]


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be established on this host; the message names what is missing."""


class SandboxBusy(RuntimeError):
    """Every code interpreter kernel the pool allows is in use."""


class SandboxClosed(RuntimeError):
    """The sandbox was closed (its session ended)."""


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int = 1 << 30           # address space of each kernel process (RLIMIT_AS)
    wall_seconds: float = 30.0            # per execution
    cpu_seconds: int = 60                 # over a kernel's life (RLIMIT_CPU), then it is restarted
    output_chars: int = 20_000            # text kept per execution (error text: the same again)
    file_bytes: int = 256 << 20           # largest file the code may write (RLIMIT_FSIZE)
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


# --------------------------------------------------------------------------------------------
# The launcher: runs in the child between fork and the exec of ipykernel.

_EXIT_UNAVAILABLE = 78  # EX_CONFIG: a required sandbox layer could not be set up

_PR_SET_PDEATHSIG, _PR_SET_SECCOMP, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 22, 24, 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_AF_UNIX = 1

# Landlock (linux/landlock.h); the syscall numbers are the same on all 64-bit architectures.
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_LL_MAKE_SOCK, _LL_REFER, _LL_TRUNCATE = 1 << 9, 1 << 13, 1 << 14
_LL_FILE_RIGHTS = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | _LL_TRUNCATE
_LL_READ = _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR
_LL_NET_TCP = 1 | 2                     # BIND_TCP | CONNECT_TCP, ABI 4
_LL_SCOPE = 1 | 2                       # ABSTRACT_UNIX_SOCKET | SIGNAL, ABI 6
_MIN_LANDLOCK_ABI = 3                   # TRUNCATE: below it, truncate(2) outside could not be refused

# Per architecture: seccomp's AUDIT_ARCH, and the numbers of the system calls the filter handles.
_ARCHES = {
    "x86_64": dict(audit=0xC000003E, x32=True, socket=41, socketpair=53, prctl=157, setsid=112,
                   setpgid=109, io_uring=(425, 426, 427), keys=(248, 249, 250)),
    "aarch64": dict(audit=0xC00000B7, x32=False, socket=198, socketpair=199, prctl=167, setsid=157,
                    setpgid=154, io_uring=(425, 426, 427), keys=(217, 218, 219)),
}


class _Unavailable(Exception):
    pass


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    return libc


def _check(what: str, result: int) -> int:
    if result < 0:
        raise _Unavailable(f"{what} failed: {os.strerror(ctypes.get_errno())}")
    return result


def _seccomp_program(arch: dict) -> list[tuple[int, int, int, int]]:
    """A classic BPF program over struct seccomp_data (nr at 0, arch at 4, args[0] at 16)."""
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, eperm, eacces = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 13
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch["audit"]), (ret, 0, 0, eperm),  # 32-bit entry points
            (ld, 0, 0, 0)]
    if arch["x32"]:
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]
    for nr in (arch["socket"], arch["socketpair"]):     # only AF_UNIX
        prog += [(jeq, 0, 4, nr), (ld, 0, 0, 16), (jeq, 0, 1, _AF_UNIX), (ret, 0, 0, allow),
                 (ret, 0, 0, eacces)]
    prog += [(jeq, 0, 4, arch["prctl"]), (ld, 0, 0, 16), (jeq, 0, 1, _PR_SET_PDEATHSIG),
             (ret, 0, 0, eperm), (ld, 0, 0, 0)]
    for nr in (arch["setsid"], arch["setpgid"], *arch["io_uring"], *arch["keys"]):
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    return prog + [(ret, 0, 0, allow)]


def _install_seccomp(libc, arch: dict) -> None:
    prog = _seccomp_program(arch)
    filters = (_SockFilter * len(prog))(*(_SockFilter(*insn) for insn in prog))
    fprog = _SockFprog(len(prog), filters)
    _check("seccomp (prctl PR_SET_SECCOMP; a kernel with CONFIG_SECCOMP_FILTER is needed)",
           libc.prctl(_PR_SET_SECCOMP, 2, ctypes.addressof(fprog), 0, 0))


def _install_landlock(libc, config: dict) -> list[str]:
    abi = libc.syscall(ctypes.c_long(_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                       ctypes.c_uint32(1))
    if abi < 0:
        raise _Unavailable("Landlock is not available (Linux >= 6.2 with the landlock LSM "
                           f"enabled is needed): {os.strerror(ctypes.get_errno())}")
    if abi < config["min_landlock_abi"]:
        raise _Unavailable(f"Landlock ABI {abi} is too old: ABI >= {config['min_landlock_abi']}"
                           " (Linux >= 6.2) is needed to refuse writes and truncation")
    fs = (1 << 13) - 1 | (_LL_REFER if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0)
    attr = _RulesetAttr(fs, _LL_NET_TCP if abi >= 4 else 0, _LL_SCOPE if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _check("landlock_create_ruleset", libc.syscall(
        ctypes.c_long(_LANDLOCK_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size),
        ctypes.c_uint32(0)))

    def allow(path: str, rights: int) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                rights &= _LL_FILE_RIGHTS
            rule = _PathBeneath(rights & fs, fd)
            _check(f"landlock_add_rule({path})", libc.syscall(
                ctypes.c_long(_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset), ctypes.c_int(1),
                ctypes.byref(rule), ctypes.c_uint32(0)))
        finally:
            os.close(fd)

    for path in config["read"]:
        allow(path, _LL_READ)
    for path in config["socket_dirs"]:
        allow(path, _LL_READ | _LL_MAKE_SOCK)
    for path in config["write"]:
        allow(path, fs)
    _check("landlock_restrict_self", libc.syscall(
        ctypes.c_long(_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)))
    os.close(ruleset)
    return [f"landlock ABI {abi}" + (" (+TCP)" if abi >= 4 else "") + (" (+scopes)" if abi >= 6 else "")]


def _new_network_namespace(libc) -> list[str]:
    """Best effort: a network namespace of its own (directly when privileged, else in a user ns)."""
    if libc.unshare(ctypes.c_int(_CLONE_NEWNET)) == 0:
        return ["network namespace"]
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(ctypes.c_int(_CLONE_NEWUSER | _CLONE_NEWNET)) != 0:
        return []
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    return ["user+network namespace"]


def _drop_capabilities(libc) -> None:
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last_cap + 1):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)    # EPERM without CAP_SETPCAP: nothing to drop
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)     # _LINUX_CAPABILITY_VERSION_3, this process
    _check("capset", libc.capset(header, (ctypes.c_uint32 * 6)()))
    status = Path("/proc/self/status").read_text()
    held = re.findall(r"^Cap(?:Inh|Prm|Eff|Amb):\s*([0-9a-f]+)$", status, re.M)
    if len(held) != 4 or any(int(mask, 16) for mask in held):
        raise _Unavailable("could not drop all capabilities")


def _set_limit(limit: int, soft: int, extra: int = 0) -> None:
    """soft, and soft + extra as the hard limit, neither above the hard limit already in force."""
    cap = resource.getrlimit(limit)[1]
    hard = soft + extra if cap == resource.RLIM_INFINITY else min(soft + extra, cap)
    resource.setrlimit(limit, (min(soft, hard), hard))


def _enter_sandbox(config: dict) -> list[str]:
    """Every layer, in an order where each step still has the rights it needs."""
    libc = _libc()
    _check("prctl(PR_SET_PDEATHSIG)", libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))
    if os.getppid() != config["parent_pid"]:   # the app died before the line above
        os._exit(1)
    arch = _ARCHES.get(os.uname().machine)
    if arch is None:
        raise _Unavailable(f"no seccomp filter for the {os.uname().machine} architecture")
    _set_limit(resource.RLIMIT_AS, config["memory_bytes"])
    _set_limit(resource.RLIMIT_CPU, config["cpu_seconds"], extra=1)   # SIGXCPU, then SIGKILL
    _set_limit(resource.RLIMIT_FSIZE, config["file_bytes"])
    _set_limit(resource.RLIMIT_CORE, 0)
    layers = ["rlimits"] + _new_network_namespace(libc)
    _drop_capabilities(libc)
    # no exec may grant privileges again (set-uid, file capabilities); both filters need it
    _check("prctl(PR_SET_NO_NEW_PRIVS)", libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
    layers += ["no capabilities"] + _install_landlock(libc, config)
    _install_seccomp(libc, arch)
    return layers + ["seccomp"]


def _bootstrap(argv: list[str]) -> None:
    config, command = json.loads(argv[0]), argv[2:]
    try:
        layers = _enter_sandbox(config)
    except Exception as exc:   # fail closed, with the reason on stderr for the app to read
        print(f"sandbox unavailable: {exc}", file=sys.stderr, flush=True)
        os._exit(_EXIT_UNAVAILABLE)
    print(f"sandbox layers: {', '.join(layers)}", file=sys.stderr, flush=True)
    os.execv(command[0], command)


# --------------------------------------------------------------------------------------------
# The app's side.

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")

# PR_SET_PDEATHSIG fires when the *thread* that forked the kernel ends, so kernels are always
# launched from this one long-lived thread, never from a request's worker thread.
_launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-launcher")
_live: set[CodeSandbox] = set()
_live_lock = threading.Lock()


# ipykernel_launcher, less IOPub's pipe for output from forked children: that pipe binds
# tcp://127.0.0.1, and libzmq aborts (errno_assert) when the seccomp filter refuses the socket.
# Without it such output is lost, as ipykernel itself does when the bind fails.
_KERNEL_MAIN = """
import sys
if sys.path[0] == "":
    del sys.path[0]
from ipykernel import iostream, kernelapp
assert hasattr(iostream.IOPubThread, "_setup_pipe_in"), "ipykernel changed: update sandbox.py"
iostream.IOPubThread._setup_pipe_in = lambda self: setattr(self, "_pipe_flag", False)
kernelapp.launch_new_instance()
"""


def _readable_paths() -> list[str]:
    """What the interpreter, ipykernel and the usual libraries need to read."""
    paths = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/dev", "/proc", "/sys",
             sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)), *site.getsitepackages()]
    if site.ENABLE_USER_SITE and site.getusersitepackages() in sys.path:
        paths.append(site.getusersitepackages())
    return list(dict.fromkeys(paths))


def _launch_config(limits: SandboxLimits, write_dir: Path, socket_dir: Path | None) -> dict:
    return {"parent_pid": os.getpid(), "memory_bytes": limits.memory_bytes,
            "cpu_seconds": limits.cpu_seconds, "file_bytes": limits.file_bytes,
            "min_landlock_abi": _MIN_LANDLOCK_ABI, "read": _readable_paths(),
            "write": [str(write_dir), os.devnull],
            "socket_dirs": [str(socket_dir)] if socket_dir else []}


def _launcher_argv(config: dict, command: list[str]) -> list[str]:
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), "--bootstrap",
            json.dumps(config), "--", *command]


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
    for name in ("TMPDIR", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
        os.makedirs(env[name], exist_ok=True)
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


def check_sandbox_support() -> None:
    """Raise SandboxUnavailable naming what is missing, after trying every layer in a child."""
    probe = ("import socket, sys\n"
             "try:\n    socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
             "except PermissionError:\n    pass\nelse:\n    sys.exit('an AF_INET socket was allowed')\n"
             "try:\n    open(sys.argv[1], 'w')\n"
             "except PermissionError:\n    pass\nelse:\n    sys.exit('a write outside the sandbox was allowed')\n")
    with tempfile.TemporaryDirectory(prefix="chatglm-sandbox-check-") as tmp:
        write_dir = Path(tmp) / "scratch"
        write_dir.mkdir()
        argv = _launcher_argv(_launch_config(SandboxLimits(), write_dir, None),
                              [sys.executable, "-I", "-S", "-c", probe, str(Path(tmp) / "outside")])
        proc = subprocess.run(argv, cwd=write_dir, capture_output=True, text=True,
                                            timeout=60, env=_kernel_env(write_dir))
    if proc.returncode == _EXIT_UNAVAILABLE:
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


def _death_account(returncode: int | None, limits: SandboxLimits) -> str:
    if returncode == -signal.SIGXCPU:
        return f"the kernel used up its CPU time ({limits.cpu_seconds} s) and was restarted"
    if returncode == -signal.SIGKILL:
        return "the kernel was killed (out of memory or CPU time) and was restarted"
    if returncode is not None and returncode < 0:
        return (f"the kernel crashed ({signal.Signals(-returncode).name}; it may have run out of "
                "memory) and was restarted")
    return f"the kernel exited (status {returncode}) and was restarted"


_DIR_PREFIX = "chatglm-sandbox-"   # + the app's pid + "-" + random


def _remove_stale_dirs() -> None:
    """Delete the directories of sandboxes whose app died without cleaning up (SIGKILL, a crash)."""
    with _live_lock:
        ours = {sandbox._root for sandbox in _live}
    for path in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*-*"):
        pid = path.name[len(_DIR_PREFIX):].split("-")[0]
        if not pid.isdigit() or path in ours or path.stat().st_uid != os.getuid():
            continue
        try:
            if int(pid) != os.getpid():
                os.kill(int(pid), 0)
                continue   # its app is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(path, ignore_errors=True)


class CodeSandbox:
    """One sandboxed kernel. execute() starts it lazily; one execution at a time."""

    def __init__(self, limits: SandboxLimits | None = None):
        self.limits = limits or SandboxLimits()
        self._root = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-"))
        self.scratch_dir = self._root / "scratch"   # the kernel's cwd, its only writable place
        self._run_dir = self._root / "run"          # connection file, sockets, kernel log
        self.scratch_dir.mkdir()
        self._run_dir.mkdir()
        self._lock = threading.Lock()               # one execution (or start, or close) at a time
        self._km = self._client = None
        self._pgid: int | None = None
        self._closed = False
        with _live_lock:
            _live.add(self)

    @property
    def kernel_pid(self) -> int | None:
        """The running kernel's pid (it leads its own process group), None before it starts."""
        return self._pgid

    def execute(self, code: str) -> ExecutionResult:
        with self._lock:
            if self._closed:
                raise SandboxClosed("the code interpreter session was closed")
            if self._km is None:
                self._start()
            return self._run(code)

    def close(self) -> None:
        """Kill the kernel (its whole process group) and delete the scratch directory."""
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

        kernel = [sys.executable, "-c", _KERNEL_MAIN, "-f", "{connection_file}",
                  "--HistoryManager.enabled=False", "--InteractiveShell.xmode=Plain"]
        argv = _launcher_argv(_launch_config(self.limits, self.scratch_dir, self._run_dir), kernel)
        spec = KernelSpec(argv=argv, display_name="sandbox", language="python",
                          interrupt_mode="signal")

        class OneSpec(KernelSpecManager):
            def get_kernel_spec(self, kernel_name):
                return spec

        km = KernelManager(kernel_spec_manager=OneSpec(), transport="ipc",
                           ip=str(self._run_dir / "zmq"),
                           connection_file=str(self._run_dir / "connection.json"))
        log_path = self._run_dir / "kernel.log"
        with open(log_path, "ab") as log_file:
            _launcher.submit(km.start_kernel, env=_kernel_env(self.scratch_dir),
                             cwd=str(self.scratch_dir), stdout=log_file, stderr=log_file).result()
        self._km, self._pgid = km, km.provisioner.pid
        self._client = km.blocking_client()
        self._client.start_channels()
        try:
            self._client.wait_for_ready(timeout=self.limits.startup_seconds)
        except RuntimeError as exc:
            returncode = km.provisioner.process.poll() if km.provisioner.process else None
            self._discard()
            text = _log_tail(log_path)
            if returncode == _EXIT_UNAVAILABLE:
                reason = _unavailable_reason(text)
                raise SandboxUnavailable(f"code interpreter sandbox: {reason}") from None
            raise RuntimeError(f"the code interpreter's kernel did not start ({exc}): {text}") from None
        log.debug("code interpreter kernel %s started: %s", self._pgid, _log_tail(log_path, 300))

    def _discard(self) -> None:
        """Kill the kernel, reap it and remove its connection file and sockets."""
        km, client, self._km, self._client = self._km, self._client, None, None
        self._kill_group()
        self._pgid = None
        if client is not None:
            client.stop_channels()
        if km is not None:
            km.shutdown_kernel(now=True)

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
                self._discard()
                out.error = _death_account(returncode, limits)
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


class SandboxPool:
    """One CodeSandbox per browser session id, at most max_sessions of them."""

    def __init__(self, limits: SandboxLimits | None = None, max_sessions: int = 8):
        _remove_stale_dirs()
        self.limits = limits or SandboxLimits()
        self.max_sessions = max_sessions
        self._sandboxes: dict[str, CodeSandbox] = {}
        self._lock = threading.Lock()

    def get(self, session_id: str) -> CodeSandbox:
        with self._lock:
            sandbox = self._sandboxes.get(session_id)
            if sandbox is None:
                if len(self._sandboxes) >= self.max_sessions:
                    raise SandboxBusy(f"all {self.max_sessions} code interpreter kernels are in use; "
                                      "try again when another session has ended")
                sandbox = self._sandboxes[session_id] = CodeSandbox(self.limits)
            return sandbox

    def close(self, session_id: str) -> None:
        with self._lock:
            sandbox = self._sandboxes.pop(session_id, None)
        if sandbox is not None:
            sandbox.close()

    def close_all(self) -> None:
        with self._lock:
            sandboxes, self._sandboxes = list(self._sandboxes.values()), {}
        for sandbox in sandboxes:
            sandbox.close()

    def __len__(self) -> int:
        return len(self._sandboxes)


@atexit.register
def _kill_all_at_exit() -> None:
    """No waiting at exit (an execution may hold its lock): kill the groups, delete the dirs."""
    with _live_lock:
        sandboxes = list(_live)
    for sandbox in sandboxes:
        sandbox._closed = True
        sandbox._kill_group()
        shutil.rmtree(sandbox._root, ignore_errors=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--bootstrap"]:
    _bootstrap(sys.argv[2:])
