"""A control group per code-interpreter kernel: a cap on its processes and on all the memory it holds.

Made by the app (which must be allowed to create cgroups: root, or a delegated cgroup v2 subtree),
joined by the kernel's init process (``sandbox_launcher``), emptied and removed when the kernel
goes. cgroup v1 (a ``memory`` and a ``pids`` hierarchy, as on hybrid hosts) and v2 are handled.

    group = KernelCgroup.create("chatglm-sandbox-123-abc", memory_bytes=1 << 30, max_tasks=128)
    group.procs_files     # what the init writes "0" to
    group.members()       # {host pid: pid in the kernel's PID namespace}
    group.kill(keep={1, 2})
    group.remove()

The memory limit counts what cgroups charge: anonymous memory, page cache, tmpfs and memfd pages
(shmem) and kernel memory of the group's processes; swap is limited to the same total where the
host exposes it. ``max_tasks`` counts processes and threads.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CgroupUnavailable", "KernelCgroup", "remove_stale_groups"]


class CgroupUnavailable(RuntimeError):
    """No control group with memory and pids limits can be made here; the message says why."""


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, super options) of every cgroup mount."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _source, options = (right.split() + ["", ""])[:3]
        if fstype in ("cgroup", "cgroup2"):
            found.append((left.split()[4], fstype, set(options.split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under "" its v2 path."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def _parents() -> tuple[str, list[Path]]:
    """("v1" or "v2", the directories new kernel groups are made in); CgroupUnavailable if none."""
    mounts, own = _mounts(), _own_paths()
    v1 = {}
    for point, fstype, options in mounts:
        for controller in ("memory", "pids"):
            if fstype == "cgroup" and controller in options and controller in own:
                v1[controller] = Path(point + own[controller].rstrip("/"))
    if len(v1) == 2:
        return "v1", [v1["memory"], v1["pids"]]
    for point, fstype, _ in mounts:
        if fstype == "cgroup2" and "" in own:
            parent = Path(point + own[""].rstrip("/"))
            if {"memory", "pids"} <= set((parent / "cgroup.controllers").read_text().split()):
                return "v2", [parent]
    raise CgroupUnavailable("a cgroup with the memory and pids controllers is needed (cgroup v1 memory and pids "
                            "hierarchies, or cgroup v2 with both controllers), and none is available to this process")


def _enable_v2_controllers(parent: Path) -> None:
    """Children of ``parent`` get memory and pids. cgroup v2 allows that only in a group without processes
    of its own, so the processes of the app's group move to a leaf beside the kernels' first."""
    if {"memory", "pids"} <= set((parent / "cgroup.subtree_control").read_text().split()):
        return
    leaf = parent / "chatglm-web"
    leaf.mkdir(exist_ok=True)
    for pid in (parent / "cgroup.procs").read_text().split():
        try:
            (leaf / "cgroup.procs").write_text(pid)
        except OSError:   # it exited, or is a kernel thread
            pass
    (parent / "cgroup.subtree_control").write_text("+memory +pids")


@dataclass
class KernelCgroup:
    version: str
    dirs: list[Path]
    procs_files: list[str] = field(init=False)

    def __post_init__(self):
        self.procs_files = [str(d / "cgroup.procs") for d in self.dirs]

    @classmethod
    def create(cls, name: str, *, memory_bytes: int, max_tasks: int) -> "KernelCgroup":
        try:
            version, parents = _parents()
            if version == "v2":
                _enable_v2_controllers(parents[0])
            dirs = [parent / name for parent in parents]
            for d in dirs:
                d.mkdir()
            group = cls(version, dirs)
            try:
                group._limit(memory_bytes, max_tasks)
            except BaseException:
                group.remove()
                raise
            return group
        except OSError as exc:
            raise CgroupUnavailable(f"cannot make the kernel's control group: {exc}") from None

    def _limit(self, memory_bytes: int, max_tasks: int) -> None:
        if self.version == "v2":
            group = self.dirs[0]
            (group / "memory.max").write_text(str(memory_bytes))
            if (group / "memory.swap.max").exists():
                (group / "memory.swap.max").write_text("0")
            (group / "pids.max").write_text(str(max_tasks))
            return
        memory, pids = self.dirs
        (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
        if (memory / "memory.memsw.limit_in_bytes").exists():   # memory + swap (needs swap accounting)
            (memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
        (pids / "pids.max").write_text(str(max_tasks))

    def members(self) -> dict[int, int]:
        """{host pid: pid in its innermost PID namespace} of every process in the group."""
        found = {}
        for procs in self.procs_files:
            try:
                pids = Path(procs).read_text().split()
            except OSError:
                continue
            for pid in map(int, pids):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("NSpid:"):
                        found[pid] = int(line.split()[-1])
        return found

    def oom_kills(self) -> int:
        """How many of the group's processes the kernel's OOM killer has killed (it ran out of memory)."""
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        try:
            text = (self.dirs[0] / name).read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def kill(self, keep: set[int] = frozenset(), timeout: float = 5.0) -> bool:
        """SIGKILL every process whose namespace pid is not in ``keep`` until none is left (a process
        forking in a loop is caught by a later pass). True when none is left within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            victims = [pid for pid, ns_pid in self.members().items() if ns_pid not in keep]
            if not victims:
                return True
            if time.monotonic() > deadline:
                return False
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)   # killed processes leave the group once the kernel has reaped them

    def remove(self, timeout: float = 5.0) -> bool:
        """Kill what is left and remove the group's directories; False if one could not be removed."""
        self.kill(timeout=timeout)
        removed = True
        for d in self.dirs:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:   # EBUSY until the last process has been reaped
                    if time.monotonic() > deadline:
                        removed = False
                        break
                    time.sleep(0.02)
        return removed


def remove_stale_groups(prefix: str, is_ours) -> int:
    """Kill and remove the groups named ``prefix``... that ``is_ours(name)`` disowns (left by a dead app).
    Returns how many were removed; nothing happens where no cgroup is available."""
    try:
        version, parents = _parents()
    except (CgroupUnavailable, OSError):
        return 0
    names = {d.name for parent in parents if parent.is_dir() for d in parent.glob(f"{prefix}*") if d.is_dir()}
    removed = 0
    for name in names:
        if not is_ours(name):
            removed += KernelCgroup(version, [parent / name for parent in parents]).remove()
    return removed
