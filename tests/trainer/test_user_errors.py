"""Bad input through the launcher: exit status 2, one error line naming the file and key, no traceback
(issue 11). Config, YAML and CLI errors fail before any model is loaded; DeepSpeed JSON errors before
DeepSpeed sees the file; model-folder errors at the folder that is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import tiny_cfg_dict


def _yaml(tmp_path, text: str, name: str = "c.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# -- config / CLI / YAML -------------------------------------------------------------------------

@pytest.mark.parametrize("text,needles", [
    ("train:\n  lr: [0.1\n", ["c.yaml", "invalid YAML at line"]),
    ("- train\n- kd\n", ["c.yaml", "top level must be a mapping", "list"]),
    ("kd:\n  temprature: 2\n", ["c.yaml", "kd", "temprature"]),
    ("train:\n  lr: fast\n", ["c.yaml", "train.lr", "expected a number", "'fast'"]),
    ("train:\n  lr: 0.1\n  steps: 3\n  lr: 0.2\n", ["c.yaml", "'lr'", "twice", "lines 2 and 4"]),
    ("train:\n  epochs: -1\n", ["train.epochs=-1.0", ">= 0"]),
])
def test_bad_yaml(tmp_path, launcher, text, needles):
    proc = launcher.run("knowdist.py", "--config", _yaml(tmp_path, text))
    launcher.assert_user_error(proc, *needles)


def test_invalid_yaml_names_the_line(tmp_path, launcher):
    proc = launcher.run("knowdist.py", "--config", _yaml(tmp_path, "run:\n  out_dir: x\ntrain:\n  lr: 'open\n"))
    line = launcher.assert_user_error(proc, "c.yaml", "invalid YAML at line")
    assert "line 4" in line or "line 5" in line, line


@pytest.mark.parametrize("args,needles", [
    (["--config", "/nonexistent/run.yaml"], ["/nonexistent/run.yaml", "does not exist"]),
    (["--train.epochs=-2"], ["train.epochs=-2.0"]),
    (["--train.lr=-1e-4"], ["train.lr=-0.0001", "> 0"]),
    (["--train.steps=-3"], ["train.steps=-3"]),
    (["--train.steps=abc"], ["command line", "train.steps", "expected an integer"]),
    (["--train.adam_betas=[0.9"], ["train.adam_betas", "not valid JSON"]),
    (["--trian.lr=1"], ["command line", "trian"]),
    # printed the config and exited 0, ignoring the value
    (["--print-config", "yaml"], ["--print-config takes no value (got 'yaml')"]),
    (["--harvest.max_new_tokens=0"], ["harvest.max_new_tokens=0 must be >= 1"]),
    (["--kd.teacher_backend=colocatd"], ["kd.teacher_backend='colocatd' is not a teacher backend"]),
])
def test_bad_cli(launcher, args, needles):
    launcher.assert_user_error(launcher.run("knowdist.py", *args), *needles)


# -- DeepSpeed JSON ------------------------------------------------------------------------------

def _run_ds(tmp_path, launcher, tiny_assets, ds_text: str | None):
    ds = tmp_path / "ds.json"
    if ds_text is not None:
        ds.write_text(ds_text)
    return launcher.run("knowdist.py", f"--model.student={tiny_assets['student']}",
                        f"--model.teacher={tiny_assets['teacher']}", f"--data.path={tiny_assets['data']}",
                        f"--run.out_dir={tmp_path / 'run'}", "--deepspeed.engine=deepspeed",
                        f"--deepspeed.config={ds}", "--log.progress_bar=false")


@pytest.mark.parametrize("text,needles", [
    (None, ["ds.json", "does not exist"]),
    ('{"zero_optimization": {\n  "stage": 3,\n}}', ["ds.json", "not valid JSON at line 3, column 1"]),
    ("[1, 2]", ["ds.json", "must be an object", "list"]),
    ('{"zero_optimization": {"stage": 5}}', ["ds.json", "zero_optimization.stage", "5", "0, 1, 2 or 3"]),
    ('{"zero_optimization": {"stage": "three"}}', ["ds.json", "zero_optimization.stage", "'three'"]),
    ('{"zero_optimization": [{"stage": 3}]}', ["ds.json", "'zero_optimization'", "must be an object"]),
    ('{"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "1e5"}}',
     ["ds.json", "zero_optimization.stage3_param_persistence_threshold", "'1e5'", "a number"]),
    ('{"bf16": true}', ["ds.json", "'bf16'", "must be an object"]),
    # a misspelt block used to run ZeRO stage 0 with exit 0; a misspelt ZeRO key was a pydantic traceback
    ('{"zero_optimisation": {"stage": 3}}', ["ds.json", "'zero_optimisation' is not a DeepSpeed setting",
                                             "did you mean 'zero_optimization'"]),
    ('{"zero_optimization": {"stage": 3, "offload_optimizer": {"devce": "cpu"}}}',
     ["ds.json", "'zero_optimization.offload_optimizer.devce'", "did you mean 'device'"]),
])
def test_bad_ds_json(tmp_path, launcher, tiny_assets, text, needles):
    launcher.assert_user_error(_run_ds(tmp_path, launcher, tiny_assets, text), *needles)


def test_ds_key_check_accepts_every_shipped_config_and_deepspeeds_own_keys(tmp_path):
    """The key check refuses only what the installed DeepSpeed does not read: the shipped JSON files
    and blocks DeepSpeed documents (optimizer profiling, activation checkpointing, monitors, aio,
    ZeRO's nested offload settings and its aliases) pass; a near miss names the nearest key."""
    import json

    from distill.config import ConfigError
    from distill.dist.ds_config import REPO_ROOT, check_known_keys

    shipped = sorted((REPO_ROOT / "ds_configs").glob("*.json"))
    assert shipped
    for f in shipped:
        check_known_keys(json.loads(f.read_text()), f)
    ok = {"flops_profiler": {"enabled": False}, "activation_checkpointing": {"partition_activations": False},
          "tensorboard": {"enabled": False}, "wandb": {"enabled": False}, "aio": {"block_size": 1048576},
          "communication_data_type": "fp32", "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1e9, "offload_param": {"device": "cpu",
                                                                                                  "pin_memory": True}}}
    check_known_keys(ok, tmp_path / "ok.json")
    with pytest.raises(ConfigError, match=r"'wall_clock_breakdwn' is not a DeepSpeed setting; did you mean "
                                          r"'wall_clock_breakdown'"):
        check_known_keys({"wall_clock_breakdwn": True}, tmp_path / "bad.json")


