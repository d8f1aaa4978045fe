"""A checkpoint written before the trainer was split into distill/train/ resumes after it.

tests/trainer/data/ckpt_before_split/ is step 2 of a 3-step run (tiny_cfg_dict, checkpoint.every=2)
saved by distill/trainer.py at commit ad10ee7; that run's step 3 had loss 7.648600105617358. The
resumed run must load the engine, optimizer and RNG files and reach the same step-3 loss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from .conftest import tiny_cfg_dict

FIXTURE = Path(__file__).resolve().parent / "data" / "ckpt_before_split"
OLD_STEP3_LOSS = 7.648600105617358  # the same run's step 3 under the code that wrote the checkpoint


def test_checkpoint_from_before_the_split_resumes(tiny_assets, tmp_path):
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000002"
    shutil.copytree(FIXTURE, ckpt)
    # The fixture's config names the folders of the machine that wrote it: point them at this session's
    # (the same tiny models, built deterministically), and let its manifest follow the file's new size.
    d = tiny_cfg_dict(tiny_assets, run, train={"steps": 3, "grad_accum": 2},
                      checkpoint={"every": 2, "keep_last": 3, "export": False, "resume": "latest"})
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    saved["model"].update(student=d["model"]["student"], teacher=d["model"]["teacher"])
    saved["data"]["path"] = d["data"]["path"]
    (ckpt / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["files"]["config.yaml"]["size"] = (ckpt / "config.yaml").stat().st_size
    (ckpt / "trainer_state.json").write_text(json.dumps(state, indent=2))
    # Settings added since (kd.on_policy.*), at their defaults, are not a change of the run: no
    # checkpoint.allow_config_change needed.
    assert "on_policy" not in saved["kd"]
    tr = build_trainer(from_dict(RunConfig, d))
    assert tr.step == 2
    result = tr.train()
    assert result["steps"] == 3 and len(tr.history) == 1
    assert tr.history[0]["loss"] == pytest.approx(OLD_STEP3_LOSS, rel=1e-6), tr.history[0]
    assert (run / "checkpoints" / "step_00000003" / "trainer_state.json").is_file()
