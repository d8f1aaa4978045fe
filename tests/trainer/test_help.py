"""``--help`` and ``--print-config`` of every launcher, generated from the config schema by
distill.config.load_config; and every schema field has the one-line comment the help shows."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import yaml

from distill.config import RunConfig, config_help, field_comments, load_config

from ..conftest import load_launcher

LAUNCHERS = ["knowdist.py", "harvest.py", "icldist.py"]


def _schemas():
    from distill.icldist.config import ICLDistConfig
    from distill.knowdist.harvest import HarvestConfig

    return [RunConfig, load_launcher("knowdist.py").KnowDistConfig, HarvestConfig, ICLDistConfig]


def _leaf_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from _leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", comments.get(f.name, "")


@pytest.mark.parametrize("schema", _schemas(), ids=lambda c: c.__name__)
def test_every_config_field_has_a_comment(schema):
    missing = [k for k, c in _leaf_fields(schema) if not c]
    assert not missing, f"{schema.__name__}: fields without a trailing '# comment': {missing}"
    text = config_help(schema, prog="x")
    for key, comment in _leaf_fields(schema):
        assert f"--{key}=" in text and comment in text, key


def test_comment_extraction_is_robust():
    @dataclasses.dataclass
    class S:
        a: str = "x # not a comment"  # the real one
        b: list[int] = dataclasses.field(  # on the first line
            default_factory=lambda: [1, 2])
        c: int = 3

    assert field_comments(S) == {"a": "the real one", "b": "on the first line"}


def test_help_in_process_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        load_config(RunConfig, ["--train.lr", "0.1", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert re.search(r"^  --train\.lr=2e-05 +AdamW peak learning rate$", out, re.M), out
    # a value that looks like a flag is a value, not --help
    cfg, rest = load_config(RunConfig, ["--run.name", "-h"])
    assert cfg.run.name == "-h" and rest == []


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_help(launcher, script):
    proc = launcher.run(script, "--help", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "unknown arguments" not in out + proc.stderr
    assert out.startswith(f"usage: {script}")
    if script == "harvest.py":
        needles = [(r"--sampling\.top_p=1\.0", "nucleus sampling mass"),
                   (r"--teacher\.replicas=1", "Ray: teacher replicas")]
    else:
        lr = {"knowdist.py": r"0\.002", "icldist.py": r"0\.001"}[script]  # each stage's own default
        needles = [(rf"--train\.lr={lr}", "AdamW peak learning rate"),
                   (r"--kd\.temperature=1\.0", "divides both logit sets; the KD term is scaled by T^2"),
                   (r"--log\.report_to=\[\]", "tensorboard | wandb | mlflow")]
    for key, comment in needles:
        assert re.search(rf"^  {key} +.*{re.escape(comment)}", out, re.M), (key, out)
    for section in (["input", "sampling", "output"] if script == "harvest.py" else ["train", "kd", "log"]):
        assert re.search(rf"^{section}:", out, re.M), section


@pytest.mark.parametrize("script,override,section,key,value", [
    ("knowdist.py", "--train.lr=0.5", "train", "lr", 0.5),
    ("icldist.py", "--train.lr=0.5", "train", "lr", 0.5),
    ("harvest.py", "--sampling.top_p=0.5", "sampling", "top_p", 0.5),
])
def test_launcher_print_config(launcher, script, override, section, key, value):
    proc = launcher.run(script, "--print-config", override, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(rf"^{section}:\n(  .*\n)*?  {key}: 0\.5$", proc.stdout, re.M), proc.stdout
    cfg = yaml.safe_load(proc.stdout)
    assert cfg[section][key] == value


def test_print_config_validates(launcher):
    proc = launcher.run("knowdist.py", "--print-config", "--train.lr=-1", timeout=120)
    launcher.assert_user_error(proc, "train.lr=-1")