# -- model folders -------------------------------------------------------------------------------

def _run(tmp_path, launcher, assets, *args, env=None, steps=1):
    d = tiny_cfg_dict(assets, tmp_path / "run", train={"steps": steps, "warmup_steps": 0})
    cfg = tmp_path / "run.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(d))
    return launcher.run("knowdist.py", "--config", str(cfg), *args, env=env)


def _copy(src, dst, drop=()):
    shutil.copytree(src, dst)
    for f in drop:
        (dst / f).unlink()
    return dst


def test_student_folder_missing(tmp_path, launcher, tiny_assets):
    proc = _run(tmp_path, launcher, tiny_assets, f"--model.student={tmp_path / 'nope' / 'student'}")
    launcher.assert_user_error(proc, str(tmp_path / "nope" / "student"), "does not exist", str(tmp_path))


def test_hub_name_offline(tmp_path, launcher, tiny_assets):
    proc = _run(tmp_path, launcher, tiny_assets, "--model.teacher=no-such-org/no-such-model",
                env={"HF_HUB_OFFLINE": "1"})
    launcher.assert_user_error(proc, "no-such-org/no-such-model", "could not be found or downloaded")


@pytest.mark.parametrize("case", ["no_config", "no_weights", "truncated", "bad_config_json"])
def test_teacher_folder_broken(tmp_path, launcher, tiny_assets, case):
    t = _copy(tiny_assets["teacher"], tmp_path / "teacher")
    if case == "no_config":
        (t / "config.json").unlink()
        needles = [str(t), "no config.json"]
    elif case == "no_weights":
        (t / "model.safetensors").unlink()
        needles = [str(t), "no weights file"]
    elif case == "truncated":
        w = t / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        needles = [str(w), "truncated or corrupt"]
    else:
        (t / "config.json").write_text('{"vocab_size": 384,\n  "model_type": }')
        needles = [str(t / "config.json"), "not valid JSON at line 2"]
    launcher.assert_user_error(_run(tmp_path, launcher, tiny_assets, f"--model.teacher={t}"), *needles)


