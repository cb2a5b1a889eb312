"""The code interpreter kernel's launcher: every isolation layer, put in place before the kernel runs.

Run by the app as ``python -I -S sandbox_launcher.py -- python -c <kernel main>`` with its
configuration (JSON) in the environment variable ``CHATGLM_SANDBOX_CONFIG``, never on a command
line. It imports only the standard library. Three processes result::

    launcher   in the app's namespaces; leads the kernel's process group; ignores SIGINT;
               dies with the app (PR_SET_PDEATHSIG); exits as the kernel did
      init     PID 1 of a new PID namespace; reaps; dies with the launcher; when it dies the
               Linux kernel kills every process of its namespace
        kernel PID 2 (ipykernel), and whatever the model's code starts below it

Layers, in the order they are set up (each step still has the rights it needs):

1. Namespaces (launcher): new PID, mount, network, IPC and UTS namespaces (directly as root,
   else inside a new user namespace). The network namespace has only a loopback that is down;
   abstract unix sockets and System V IPC of other kernels are in other namespaces.
2. Control group (init): the init joins the kernel's cgroup, made by the app, whose limits
   count everything the kernel's processes hold: ``pids.max`` (processes and threads) and the
   memory limit (page cache, memfd, tmpfs and anonymous memory alike).
3. Mounts (init): a private ``/proc`` showing only this namespace's processes; an empty tmpfs
   over the temporary directory, ``/run``, ``/dev/shm`` and ``/var/tmp``, so other kernels'
   directories, connection files and sockets and the host's unix sockets are not there at all;
   the kernel's own run directory (its connection file and ZeroMQ sockets) bound back in; a
   tmpfs of ``scratch_bytes`` as the scratch directory (the kernel's cwd and only writable
   place; it vanishes with the namespace).
4. Resource limits: address space per process, CPU seconds, size of one file, no core dumps.
5. No capabilities, and no_new_privs.
6. Landlock (ABI >= ``min_landlock_abi``): read/execute only under the system and Python
   directories, write only in the scratch tmpfs, unix sockets only in the run directory; from
   ABI 4 TCP bind/connect are refused, from ABI 6 signals and abstract sockets are scoped.
7. seccomp: ``socket()`` for any family but AF_UNIX, io_uring, ``setsid``/``setpgid``, keyrings,
   clearing the parent-death signal and 32-bit/x32 entry points are refused.

A layer that cannot be set up makes the launcher exit with ``EXIT_UNAVAILABLE`` after one line
``sandbox unavailable: <what is missing>`` on stderr: model-written code never runs unsandboxed.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import select
import signal
import stat
import sys
from pathlib import Path

CONFIG_ENV = "CHATGLM_SANDBOX_CONFIG"
EXIT_UNAVAILABLE = 78  # EX_CONFIG: a required sandbox layer could not be set up
MIN_LANDLOCK_ABI = 3   # TRUNCATE: below it, truncate(2) outside the scratch could not be refused
INIT_PID, KERNEL_PID = 1, 2   # in the kernel's PID namespace

_PR_SET_PDEATHSIG, _PR_SET_SECCOMP, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 22, 24, 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_NAMESPACES = _CLONE_NEWNS | _CLONE_NEWUTS | _CLONE_NEWIPC | _CLONE_NEWPID | _CLONE_NEWNET
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
_OPEN_TREE_CLONE, _OPEN_TREE_CLOEXEC, _AT_RECURSIVE = 1, 0o2000000, 0x8000
_MOVE_MOUNT_F_EMPTY_PATH, _AT_FDCWD = 4, -100
_OPEN_TREE, _MOVE_MOUNT = 428, 429     # the same on all 64-bit architectures
_AF_UNIX = 1

# Landlock (linux/landlock.h); the syscall numbers are the same on all 64-bit architectures.
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_LL_MAKE_SOCK, _LL_REFER, _LL_TRUNCATE = 1 << 9, 1 << 13, 1 << 14
_LL_FILE_RIGHTS = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | _LL_TRUNCATE
_LL_READ = _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR
_LL_NET_TCP = 1 | 2                     # BIND_TCP | CONNECT_TCP, ABI 4
_LL_SCOPE = 1 | 2                       # ABSTRACT_UNIX_SOCKET | SIGNAL, ABI 6

# Per architecture: seccomp's AUDIT_ARCH, and the numbers of the system calls the filter handles.
_ARCHES = {
    "x86_64": dict(audit=0xC000003E, x32=True, socket=41, socketpair=53, prctl=157, setsid=112,
                   setpgid=109, io_uring=(425, 426, 427), keys=(248, 249, 250)),
    "aarch64": dict(audit=0xC00000B7, x32=False, socket=198, socketpair=199, prctl=167, setsid=157,
                    setpgid=154, io_uring=(425, 426, 427), keys=(217, 218, 219)),
}


class Unavailable(Exception):
    """A layer could not be set up; the message names what is missing."""


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
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc


def _check(what: str, result: int) -> int:
    if result < 0:
        raise Unavailable(f"{what} failed: {os.strerror(ctypes.get_errno())}")
    return result


# -- 1. namespaces ----------------------------------------------------------------------------

def _unshare_namespaces(libc) -> str:
    """New PID, mount, network, IPC and UTS namespaces: directly as root, else in a user namespace."""
    if libc.unshare(ctypes.c_int(_NAMESPACES)) == 0:
        return "pid+mount+network+ipc namespaces"
    direct = os.strerror(ctypes.get_errno())
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(ctypes.c_int(_CLONE_NEWUSER | _NAMESPACES)) != 0:
        raise Unavailable(f"new PID/mount/network namespaces are needed (run the app as root, or allow "
                          f"unprivileged user namespaces): unshare failed: {direct}; in a user namespace: "
                          f"{os.strerror(ctypes.get_errno())}")
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    return "user+pid+mount+network+ipc namespaces"


# -- 2. control group ---------------------------------------------------------------------------

def _join_cgroup(config: dict) -> str:
    if not config["cgroup_procs"]:
        raise Unavailable("no control group was set up for the kernel")
    for procs in config["cgroup_procs"]:
        try:
            with open(procs, "w") as f:
                f.write("0")
        except OSError as exc:
            raise Unavailable(f"cannot join the kernel's control group ({procs}): {exc.strerror}") from None
    return "cgroup"


# -- 3. mounts ---------------------------------------------------------------------------------

def _mount(libc, source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(f"mount {fstype or source} on {target}", libc.mount(
        source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
        data.encode() if data else None))


def _private_mounts(libc, config: dict) -> str:
    """A private /proc, the shared temporary and runtime directories covered, own dirs put back."""
    _mount(libc, "none", "/", None, _MS_REC | _MS_PRIVATE)
    _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    run_dir, scratch = config["run_dir"], config["scratch_dir"]
    run_tree = None
    if run_dir:
        run_tree = _check(f"open_tree({run_dir})", libc.syscall(
            ctypes.c_long(_OPEN_TREE), ctypes.c_int(_AT_FDCWD), run_dir.encode(),
            ctypes.c_uint(_OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_RECURSIVE)))
    for path in config["cover"]:
        _mount(libc, "tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
    os.makedirs(scratch, exist_ok=True)
    _mount(libc, "tmpfs", scratch, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={config['scratch_bytes']},mode=0700")
    if run_tree is not None:
        os.makedirs(run_dir, exist_ok=True)
        _check(f"move_mount(→ {run_dir})", libc.syscall(
            ctypes.c_long(_MOVE_MOUNT), ctypes.c_int(run_tree), b"", ctypes.c_int(_AT_FDCWD),
            run_dir.encode(), ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH)))
        os.close(run_tree)
    os.chdir(scratch)
    return f"private /proc, scratch tmpfs of {config['scratch_bytes'] >> 20} MiB"


# -- 4. to 7. ----------------------------------------------------------------------------------

def _set_limit(limit: int, soft: int, extra: int = 0) -> None:
    """soft, and soft + extra as the hard limit, neither above the hard limit already in force."""
    cap = resource.getrlimit(limit)[1]
    hard = soft + extra if cap == resource.RLIM_INFINITY else min(soft + extra, cap)
    resource.setrlimit(limit, (min(soft, hard), hard))


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
        raise Unavailable("could not drop all capabilities")


def landlock_abi() -> int:
    """The running Linux kernel's Landlock ABI version, 0 where it has none."""
    abi = _libc().syscall(ctypes.c_long(_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(abi, 0)


def _install_landlock(libc, config: dict) -> str:
    abi = landlock_abi()
    if abi == 0:
        raise Unavailable("Landlock is not available (Linux >= 6.2 with the landlock LSM enabled is needed)")
    if abi < config["min_landlock_abi"]:
        raise Unavailable(f"Landlock ABI {abi} is too old: ABI >= {config['min_landlock_abi']}"
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
    if config["run_dir"]:
        allow(config["run_dir"], _LL_READ | _LL_MAKE_SOCK)
    for path in (config["scratch_dir"], os.devnull):
        allow(path, fs)
    _check("landlock_restrict_self", libc.syscall(
        ctypes.c_long(_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)))
    os.close(ruleset)
    return f"landlock ABI {abi}" + (" (+TCP)" if abi >= 4 else "") + (" (+scopes)" if abi >= 6 else "")


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


def _install_seccomp(libc, arch: dict) -> str:
    prog = _seccomp_program(arch)
    filters = (_SockFilter * len(prog))(*(_SockFilter(*insn) for insn in prog))
    fprog = _SockFprog(len(prog), filters)
    _check("seccomp (prctl PR_SET_SECCOMP; a kernel with CONFIG_SECCOMP_FILTER is needed)",
           libc.prctl(_PR_SET_SECCOMP, 2, ctypes.addressof(fprog), 0, 0))
    return "seccomp"


def _confine(libc, config: dict) -> list[str]:
    """Layers 2 to 7, in the init process (PID 1 of the new namespace), inherited by the kernel."""
    arch = _ARCHES.get(os.uname().machine)
    if arch is None:
        raise Unavailable(f"no seccomp filter for the {os.uname().machine} architecture")
    layers = [_join_cgroup(config), _private_mounts(libc, config)]
    _set_limit(resource.RLIMIT_AS, config["memory_bytes"])
    _set_limit(resource.RLIMIT_CPU, config["cpu_seconds"], extra=1)   # SIGXCPU, then SIGKILL
    _set_limit(resource.RLIMIT_FSIZE, config["file_bytes"])
    _set_limit(resource.RLIMIT_CORE, 0)
    _drop_capabilities(libc)
    # no exec may grant privileges again (set-uid, file capabilities); both filters need it
    _check("prctl(PR_SET_NO_NEW_PRIVS)", libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
    return layers + ["rlimits", "no capabilities", _install_landlock(libc, config), _install_seccomp(libc, arch)]


# -- the processes -------------------------------------------------------------------------------

def _unavailable(reason: object) -> None:
    print(f"sandbox unavailable: {reason}", file=sys.stderr, flush=True)
    os._exit(EXIT_UNAVAILABLE)


def _exit_as(status: int) -> None:
    """Exit as a child with wait status ``status`` did: 128 + signal for a signal (PID 1 cannot
    kill itself with its own signal; the launcher turns it back into that signal)."""
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def _init(libc, config: dict, command: list[str], launcher_alive: int) -> None:
    """PID 1: confine itself, start the kernel as PID 2, reap every orphan, exit as the kernel does."""
    _check("prctl(PR_SET_PDEATHSIG)", libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))
    if select.select([launcher_alive], [], [], 0)[0]:   # EOF: the launcher died before the line above
        os._exit(1)
    os.close(launcher_alive)
    try:
        layers = _confine(libc, config)
    except Exception as exc:   # fail closed, with the reason on stderr for the app to read
        _unavailable(exc)
    print(f"sandbox layers: {', '.join(config['layers'] + layers)}", file=sys.stderr, flush=True)
    kernel = os.fork()
    if kernel == 0:   # it dies with the init: the PID namespace's processes all go with its PID 1
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(command[0], command)
    while True:
        pid, status = os.wait()
        if pid == kernel:
            _exit_as(status)


def main(argv: list[str]) -> None:
    config = json.loads(os.environ.pop(CONFIG_ENV))
    command = argv[argv.index("--") + 1:]
    libc = _libc()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the app interrupts the kernel via the process group
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        _check("prctl(PR_SET_PDEATHSIG)", libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))
        if os.getppid() != config["parent_pid"]:   # the app died before the line above
            os._exit(1)
        config["layers"] = [_unshare_namespaces(libc)]
    except Exception as exc:
        _unavailable(exc)
    alive_r, alive_w = os.pipe()   # the init sees EOF on it once the launcher is gone
    init = os.fork()
    if init == 0:
        os.close(alive_w)
        try:
            _init(libc, config, command, alive_r)
        finally:
            os._exit(1)
    os.close(alive_r)
    while True:
        try:
            _, status = os.waitpid(init, 0)
            break
        except InterruptedError:
            continue
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
    if code > 128 and code - 128 in signal.valid_signals():   # the kernel died of a signal: so does this
        if code - 128 not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(code - 128, signal.SIG_DFL)
        os.kill(os.getpid(), code - 128)
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv)
