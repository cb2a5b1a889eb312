"""Secrets (the API key, the login, the backend's key, the browser-storage key) kept out of what other processes
and users can see.

- **Files.** ``--api-key-file``, ``--auth-file``, ``--backend-api-key-file`` (or ``CHATGLM_WEB_API_KEY_FILE``,
  ...) name a file holding the value: it never appears on a command line (``settings.read_secret_file()``).
- **The command line.** ``/proc/<pid>/cmdline`` is readable by every user of the machine. ``hide_secrets()``
  overwrites each secret given as a flag (``--api-key KEY``, ``--auth=user:pass``) with ``x`` in the process's
  own argument area (its bounds are ``arg_start`` / ``arg_end`` of ``/proc/self/stat``), and in ``sys.argv``
  (which ``multiprocessing`` hands to the engine process). Until the app has parsed its flags (well under a
  second after start) the values are visible: the environment or a file is the better way to pass them.
- **The environment.** Child processes (the engine process, tool workers, their helpers) inherit the
  environment: the secrets' variables are removed from it once read (and overwritten in the process's own
  environment area, which ``/proc/<pid>/environ`` shows to its owner). ``HF_TOKEN`` stays: the engine process
  may need it to download the model.

Which values and variables are secret is the caller's to say (``server.hide_all_secrets`` passes the settings'
secrets and the browser-storage key): this module imports nothing of the package, so anything may use it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


def hide_secrets(values: Iterable[str | None], env_vars: Iterable[str]) -> None:
    """Call once at start, after the flags are parsed and before any child process starts: ``values`` off the
    command line, the variables ``env_vars`` out of ``os.environ`` and out of this process's environment area
    (also those already taken out of ``os.environ``)."""
    if scrub_command_line([value for value in values if value]):
        log.warning("a secret was given on the command line; it is hidden from it now, but other users could "
                    "read it while the app started: prefer the CHATGLM_WEB_* variable or the --*-file flag")
    names = list(env_vars)
    for name in names:
        os.environ.pop(name, None)
    _scrub_area(50, lambda entry: _env_value(entry, names))


def scrub_command_line(values: list[str]) -> bool:
    """Overwrite ``values`` where they stand as arguments (``--flag VALUE`` or ``--flag=VALUE``) in the command line
    that ``/proc/<pid>/cmdline`` shows, and in ``sys.argv``; whether any was there."""
    encoded = [os.fsencode(v) for v in values if v]
    found = _scrub_area(48, lambda entry: _argument_value(entry, encoded))
    for argv in (sys.argv, getattr(sys, "orig_argv", [])):
        for index, argument in enumerate(argv):
            span = _argument_value(argument, values)
            if span:
                start, length = span
                argv[index] = argument[:start] + "x" * length
                found = True
    return found


def _argument_value(entry, secrets: list) -> tuple[int, int] | None:
    """(offset, length) of a secret in one argument (str or bytes): all of it, or what follows ``--flag=``."""
    if entry in secrets:
        return 0, len(entry)
    flag, equals, value = entry.partition("=" if isinstance(entry, str) else b"=")
    if entry[:1] in ("-", b"-") and equals and value in secrets:
        return len(flag) + 1, len(value)
    return None


def _env_value(entry: bytes, names: list[str]) -> tuple[int, int] | None:
    name, equals, value = entry.partition(b"=")
    if equals and name.decode(errors="replace") in names:
        return len(name) + 1, len(value)
    return None


def _scrub_area(field: int, span_of) -> bool:
    """Overwrite with ``x`` the span ``span_of(entry)`` gives in each NUL-separated entry of this process's own
    argument area (``field`` 48: arg_start, arg_end) or environment area (50: env_start, env_end). Linux only."""
    try:
        stat = Path("/proc/self/stat").read_bytes()
        fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) ": fields[0] is field 3
        start, end = int(fields[field - 3]), int(fields[field - 2])
    except (OSError, ValueError, IndexError):
        return False
    if not 0 < start < end:
        return False
    data = ctypes.string_at(start, end - start)
    offset, found = 0, False
    for entry in data.split(b"\0"):
        span = span_of(entry)
        if span:
            begin, length = span
            ctypes.memmove(start + offset + begin, b"x" * length, length)
            found = True
        offset += len(entry) + 1
    return found