def test_student_torch_bin_truncated(tmp_path, launcher, tiny_assets):
    import torch
    from safetensors.torch import load_file

    s = _copy(tiny_assets["student"], tmp_path / "student", drop=["model.safetensors"])
    w = s / "pytorch_model.bin"
    torch.save(load_file(str(Path(tiny_assets["student"]) / "model.safetensors")), w)
    w.write_bytes(w.read_bytes()[:1000])
    proc = _run(tmp_path, launcher, tiny_assets, f"--model.student={s}")
    launcher.assert_user_error(proc, str(s), "the weights could not be loaded")


def _teacher_without_tokenizer(folder, rows: int):
    from distill.models.tiny import build_tiny_causal_lm

    build_tiny_causal_lm(rows, "micro", seed=3).save_pretrained(folder)
    return folder


def test_teacher_without_tokenizer_too_few_rows(tmp_path, launcher, tiny_assets):
    n = len(tiny_assets["tokenizer"])
    t = _teacher_without_tokenizer(tmp_path / "teacher", n - 100)
    proc = _run(tmp_path, launcher, tiny_assets, f"--model.teacher={t}")
    launcher.assert_user_error(proc, str(t), "no tokenizer files", f"{n - 100} embedding rows", f"{n} tokens")


def test_teacher_without_tokenizer_warns(tmp_path, launcher, tiny_assets):
    n = len(tiny_assets["tokenizer"])
    t = _teacher_without_tokenizer(tmp_path / "teacher", 2 * n)
    proc = _run(tmp_path, launcher, tiny_assets, f"--model.teacher={t}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    warn = [x for x in proc.stdout.splitlines() if "no tokenizer files" in x]
    assert len(warn) == 1 and str(t) in warn[0] and f"student's tokenizer of {n} tokens" in warn[0], proc.stdout[-3000:]
    json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])


# -- run and checkpoint folders that cannot be written: one line before any model loads ---------------

def _cfg(assets, out_dir, **sections):
    from distill.config import RunConfig, from_dict

    cfg = from_dict(RunConfig, tiny_cfg_dict(assets, out_dir, **sections))
    cfg.validate()
    return cfg


@pytest.mark.parametrize("case", ["out_dir_is_a_file", "checkpoints_is_a_file", "checkpoint_dir_under_a_file",
                                  "read_only"])
def test_unwritable_run_folder(tmp_path, tiny_assets, monkeypatch, case):
    """As root, chmod cannot make a folder read-only: a file stands in the folder's place, and the
    read-only file system is the write probe failing with EROFS."""
    import errno

    import distill.fileio
    from distill.config import ConfigError
    from distill.models import load as ml
    from distill.train.build import build_trainer

    out, extra = tmp_path / "run", {}
    if case == "out_dir_is_a_file":
        out.write_text("x")
        needles = [f"run folder (run.out_dir) {out} is a file, not a folder", "--run.out_dir"]
    elif case == "checkpoints_is_a_file":
        out.mkdir()
        (out / "checkpoints").write_text("x")
        needles = [f"{out / 'checkpoints'} is a file, not a folder", "--checkpoint.dir or another --run.out_dir"]
    elif case == "checkpoint_dir_under_a_file":
        (tmp_path / "disk").write_text("x")
        extra = {"checkpoint": {"dir": str(tmp_path / "disk" / "ck")}}
        needles = [f"checkpoint folder (checkpoint.dir) {tmp_path / 'disk' / 'ck'} cannot be made: "
                   f"{tmp_path / 'disk'} is a file"]
    else:
        real_open = open

        def ro_open(path, *a, **k):
            if ".write-probe-" in str(path):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, *a, **k)

        monkeypatch.setattr(distill.fileio, "open", ro_open, raising=False)
        needles = [f"run folder (run.out_dir) {out} is not writable (read-only file system (EROFS))"]
    monkeypatch.setattr(ml, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError) as e:
        build_trainer(_cfg(tiny_assets, out, **extra))
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_knowdist_checks_folders_before_its_own_work(tmp_path, tiny_assets, monkeypatch):
    """The KnowDist stage (built-in models, harvest, then the trainer) asks first, writing nothing."""
    from distill.config import ConfigError, from_dict
    from distill.knowdist.stage import KnowDistConfig, run
    from distill.models import load as ml

    (tmp_path / "run").write_text("x")
    cfg = from_dict(KnowDistConfig, tiny_cfg_dict(tiny_assets, tmp_path / "run" / "sub"))
    monkeypatch.setattr(ml, "resolve_builtin", lambda *a, **k: pytest.fail("models were resolved"))
    with pytest.raises(ConfigError, match=f"cannot be made: {tmp_path / 'run'} is a file, not a folder"):
        run(cfg, [])


