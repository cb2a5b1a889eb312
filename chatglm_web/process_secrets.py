"""Secrets (the API key, the login, the backend's key, the browser-storage key) kept out of what other processes
and users can see.

- **Files.** ``--api-key-file``, ``--auth-file``, ``--backend-api-key-file`` (or ``CHATGLM_WEB_API_KEY_FILE``,
  ...) name a file holding the value: it never appears on a command line. ``read_secret_file()``.
- **The command line.** ``/proc/<pid>/cmdline`` is readable by every user of the machine. ``hide_secrets()``
  overwrites each secret given as a flag (``--api-key KEY``, ``--auth=user:pass``) with ``x`` in the process's
  own argument area (its bounds are ``arg_start`` / ``arg_end`` of ``/proc/self/stat``), and in ``sys.argv``
  (which ``multiprocessing`` hands to the engine process). Until the app has parsed its flags (well under a
  second after start) the values are visible: the environment or a file is the better way to pass them.
- **The environment.** Child processes (the engine process, tool workers, their helpers) inherit the
  environment: the secrets' variables are removed from it once read (and overwritten in the process's own
  environment area, which ``/proc/<pid>/environ`` shows to its owner). ``HF_TOKEN`` stays: the engine process
  may need it to download the model.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

from chatglm_web.settings import SECRET_SETTINGS, SettingsError

log = logging.getLogger(__name__)

SECRET_ENV_VARS = ("CHATGLM_WEB_API_KEY", "CHATGLM_WEB_AUTH", "CHATGLM_WEB_BACKEND_API_KEY")
MAX_SECRET_FILE_BYTES = 64 * 1024  # a secret file larger than this is a mistake (a wrong path)


def read_secret_file(path: str, source: str) -> str:
    """The secret in ``path`` (named by flag or variable ``source``), without surrounding whitespace and the final
    newline. ``SettingsError`` (one line) when it cannot be read, is empty or is not a small text file."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as error:
        raise SettingsError(f"{source}: cannot read {path}: {error.strerror or error}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise SettingsError(f"{source}: {path} is larger than {MAX_SECRET_FILE_BYTES:,} bytes; it should hold one secret")
    try:
        value = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SettingsError(f"{source}: {path} is not UTF-8 text") from None
    if not value:
        raise SettingsError(f"{source}: {path} is empty")
    return value


def hide_secrets(settings) -> None:
    """Call once at start, after the flags are parsed and before any child process starts."""
    values = [getattr(settings, name) for name in SECRET_SETTINGS if getattr(settings, name)]
    if scrub_command_line(values):
        log.warning("a secret was given on the command line; it is hidden from it now, but other users could "
                    "read it while the app started: prefer the CHATGLM_WEB_* variable or the --*-file flag")
    from chatglm_web import browser_secret

    names = [name for name in SECRET_ENV_VARS if os.environ.pop(name, None) is not None]
    if browser_secret.take_from_environ():
        names.append(browser_secret.ENV_VAR)
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
