"""``--resume`` after ``kill -9``: the resumed run logs the same losses as a run never stopped."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from .conftest import read_metrics, run_child, tiny_cfg_dict


@pytest.mark.slow
def test_resume_after_kill9_matches_uninterrupted(tiny_assets, tmp_path):
    steps = 8
    sec = {"train": {"steps": steps, "warmup_steps": 2}, "checkpoint": {"every": 3, "keep_last": 2}}
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    # The interrupted run: killed with SIGKILL once its step-3 checkpoint is complete, mid-run.
    procs = run_child({"cfg": tiny_cfg_dict(tiny_assets, cut_dir, **sec), "sleep_per_step": 0.5}, tmp_path, wait=False)
    p = procs[0]
    deadline = time.time() + 240
    ckpt = cut_dir / "checkpoints" / "step_00000003" / "trainer_state.json"
    while not ckpt.is_file():
        assert p.poll() is None, p.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    p.stdout.close()
    assert p.returncode == -signal.SIGKILL
    done = [r["step"] for r in read_metrics(cut_dir)]
    assert max(done) < steps, "the run finished before it was killed"
    # Resume, and the reference run that never stopped.
    # Both in this process (a fresh Trainer each): only the killed run needs its own process.
    from distill.config import RunConfig, from_dict
    from distill.trainer import Trainer

    resume = {"train": sec["train"], "checkpoint": {**sec["checkpoint"], "resume": "latest"}}
    Trainer(from_dict(RunConfig, tiny_cfg_dict(tiny_assets, cut_dir, **resume))).setup().train()
    Trainer(from_dict(RunConfig, tiny_cfg_dict(tiny_assets, ref_dir, **sec))).setup().train()
    ref = read_metrics(ref_dir)
    got = read_metrics(cut_dir)
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # no duplicated or missing step
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-6)
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in ref], rel=1e-9)
    names = sorted(x.name for x in (cut_dir / "checkpoints").iterdir())
    assert names == ["step_00000006", "step_00000008"]  # keep_last=2, no temporary folders left
