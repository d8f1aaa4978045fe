"""launchers/bench_step.py at toy sizes: the paths end to end, one JSON line, the trl peer (no speed asserted)."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import load_launcher

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
    doc = _bench("--peer-loss", "eager", "--paths", "lean", "logits", "peer")  # trl: in-process below
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


# ------------------------------------------------------------------------------------------------
# The trl path (TRL >= 1.16's DistillationTrainer loss), in-process: no subprocess per row


def _tiny_case(bench, folders, path: str, batch: str, tmp_path) -> dict:
    return {"path": path, "batch": batch, "items": bench.make_items(batch, "2x16", folders["id_high"]),
            "student": folders["student"], "teacher": folders["teacher"], "vocab": 512, "dtype": "float32",
            "kind": "forward_kl", "beta": 0.5, "temperature": 1.0, "ce_weight": 0.0, "peer_loss": "eager",
            "engine": "torch", "ds_config": "ds_configs/zero3.json", "repeats": 1, "warmup": 0,
            "peak_tflops": 989.0, "out_dir": str(tmp_path / f"run_{batch}_{path}")}


def test_trl_row_matches_the_lean_step(tmp_path):
    """The trl row runs TRL's own DistillationTrainer loss on the same rows as ours: the first step's
    KD-only loss (before any update) equals the lean step's, on the icldist shape (2 supervised
    tokens per row; the knowdist shape differs only in the window's length)."""
    pytest.importorskip("trl.trainer.distillation_trainer", reason="trl >= 1.16 (pip install -e '.[bench]')")
    bench = load_launcher("bench_step.py")
    args = argparse.Namespace(vocab=512, student_size="32x1", teacher_size="32x1", shrink=False, dtype="float32")
    folders = bench.build_models(args, tmp_path)
    for batch, sup in (("icldist", 4),):
        trl = bench.worker(_tiny_case(bench, folders, "trl", batch, tmp_path))
        lean = bench.worker(_tiny_case(bench, folders, "lean", batch, tmp_path))
        assert trl["impl"].startswith("trl 1.") and "ChunkedDivergenceFunction" in trl["impl"], trl["impl"]
        assert trl["supervised"] == lean["supervised"] == sup
        for key in ("p50_ms", "loss", "peak_extra_mib"):
            assert trl[key] is not None and math.isfinite(trl[key]), (key, trl[key])
        assert trl["loss"] == pytest.approx(lean["loss"], rel=1e-5), (batch, trl["loss"], lean["loss"])


def test_trl_missing_is_one_skip_line_or_an_explicit_error(monkeypatch, capsys):
    """Without trl the default run drops the trl path with one line (and records why in the JSON);
    asking for it explicitly is a one-line error."""
    bench = load_launcher("bench_step.py")
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises, find_spec("trl") is None
    seen = {}

    def fake_run(args, work, t_start, torch, skipped):
        seen.update(paths=list(args.paths), skipped=skipped)
        return 0

    monkeypatch.setattr(bench, "_run", fake_run)
    assert bench.main(["--batch", "icldist"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [x for x in out if "trl" in x] == [
        "trl: skipped (trl is not importable; pip install 'trl>=1.16' to compare with TRL's fused "
        "DistillationTrainer loss)"]
    assert seen == {"paths": ["lean", "logits", "peer"], "skipped": {"trl": "trl is not importable"}}
    with pytest.raises(SystemExit, match=r"--paths trl: trl is not importable"):
        bench.main(["--paths", "lean", "trl"])
