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
    from distill.train.build import build_trainer

    resume = {"train": sec["train"], "checkpoint": {**sec["checkpoint"], "resume": "latest"}}
    build_trainer(from_dict(RunConfig, tiny_cfg_dict(tiny_assets, cut_dir, **resume))).train()
    build_trainer(from_dict(RunConfig, tiny_cfg_dict(tiny_assets, ref_dir, **sec))).train()
    ref = read_metrics(ref_dir)
    got = read_metrics(cut_dir)
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # no duplicated or missing step
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-6)
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in ref], rel=1e-9)
    names = sorted(x.name for x in (cut_dir / "checkpoints").iterdir())
    assert names == ["step_00000006", "step_00000008"]  # keep_last=2, no temporary folders left


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_resume_with_another_split_of_the_global_batch_matches_uninterrupted(tiny_assets, tmp_path, engine):
    """6 steps at micro_batch 2 x grad_accum 2, resumed from the step-3 checkpoint as 1 x 4 (the same
    global batch): steps 4-6 cover the same examples, so losses and learning rates equal the run that
    never stopped (before the fix the torch engine kept 6 saved micro-steps, 6 % 4 = 2, and stepped
    after 2 of the 4 micro-batches)."""
    ds = {}
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
        ds_json = tmp_path / "zero2.json"
        ds_json.write_text('{"zero_optimization": {"stage": 2}}')
        ds = {"deepspeed": {"engine": "deepspeed", "config": str(ds_json)}}
    sec = {"train": {"steps": 6, "warmup_steps": 2, "micro_batch": 2, "grad_accum": 2},
           "checkpoint": {"every": 3, "keep_last": 2, "export": False}, **ds}
    ref_dir, res_dir = tmp_path / "ref", tmp_path / "resumed"
    run_child({"cfg": tiny_cfg_dict(tiny_assets, ref_dir, **sec)}, tmp_path)
    res = tiny_cfg_dict(tiny_assets, res_dir, **sec)
    res["train"].update(micro_batch=1, grad_accum=4)
    res["checkpoint"] = {"every": 0, "export": False, "resume": str(ref_dir / "checkpoints" / "step_00000003")}
    run_child({"cfg": res}, tmp_path)
    ref, got = read_metrics(ref_dir), read_metrics(res_dir)
    assert [r["step"] for r in got] == [4, 5, 6]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref[3:]], rel=1e-5)
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in ref[3:]], rel=1e-9)


def test_second_run_in_a_busy_folder_is_refused_and_a_dead_holder_blocks_nothing(tiny_assets, tmp_path):
    """Two runs at once in one run folder: the second stops in one line naming the holder's pid and
    host (it used to interleave metrics.jsonl and checkpoints); once the holder is killed (-9, no
    cleanup) the folder is free again."""
    import socket

    from distill.config import ConfigError, RunConfig, from_dict
    from distill.train.build import build_trainer

    run = tmp_path / "run"
    sec = {"train": {"steps": 40, "warmup_steps": 2}, "checkpoint": {"every": 0, "export": False}}
    procs = run_child({"cfg": tiny_cfg_dict(tiny_assets, run, **sec), "sleep_per_step": 0.5}, tmp_path, wait=False)
    p = procs[0]
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").is_file():
        assert p.poll() is None, p.stdout.read()[-3000:]
        assert time.time() < deadline, "the first run did not start within 240 s"
        time.sleep(0.2)
    second = tiny_cfg_dict(tiny_assets, run, train={"steps": 2, "warmup_steps": 0},
                           checkpoint={"every": 0, "export": False, "overwrite": True})
    with pytest.raises(ConfigError) as e:
        build_trainer(from_dict(RunConfig, second))
    msg = str(e.value)
    assert "\n" not in msg and f"in use by another run (pid {p.pid} on host {socket.gethostname()}" in msg, msg
    assert p.poll() is None  # the first run goes on
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    p.stdout.close()
    build_trainer(from_dict(RunConfig, second)).train()  # the dead holder's lock file blocks nothing
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_resume_with_changed_settings_is_refused_unless_allowed(tiny_assets, tmp_path, capsys):
    """--resume with another train.lr / kd.kind: one line naming the keys, nothing written; with
    checkpoint.allow_config_change the earlier segment's config is kept as config.step_N.yaml.
    Extending train.steps or changing the log cadence passes with one line listing them."""
    from distill.config import ConfigError, RunConfig, from_dict
    from distill.train.build import build_trainer

    run = tmp_path / "run"
    sec = {"train": {"steps": 2, "warmup_steps": 1}, "checkpoint": {"every": 0, "keep_last": 3, "export": False}}
    build_trainer(from_dict(RunConfig, tiny_cfg_dict(tiny_assets, run, **sec))).train()
    before = (run / "config.yaml").read_text()

    def resumed(**changes):
        d = tiny_cfg_dict(tiny_assets, run, **sec)
        d["checkpoint"] = {**d["checkpoint"], "resume": "latest"}
        for sec_name, vals in changes.items():
            d[sec_name] = {**d.get(sec_name, {}), **vals}
        return lambda: build_trainer(from_dict(RunConfig, d))

    with pytest.raises(ConfigError) as e:
        resumed(train={"steps": 3, "lr": 1e-2}, kd={"kind": "reverse_kl"})()
    msg = str(e.value)
    assert "\n" not in msg and "kd.kind 'forward_kl' -> 'reverse_kl'" in msg and "train.lr 0.003 -> 0.01" in msg, msg
    assert "train.steps" not in msg  # harmless, not listed among the refused
    assert (run / "config.yaml").read_text() == before and not list(run.glob("config.step_*.yaml"))

    capsys.readouterr()
    resumed(train={"steps": 3}, log={"every": 2})().train()
    out = capsys.readouterr().out
    assert "settings changed since step_00000002: log.every 1 -> 2, train.steps 2 -> 3" in out, out
    resumed(train={"steps": 4, "lr": 1e-2}, checkpoint={"allow_config_change": True})().train()
    kept = run / "config.step_3.yaml"
    assert kept.is_file() and "lr: 0.003" in kept.read_text()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