def test_knowdist_checks_the_machine_before_its_own_work(tmp_path, tiny_assets, monkeypatch):
    import torch

    from distill.config import ConfigError, from_dict
    from distill.knowdist.stage import KnowDistConfig, run
    from distill.models import load as ml

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = from_dict(KnowDistConfig, tiny_cfg_dict(tiny_assets, tmp_path / "run", kd={"impl": "triton"}))
    monkeypatch.setattr(ml, "resolve_builtin", lambda *a, **k: pytest.fail("models were resolved"))
    with pytest.raises(ConfigError, match="kd.impl=triton runs the Triton kernels on a CUDA GPU"):
        run(cfg, [])  # was a RuntimeError from triton ("0 active drivers") at the first step


# -- a full disk during a checkpoint save: one line naming the file and the last intact checkpoint --------

@pytest.mark.parametrize("error", ["enospc", "torch_save_full", "bug"])
def test_full_disk_during_checkpoint_save(tmp_path, tiny_assets, monkeypatch, capsys, error):
    """Step 2's save fails mid-write: the run stops with exit 2 and one line; step 1's checkpoint is
    intact and resumes; the unfinished .tmp-step_2 is removed. torch.save reports a full disk as its
    own RuntimeError: with no room left that is a full disk too; with room left it is a bug (traceback)."""
    import errno
    import shutil

    from distill.dist.engine import TorchEngine
    from distill.errors import run_cli
    from distill.train.build import build_trainer
    from distill.train.checkpoint import list_checkpoints

    real_save, calls = TorchEngine.save, []

    def save(self, folder):
        calls.append(folder)
        if len(calls) < 2:
            return real_save(self, folder)
        folder.mkdir(parents=True)
        (folder / "optim.pt").write_bytes(b"partial")
        if error == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "optim.pt"))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 180544 vs 180436")

    monkeypatch.setattr(TorchEngine, "save", save)
    if error == "torch_save_full":
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=0))
    out = tmp_path / "run"
    cfg = _cfg(tiny_assets, out, train={"steps": 3, "warmup_steps": 0, "grad_accum": 1},
               checkpoint={"every": 1, "export": False})
    tr = build_trainer(cfg)
    if error == "bug":
        with pytest.raises(RuntimeError, match="unexpected pos"):
            tr.train()
        return
    assert run_cli(lambda argv: tr.train(), "knowdist.py", []) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    ck = out / "checkpoints"
    why = f"{ck / '.tmp-step_00000002' / 'engine' / 'optim.pt'}: no space left on device (ENOSPC)" \
        if error == "enospc" else f"{ck / '.tmp-step_00000002'}: no space left on device (ENOSPC; 0 bytes free; RuntimeError"
    assert line.startswith(f"knowdist.py: error: checkpoint at step 2 not saved: {why}"), line
    assert (f"the unfinished .tmp-step_00000002 was removed; last intact checkpoint: {ck / 'step_00000001'}: free "
            f"space" in line and line.endswith("then continue from it with --resume")), line
    assert not (ck / ".tmp-step_00000002").exists()
    (good,) = list_checkpoints(ck)
    state = json.loads((good / "trainer_state.json").read_text())
    assert state["step"] == 1 and all((good / f).stat().st_size == v["size"] for f, v in state["files"].items())
    if error == "enospc":  # and it resumes
        monkeypatch.setattr(TorchEngine, "save", real_save)
        resumed = build_trainer(_cfg(tiny_assets, out, train={"steps": 3, "warmup_steps": 0, "grad_accum": 1},
                               checkpoint={"every": 1, "export": False, "resume": "latest"}))
        assert resumed.step == 1


