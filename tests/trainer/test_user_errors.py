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
