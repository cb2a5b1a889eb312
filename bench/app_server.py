"""The app as its own server process for the benchmarks: started with ``app.py`` flags, ready when /healthz is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def start_app(flags: list[str], port: int, log_path: Path, timeout: float = 300) -> subprocess.Popen:
    """``python app.py FLAGS --port PORT`` (output to ``log_path``), returned once ``GET /healthz`` is 200."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "app.py", *flags, "--port", str(port)], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_app(process)
    raise RuntimeError(f"the app did not start; see {log_path}")


def stop_app(process: subprocess.Popen | None) -> None:
    """SIGTERM to the app's process group (its engine process too), SIGKILL after 20 s."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)
