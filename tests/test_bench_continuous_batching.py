"""bench/continuous_batching.py runs end to end on a tiny model: both sides serve every load, the ratio lines and
the feature table are printed. Timings are not checked (this is the script's behaviour, not a benchmark)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import continuous_batching  # noqa: E402

FEATURES = ["greedy reply = model.generate's", "per-request temperature/top-p in one batch", "per-request seeds",
            "cancel one request mid-stream", "chunked prefill (long prompt while others stream)",
            "temperature 0 beside a sampled request"]


def test_the_script_compares_both_sides_and_prints_the_feature_table(capsys):
    continuous_batching.main(["--layers", "2", "--hidden", "64", "--users", "1", "2", "--tokens", "8",
                              "--rounds", "1"])
    out = capsys.readouterr().out
    lines = out.splitlines()

    for users in (1, 2):
        for mode in ("greedy", "sampled"):
            ratio = [line for line in lines if line.startswith(f"engine/manager at {users} user(s), {mode}: ")]
            assert len(ratio) == 1, out
            assert re.search(r": \d+\.\d\dx aggregate tok/s, \d+\.\d\dx TTFT \(medians of 1 rounds in turns; .*\) "
                             r"-> more tok/s: (engine|manager)$", ratio[0]), ratio[0]
            for side in ("engine", "manager"):  # each side's load in the round, with its numbers
                assert any(re.match(rf"round 1: {side} +{users} user\(s\) {mode} *: +\d+\.\d tok/s aggregate, "
                                    r"TTFT +\d+\.\d ms", line) for line in lines), out

    header = lines.index(next(line for line in lines if line.startswith("feature (tried, not read)")))
    assert lines[header].split()[-2:] == ["engine", "manager"]
    rows = {line[:len(feature)]: line[len(feature):].split() for line in lines[header + 1:header + 1 + len(FEATURES)]
            for feature in FEATURES if line.startswith(feature)}
    assert set(rows) == set(FEATURES), out
    assert all(len(cells) == 2 and set(cells) <= {"yes", "NO"} for cells in rows.values()), rows
    # both sides were driven correctly: each one's greedy reply is model.generate's
    assert rows["greedy reply = model.generate's"] == ["yes", "yes"], out
    for feature in FEATURES:  # and every answer comes with its reason
        for side in ("engine", "manager"):
            assert re.search(rf"^  {re.escape(feature)} / {side}: (yes|NO): \S", out, re.MULTILINE), (feature, side)
