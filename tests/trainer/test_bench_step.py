"""launchers/bench_step.py end to end at toy sizes: three paths, one JSON line (no speed asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _bench(*args):
    cmd = [sys.executable, str(REPO / "launchers" / "bench_step.py"), "--vocab", "512", "--repeats", "1",
           "--warmup", "0", "--student-size", "32x1", "--teacher-size", "32x1", "--knowdist", "2x16",
           "--icldist", "2x16", "--batch", "knowdist", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # 4 processes that import torch + transformers: ~40 s of CPU
def test_three_paths_one_json_line_finite():
    # The eager copy of TRL's loss: importing trl costs ~10 s, and the fallback needs a test too.
    doc = _bench("--peer-loss", "eager")
    rows = {r["path"]: r for r in doc["rows"]}
    assert set(rows) == {"lean", "logits", "peer"}
    assert "eager (trl not importable)" in rows["peer"]["impl"]
    for r in rows.values():
        assert r["batch"] == "knowdist" and r["tokens"] == 32 and r["supervised"] == 8
        for key in ("p50_ms", "p20_ms", "p80_ms", "tok_s", "loss", "flops", "peak_extra_mib", "peak_mib"):
            assert r[key] is not None and math.isfinite(r[key]), (r["path"], key, r[key])
    # Same batch, same models, same objective: the first step's loss agrees across the paths.
    assert abs(rows["lean"]["loss"] - rows["peer"]["loss"]) < 1e-3 * abs(rows["peer"]["loss"])
    assert abs(rows["logits"]["loss"] - rows["peer"]["loss"]) < 1e-3 * abs(rows["peer"]["loss"])
    whats = {(r["batch"], r["what"]) for r in doc["ratios"]}
    assert whats == {("knowdist", "lean/peer"), ("knowdist", "logits/peer")}
    assert all(math.isfinite(r["time"]) and math.isfinite(r["mem_extra"]) for r in doc["ratios"])
