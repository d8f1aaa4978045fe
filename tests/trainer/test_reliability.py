"""Nothing finished is lost (issue 11): a used run folder is refused or moved aside, keep_last prunes
only this run's checkpoints, an unfinished save is cleaned up, a damaged checkpoint is named and
skipped, and ``--resume`` before the first checkpoint logs no step twice."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from .conftest import read_metrics, tiny_cfg_dict

BASE_SEC = {"train": {"steps": 4, "warmup_steps": 1}, "checkpoint": {"every": 2, "keep_last": 3, "export": False}}


def _trainer(assets, out_dir, **sections):
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    merged = {k: dict(v) for k, v in BASE_SEC.items()}
    for sec, vals in sections.items():
        merged.setdefault(sec, {}).update(vals)
    cfg = from_dict(RunConfig, tiny_cfg_dict(assets, out_dir, **merged))
    cfg.validate()
    return lambda: build_trainer(cfg)


@pytest.fixture(scope="module")
def base_run(tiny_assets, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (copied by each test)."""
    out = tmp_path_factory.mktemp("reliability") / "base"
    _trainer(tiny_assets, out)().train()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    return out


@pytest.fixture
def run_dir(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


def _cli_args(assets, out_dir, *extra):
    return ("--run.out_dir=" + str(out_dir), "--model.student=" + assets["student"],
            "--model.teacher=" + assets["teacher"], "--data.path=" + assets["data"], "--data.max_len=64",
            "--deepspeed.engine=torch", "--log.progress_bar=false", "--train.micro_batch=4", "--train.grad_accum=2",
            "--train.warmup_steps=1", "--checkpoint.export=false", "--checkpoint.every=2", *extra)


def test_used_folder_refused_then_overwrite_moves_aside(tiny_assets, run_dir, launcher):
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = launcher.run("knowdist.py", *_cli_args(tiny_assets, run_dir, "--train.steps=2"))
    line = launcher.assert_user_error(proc, str(run_dir), "--resume", "--checkpoint.overwrite=true")
    assert "already holds checkpoints" in line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # nothing touched
    old_metrics = (run_dir / "metrics.jsonl").read_text()

    _trainer(tiny_assets, run_dir, train={"steps": 2}, checkpoint={"overwrite": True})().train()
    (aside,) = run_dir.glob("previous-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == before  # the earlier run, intact
    assert (aside / "metrics.jsonl").read_text() == old_metrics
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002"]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]


def test_keep_last_never_prunes_an_earlier_runs_checkpoint(tiny_assets, run_dir):
    # Continue from step 2 while the earlier run's step 4 exists: keep_last=1 may prune the continued
    # run's step 2 and this run's own saves, but the earlier step 4 is kept under another name.
    ck = run_dir / "checkpoints"
    old4 = json.loads((ck / "step_00000004" / "trainer_state.json").read_text())
    tr = _trainer(tiny_assets, run_dir, train={"steps": 6},
                  checkpoint={"every": 1, "keep_last": 1, "resume": str(ck / "step_00000002")})()
    assert tr.step == 2
    tr.train()
    names = sorted(p.name for p in ck.iterdir())
    assert names[0] == "replaced-step_00000004-" + names[0].split("-", 2)[2] and names[1:] == ["step_00000006"], names
    assert json.loads((ck / names[0] / "trainer_state.json").read_text()) == old4


def test_unfinished_save_removed_at_next_start(tiny_assets, run_dir):
    junk = run_dir / "checkpoints" / ".tmp-step_00000099" / "engine"
    junk.mkdir(parents=True)
    (junk / "model.safetensors").write_bytes(b"half")
    tr = _trainer(tiny_assets, run_dir, checkpoint={"resume": "latest"})()
    assert tr.step == 4
    assert not (run_dir / "checkpoints" / ".tmp-step_00000099").exists()


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _empty(f: Path) -> None:
    f.write_bytes(b"")


@pytest.mark.parametrize("damage,rel", [(_truncate, "engine/model.safetensors"), (_empty, "engine/optim.pt")])
def test_damaged_newest_checkpoint_resumes_from_previous(tiny_assets, run_dir, capsys, damage, rel):
    bad = run_dir / "checkpoints" / "step_00000004" / rel
    damage(bad)
    tr = _trainer(tiny_assets, run_dir, train={"steps": 6}, checkpoint={"resume": "latest"})()
    out = capsys.readouterr().out
    warn = [x for x in out.splitlines() if "warning" in x]
    assert len(warn) == 1 and str(bad) in warn[0] and "damaged" in warn[0], out
    assert tr.step == 2
    tr.train()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]  # no step logged twice
    assert (run_dir / "checkpoints" / "step_00000006" / "trainer_state.json").is_file()


def test_engine_load_failure_of_a_checkpoint_without_manifest(tiny_assets, run_dir, capsys):
    # A checkpoint from before manifests: nothing to verify, so the engine's own load failure is caught.
    ck = run_dir / "checkpoints" / "step_00000004"
    state = json.loads((ck / "trainer_state.json").read_text())
    del state["files"]
    (ck / "trainer_state.json").write_text(json.dumps(state))
    _truncate(ck / "engine" / "optim.pt")
    tr = _trainer(tiny_assets, run_dir, checkpoint={"resume": "latest"})()
    assert tr.step == 2
    assert str(ck / "engine" / "optim.pt") in capsys.readouterr().out


def test_all_checkpoints_damaged_is_one_line_error(tiny_assets, run_dir, launcher):
    for step in (2, 4):
        _empty(run_dir / "checkpoints" / f"step_{step:08d}" / "engine" / "model.safetensors")
    # the run folder was made by the base trainer: the KnowDist launcher's own defaults (lr, betas, the
    # harvest section) are a config change, allowed here so the damaged checkpoints are what is tested
    proc = launcher.run("knowdist.py", *_cli_args(tiny_assets, run_dir, "--train.steps=6", "--resume",
                                                  "--checkpoint.allow_config_change=true"))
    bad = run_dir / "checkpoints" / "step_00000004" / "engine" / "model.safetensors"
    launcher.assert_user_error(proc, "cannot resume", str(bad), "0 bytes")


def test_resume_before_first_checkpoint_logs_no_step_twice(tiny_assets, run_dir):
    shutil.rmtree(run_dir / "checkpoints")  # killed before its first save: a log, no checkpoint
    tr = _trainer(tiny_assets, run_dir, checkpoint={"resume": "latest"})()
    assert tr.step == 0
    tr.train()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    (kept,) = run_dir.glob("metrics.*.jsonl")  # the earlier log, beside
    assert [json.loads(x)["step"] for x in kept.read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.dist
def test_used_folder_refused_on_every_rank(tiny_assets, run_dir, launcher):
    """2 DeepSpeed ranks in a used folder: rank 0 decides, every rank exits 2 with the same line (no
    rank waits forever for the others)."""
    import os
    import socket
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [a for a in _cli_args(tiny_assets, run_dir, "--train.steps=2") if a != "--deepspeed.engine=torch"]
    args += ["--deepspeed.engine=deepspeed", "--train.grad_accum=1"]
    procs = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2",
                   LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                   OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        env.pop("DISTILL_DEBUG", None)
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve().parents[2] / "launchers" / "knowdist.py"),
                                       *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for r, p in enumerate(procs):
        out, err = p.communicate(timeout=300)
        proc = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        line = launcher.assert_user_error(proc, f"[rank {r}]", str(run_dir), "--resume")
        assert "already holds checkpoints" in line


def test_used_or_busy_folder_refused_before_any_model_is_built(tmp_path, monkeypatch):
    """The built-in default in a used folder (or one a live run holds) is refused at once, before the
    built-in teacher is trained or a corpus harvested (it was refused after those minutes)."""
    from distill.config import ConfigError, load_config
    from distill.dist.lock import FolderLock
    from distill.knowdist import stage

    def no_models(*a, **k):
        raise AssertionError("a model was built before the run folder was checked")

    monkeypatch.setattr("distill.models.load.resolve_builtin", no_models)
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000002").mkdir(parents=True)
    cfg, _ = load_config(stage.KnowDistConfig, [f"--run.out_dir={out}"])
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        stage.run(cfg)
    busy = tmp_path / "busy"
    busy.mkdir()
    holder = FolderLock(busy)
    assert holder.acquire() is None
    try:
        cfg, _ = load_config(stage.KnowDistConfig, [f"--run.out_dir={busy}"])
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {os.getpid()}"):
            stage.run(cfg)
    finally:
        holder.release()
    assert FolderLock(busy).holder() is None  # released: no stale refusal
