"""The key that encrypts the conversation kept in the browser (``gr.BrowserState``), stable across restarts.

Gradio draws a random key per process when none is given; after a restart or an upgrade the stored
conversation could no longer be decrypted and was lost. The key comes from ``$CHATGLM_WEB_STATE_SECRET``
when set, else from a file created once in the app's cache directory and read by every later start.

The key never leaves the server: it seals the conversations kept in browsers and the share links
(``conversations/sealed.py``), so whoever had it could forge both. Gradio serves a ``gr.BrowserState``'s
secret to every visitor in the page's configuration; the page's settings BrowserState gets
``browser_state_key(secret)``, derived one way from it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from chatglm_web.settings import default_cache_dir

log = logging.getLogger(__name__)

ENV_VAR = "CHATGLM_WEB_STATE_SECRET"
FILE_NAME = "browser-state-secret"
_taken: str | None = None  # $CHATGLM_WEB_STATE_SECRET once taken out of the environment (take_from_environ)


def take_from_environ() -> bool:
    """Move ``$CHATGLM_WEB_STATE_SECRET`` out of ``os.environ``, so that child processes do not inherit it;
    ``browser_state_secret()`` still answers it. Whether it was set."""
    global _taken
    value = os.environ.pop(ENV_VAR, None)
    if value is not None:
        _taken = value
    return value is not None


def browser_state_key(secret: str) -> str:
    """The key for a ``gr.BrowserState`` (served to every visitor): nothing about ``secret`` follows from it."""
    return hmac.new(secret.encode(), b"chatglm-web/gradio-browser-state", hashlib.sha256).hexdigest()


def secret_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the key file lives: ``<cache dir>/browser-state-secret`` (the app's cache dir,
    ``settings.default_cache_dir()``, by default)."""
    if cache_dir is None:
        cache_dir = default_cache_dir()
    return Path(cache_dir) / FILE_NAME


def browser_state_secret(cache_dir: str | os.PathLike | None = None, environ=None) -> str:
    """The key from ``$CHATGLM_WEB_STATE_SECRET``, else from the key file (created on first use).

    Where the file can be neither read nor created, a key for this process only is returned (with a
    warning): the page still works, but stored conversations do not survive a restart.
    """
    taken = _taken if environ is None else None
    environ = os.environ if environ is None else environ
    explicit = (environ.get(ENV_VAR) or taken or "").strip()
    if explicit:
        return explicit
    path = secret_path(cache_dir)
    try:
        return _read(path) or _create(path)
    except OSError as error:
        log.warning("cannot keep the browser-storage key in %s (%s): conversations kept in the browser will "
                    "not survive a restart; set %s to keep them", path, error, ENV_VAR)
        return secrets.token_urlsafe(32)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip() or None
    except FileNotFoundError:
        return None


def _create(path: Path) -> str:
    """Write a new key atomically with mode 0600; if another process got there first, use its key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(secret + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)  # fails if the file exists: a concurrent start never replaces a key in use
        except FileExistsError:
            return _read(path) or secret
        except OSError:  # a file system without hard links
            if path.exists():
                return _read(path) or secret
            os.replace(temporary, path)
        return secret
    finally:
        temporary.unlink(missing_ok=True)
