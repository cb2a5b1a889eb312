"""Waiting on a condition in tests (never a fixed sleep)."""

from __future__ import annotations

import time


def wait_until(condition, timeout: float, what: str, interval: float = 0.05) -> None:
    """Return once ``condition()`` is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    assert condition(), f"timed out after {timeout} s waiting for {what}"
