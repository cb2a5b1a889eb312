"""Waiting on a condition in tests (never a fixed sleep)."""

from __future__ import annotations

import time


def wait_until(condition, what: str, timeout: float = 30.0, interval: float = 0.02) -> None:
    """Return once ``condition()`` is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)
