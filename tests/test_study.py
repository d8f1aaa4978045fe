"""launchers/study.py --quick end to end: every arm completes with finite numbers and the files exist.

This checks that the study runs, not its claims (those are measured by the full study, docs/results.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ARMS = ("teacher", "sft_gold", "sft_text", "knowdist", "full", "full_topk16")
FIELDS = ("basic", "multifaceted", "fine_grained", "average", "params", "seconds")


@pytest.mark.slow
def test_quick_study_writes_every_arm(tmp_path, launcher):
    out = tmp_path / "study"
    proc = launcher.run("study.py", "--quick", "--seed", "3", "--out", str(out), timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["seed"] == 3
    for arm in ARMS:
        assert arm in res["arms"], f"arm {arm} missing: {sorted(res['arms'])}"
        r = res["arms"][arm]
        for f in FIELDS:
            assert isinstance(r[f], (int, float)) and math.isfinite(r[f]), f"{arm}.{f} = {r.get(f)!r}"
        assert r["params"] > 0 and r["seconds"] >= 0
    # the students share one size, about a quarter of the teacher's
    ratio = res["arms"]["sft_gold"]["params"] / res["arms"]["teacher"]["params"]
    assert 0.15 < ratio < 0.35, ratio
    assert len({res["arms"][a]["params"] for a in ARMS[1:]}) == 1
    md = (out / "results.md").read_text()
    for arm in ARMS:
        assert f"| {arm} |" in md
    assert (out / "results.png").stat().st_size > 0
    boot = res["bootstrap"]
    assert set(boot["se"]) == set(res["arms"]) and all(v >= 0 for v in boot["se"].values())
    for pair in ("full - sft_gold", "full - sft_text", "full_topk16 - full"):
        assert boot["pairs"][pair]["lo"] <= boot["pairs"][pair]["hi"], boot["pairs"][pair]
    assert "95% interval" in md

    # --report rebuilds the bootstrap and the table from the saved predictions, training nothing: with one
    # arm's predictions changed, the other arms get the same figures (the same draws) and the timings stay
    pred = out / "eval" / "full" / "predictions" / "sc-sst2.seed42.jsonl"
    pred.write_text("".join(json.dumps({"index": i, "prediction": "positive"}) + "\n" for i in range(4)))
    proc = launcher.run("study.py", "--report", "--out", str(out), timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    again = json.loads((out / "results.json").read_text())
    assert again["seconds"] == res["seconds"] and "[trainer]" not in proc.stdout + proc.stderr
    assert again["bootstrap"]["se"]["sft_gold"] == boot["se"]["sft_gold"]  # same draws for the others

    # A rerun into the same folder reuses the teacher only if it was made with the same settings; else it
    # stops with one line naming the file and the setting, and the trained teacher stays.
    done = out / "assets" / "DONE.json"
    info = json.loads(done.read_text())
    info["made_with"]["teacher_steps"] += 1
    done.write_text(json.dumps(info))
    proc = launcher.run("study.py", "--quick", "--seed", "3", "--out", str(out), timeout=300)
    launcher.assert_user_error(proc, "DONE.json", "made_with", "teacher_steps")
    assert (Path(info["teacher"]) / "model.safetensors").is_file()