# -- a run that trains nothing: one warning ---------------------------------------------------------------

def test_stalled_run_warns_once(tmp_path, tiny_assets, monkeypatch, capsys):
    """Every label masked: loss 0 and a zero gradient norm at every step; one warning (rank 0, once)
    naming the steps and the likely causes, after Trainer.STALL_STEPS steps."""
    from distill.data import registry as R
    from distill.train.build import build_trainer
    from distill.train.loop import Trainer

    @R.register_dataset("test_all_masked")
    def _masked(cfg, tok, ctx):
        ds = R.DATASETS["sft"](cfg, tok, ctx)

        class Masked:
            def __len__(self):
                return len(ds)

            def __getitem__(self, i):
                item = dict(ds[i])
                item["labels"] = [-100] * len(item["labels"])
                return item

        return Masked()

    monkeypatch.setattr(Trainer, "STALL_STEPS", 3)
    try:
        tr = build_trainer(_cfg(tiny_assets, tmp_path / "run", data={"name": "test_all_masked"}, kd={"kind": "none"},
                            train={"steps": 5, "warmup_steps": 0, "grad_accum": 1},
                            checkpoint={"export": False}))
        tr.train()
    finally:
        R.DATASETS.pop("test_all_masked")
    warn = [x for x in capsys.readouterr().out.splitlines() if "nothing is being trained" in x]
    assert len(warn) == 1, warn
    assert warn[0].startswith("[trainer] warning: steps 1-3: the gradient norm was 0 and the loss did not move from 0 "
                              "(3 steps in a row)"), warn
    assert "learning rate of 0" in warn[0] and "frozen" in warn[0] and "every label masked" in warn[0]


def test_training_run_does_not_warn(tmp_path, tiny_assets, monkeypatch, capsys):
    from distill.train.build import build_trainer
    from distill.train.loop import Trainer

    monkeypatch.setattr(Trainer, "STALL_STEPS", 2)
    build_trainer(_cfg(tiny_assets, tmp_path / "run", train={"steps": 3, "warmup_steps": 0, "grad_accum": 1},
                   checkpoint={"export": False})).train()
    assert "nothing is being trained" not in capsys.readouterr().out


def test_full_disk_during_export(tmp_path, tiny_assets, monkeypatch, capsys):
    """The final export fails for lack of space: one line naming the folder and the command that
    exports the (complete) final checkpoint later; the partial export folder is removed."""
    import errno

    import distill.models.export as ex
    from distill.errors import run_cli
    from distill.train.build import build_trainer

    def full(sd, config, tok, out, **kw):
        partial = out.parent / f".tmp-{out.name}-{__import__('os').getpid()}"
        partial.mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device", str(partial / "model.safetensors"))

    monkeypatch.setattr(ex, "export_hf", full)
    out = tmp_path / "run"
    tr = build_trainer(_cfg(tiny_assets, out, train={"steps": 1, "warmup_steps": 0, "grad_accum": 1}))
    assert run_cli(lambda argv: tr.train(), "knowdist.py", []) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    ck = out / "checkpoints" / "step_00000001"
    assert line.startswith(f"knowdist.py: error: student not exported to {out / 'export'}: ") and "(ENOSPC)" in line, line
    assert line.endswith(f"last intact checkpoint: {ck}: free space (or lower checkpoint.keep_last, or give "
                         f"--checkpoint.dir on another disk), then python -m distill.export --checkpoint {ck} --out "
                         f"{out / 'export'}"), line
    assert not list(out.glob(".tmp-export-*"))
