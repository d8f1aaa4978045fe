"""The paths users run: ``launchers/knowdist.py`` with ``multiteacher.teachers`` goes through the
multi-teacher hooks (weights logged per teacher), and ``launchers/study_multiteacher.py --quick``
writes every strategy's results (not its claims: docs/multiteacher.md reports those)."""

from __future__ import annotations

import json
import math

import pytest

from ..conftest import assert_checkpoint_exports
from .conftest import read_metrics


def test_knowdist_launcher_runs_several_teachers(mt_assets, tmp_path, launcher):
    out = tmp_path / "run"
    teachers = json.dumps([{"name": "good", "path": mt_assets["good"]}, {"name": "noise", "path": mt_assets["noise"]}])
    proc = launcher.run(
        "knowdist.py", f"--run.out_dir={out}", f"--model.student={mt_assets['student']}",
        f"--model.teacher={mt_assets['good']}", f"--data.path={mt_assets['data']}", "--data.max_len=64",
        "--data.packing=false", "--train.steps=3", "--train.warmup_steps=1", "--train.micro_batch=4", "--deepspeed.engine=torch",
        "--kd.teacher_backend=multiteacher", f"--multiteacher.teachers={teachers}",
        "--multiteacher.weighting=confidence", "--log.progress_bar=false", "--eval.at_end=false", timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert r["w_good"] + r["w_noise"] == pytest.approx(1.0, abs=1e-4)
    assert "| w good=" in proc.stdout + proc.stderr
    assert_checkpoint_exports(out, tmp_path / "exported", "distill.knowdist.stage:KnowDistConfig")


@pytest.mark.slow
def test_smoke_study_writes_every_strategy(tmp_path, launcher):
    """--smoke: the --quick pipeline (same code, every strategy) on tiny settings."""
    out = tmp_path / "study"
    proc = launcher.run("study_multiteacher.py", "--smoke", "--out", str(out), timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert {"noise", "wrong"} <= set(res["teachers"]) and set(res["teacher_stats"]) == set(res["teachers"])
    tune = [json.loads(x)["id"] for x in (out / "assets" / "heldout_tune.jsonl").read_text().splitlines()]
    scored = [json.loads(x)["id"] for x in (out / "assets" / "heldout.jsonl").read_text().splitlines()]
    assert tune and scored and not set(tune) & set(scored)  # meta never tunes on what is scored
    for name in ("fixed", "route", "confidence", "attention", "meta"):
        assert any(s.startswith(name) for s in res["strategies"]), f"{name} missing: {sorted(res['strategies'])}"
    for name, r in res["strategies"].items():
        assert set(r["final_weights"]) == set(res["teachers"]), name
        assert sum(r["final_weights"].values()) == pytest.approx(1.0, abs=1e-3), name
        assert math.isfinite(r["heldout_loss"]) and isinstance(r["sentibench"], dict), name
