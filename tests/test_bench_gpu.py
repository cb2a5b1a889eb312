"""bench/gpu.py, the script for the one lent-GPU run of issue 22, runs its whole logic on a tiny checkpoint on the
CPU: every part gets through (the engine's events, the greedy check, TTFT, the manager beside the engine), and the
decode-step line and the targets table are printed. Timings are not checked (behaviour, not a benchmark)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu  # noqa: E402

TARGETS = ["fp32 decode b=1 / bandwidth bound", "fp32 decode b=8 aggregate / b=1", "4bit decode b=1 / fp32 b=1",
           "fp32 TTFT 1000-token prompt / its forward", "host syncs in sampling (choose_tokens)",
           "fp32 decode step replayed as CUDA graphs"]


def test_the_tiny_cpu_run_goes_through_every_part_and_prints_the_targets_table(capsys, tmp_path):
    assert gpu.main(["--device", "cpu", "--tiny", "--tokens", "8", "--rounds", "1", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()

    assert "FAILED" not in out, out  # each part runs in a try that prints its error: on the CPU none may fail
    assert re.search(r"^decode step: lean forward, CUDA graphs; graphs: [1-9]\d* captured, usable True", out, re.M), out
    for batch in (1, 8):
        assert re.search(rf"^fp32 best, graphs on  b={batch}: decode +\d+\.\d tok/s, steady +\d+\.\d tok/s", out, re.M)
    assert re.search(r"^fp32 best, graphs off b=1: decode", out, re.M), out
    assert "graphs run 1 vs run 2 (new KV slots): equal" in out, out
    assert re.search(r"^model\.generate b=1: decode +\d+\.\d tok/s", out, re.M), out
    assert re.search(r"^1000-token prompt: engine TTFT \d+\.\d ms .* -> \d+\.\d\dx \(target <= 2\)", out, re.M), out
    assert re.search(r"-> 0 in sampling \(target 0\)", out), out

    header = next(i for i, line in enumerate(lines) if line.startswith("target ") and "verdict" in line)
    assert lines[header - 1].startswith("== issue 22 targets, ratios within this run (CPU")
    assert "command: python bench/gpu.py --device cpu --tiny" in lines[header - 1]
    rows = {line.split("|")[0].strip(): [cell.strip() for cell in line.split("|")[1:]]
            for line in lines[header + 2:header + 2 + len(TARGETS)]}
    assert set(rows) == set(TARGETS), lines[header:header + 2 + len(TARGETS)]
    for target, (ratio, goal, verdict, detail) in rows.items():
        assert verdict in ("met", "NOT MET", "not measured"), (target, verdict)
    assert rows["4bit decode b=1 / fp32 b=1"][2] == "not measured"  # no bitsandbytes 4-bit without CUDA
    for measured in TARGETS[:2] + TARGETS[3:]:
        assert rows[measured][2] != "not measured", (measured, rows[measured])
    assert rows["host syncs in sampling (choose_tokens)"][:3] == ["0", "0", "met"]
    assert rows["fp32 decode step replayed as CUDA graphs"][0] == "yes"
    assert re.match(r"\d+\.\d\d$", rows["fp32 TTFT 1000-token prompt / its forward"][0])

    for users in (1, 8):  # part 9: the manager beside the engine, and which one to keep
        assert re.search(rf"^engine/manager at {users} user\(s\), sampled: \d+\.\d\dx aggregate", out, re.M), out
        assert re.search(rf"^engine / ContinuousBatchingManager at {users} user\(s\), sampled: \d+\.\d\dx -> keep the "
                         r"(engine|manager)$", out, re.M), out
    assert re.search(r"^\(whole run: \d+ s\)$", out, re.M)

    # a second run finds the checkpoint written
    assert gpu.main(["--device", "cpu", "--tiny", "--tokens", "4", "--rounds", "1", "--workdir", str(tmp_path),
                     "--skip", "cb", "generate", "ttft", "sdpa"]) == 0
    assert "(already written)" in capsys.readouterr().out


def test_a_part_that_fails_prints_its_error_and_the_run_goes_on(capsys):
    with gpu.Part("a part that breaks") as part:
        raise ValueError("on purpose")
    after = True
    out = capsys.readouterr().out
    assert after and not part.ok
    assert "FAILED after" in out and "ValueError: on purpose" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_without_a_gpu_the_run_exits_0_with_a_note(capsys):
    assert gpu.main(["--quick"]) == 0
    assert "no CUDA GPU here: GPU benchmark skipped" in capsys.readouterr().out


def test_the_deadline_prints_what_was_measured_and_exits_0(tmp_path):
    """--quick's deadline: at the limit the run prints the table so far and ends (exit 0), whatever part is running."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--device", "cpu", "--tiny", "--tokens",
                           "200", "--rounds", "3", "--workdir", str(tmp_path), "--deadline", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"!! deadline of 2 s reached during '.+': stopping here", done.stdout), done.stdout
    assert "== issue 22 targets, ratios within this run (cut short by the deadline)" in done.stdout
    assert "(whole run:" not in done.stdout
