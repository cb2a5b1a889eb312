"""The benchmark scripts start: their imports (the shared bench/clients.py, the test helpers) resolve and
their options parse. Running them takes minutes and vLLM, so they are not run here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["speed.py", "remote.py", "serving.py", "soak.py", "gpu.py", "host_step.py"])
def test_a_benchmark_shows_its_help(script):
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), "--help"], cwd=REPO / "bench",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
