"""A checkpoint written before the trainer was split into distill/train/ resumes after it.

tests/trainer/data/ckpt_before_split/ is step 2 of a 3-step run (tiny_cfg_dict, checkpoint.every=2)
saved by distill/trainer.py at commit ad10ee7; that run's step 3 had loss 7.648600105617358. The
resumed run must load the engine, optimizer and RNG files and reach the same step-3 loss."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .conftest import tiny_cfg_dict

FIXTURE = Path(__file__).resolve().parent / "data" / "ckpt_before_split"
OLD_STEP3_LOSS = 7.648600105617358  # the same run's step 3 under the code that wrote the checkpoint


def test_checkpoint_from_before_the_split_resumes(tiny_assets, tmp_path):
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run / "checkpoints" / "step_00000002")
    # the fixture's config names the folders of the machine that wrote it: the model paths differ
    d = tiny_cfg_dict(tiny_assets, run, train={"steps": 3, "grad_accum": 2},
                      checkpoint={"every": 2, "keep_last": 3, "export": False, "resume": "latest",
                                  "allow_config_change": True})
    tr = build_trainer(from_dict(RunConfig, d))
    assert tr.step == 2
    result = tr.train()
    assert result["steps"] == 3 and len(tr.history) == 1
    assert tr.history[0]["loss"] == pytest.approx(OLD_STEP3_LOSS, rel=1e-6), tr.history[0]
    assert (run / "checkpoints" / "step_00000003" / "trainer_state.json").is_file()
