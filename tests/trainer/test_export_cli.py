"""distill.export: a trainer checkpoint (torch engine, DeepSpeed ZeRO-3) becomes a plain HF folder with a
model card, equal to the run's own export."""

from __future__ import annotations

import json

import pytest
import torch

from distill.errors import EXIT_USER_ERROR, run_cli

from .conftest import run_child, tiny_cfg_dict


def _export(argv, capsys):
    from distill.export import main

    rc = run_cli(main, "export", argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _weights(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _assert_same(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k, **tol)


def _assert_card(folder, *, steps, assets):
    card = (folder / "README.md").read_text()
    for needle in ("distill", "Base model (student init)", assets["student"], "Teacher", assets["teacher"],
                   "Data", assets["data"], "Objective", "forward_kl", "Temperature T", "Weights", "Top-k",
                   f"**Steps**: {steps}", "SentiBench"):
        assert needle in card, needle
    return card


@pytest.fixture(scope="module")
def torch_run(tiny_assets, tmp_path_factory):
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    run = tmp_path_factory.mktemp("export_torch") / "run"
    cfg = tiny_cfg_dict(tiny_assets, run, train={"steps": 4, "warmup_steps": 1}, checkpoint={"every": 2, "keep_last": 2})
    build_trainer(from_dict(RunConfig, cfg)).train()
    return run


def test_torch_checkpoint_exports_like_the_run(torch_run, tiny_assets, tmp_path, capsys):
    from transformers import AutoTokenizer

    ckpt = torch_run / "checkpoints" / "step_00000004"
    assert (ckpt / "engine" / "model.safetensors").is_file()
    out = tmp_path / "exp"
    rc, stdout, err = _export(["--checkpoint", str(ckpt), "--out", str(out)], capsys)
    assert rc == 0, err
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    _assert_same(_weights(out), _weights(torch_run / "export"), rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out)("the food was great")["input_ids"] == \
        AutoTokenizer.from_pretrained(torch_run / "export")("the food was great")["input_ids"]
    _assert_card(out, steps=4, assets=tiny_assets)
    # the trainer's own export has the card too
    _assert_card(torch_run / "export", steps=4, assets=tiny_assets)

    # a run folder means its newest checkpoint; an earlier one gives other weights
    rc, _, err = _export(["--checkpoint", str(torch_run), "--out", str(tmp_path / "latest")], capsys)
    assert rc == 0, err
    _assert_same(_weights(tmp_path / "latest"), _weights(out), rtol=0, atol=0)
    rc, _, err = _export(["--checkpoint", str(torch_run / "checkpoints" / "step_00000002"), "--out",
                          str(tmp_path / "s2")], capsys)
    assert rc == 0, err
    assert "**Steps**: 2" in (tmp_path / "s2" / "README.md").read_text()
    a, b = _weights(tmp_path / "s2"), _weights(out)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_card_lists_sentibench_scores(torch_run, tiny_assets, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(torch_run, run)
    ev = {"tasks": {"sc/sst2": {"score": 51.25}}, "overall": {"score": 51.25}, "limit": 50, "sample": False}
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 4, "eval": ev}) + "\n")
    cfg_file = run / "checkpoints" / "step_00000004" / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace(str(torch_run), str(run)))
    rc, _, err = _export(["--checkpoint", str(run / "checkpoints" / "step_00000004"), "--out", str(tmp_path / "e")], capsys)
    assert rc == 0, err
    card = (tmp_path / "e" / "README.md").read_text()
    assert "| sc/sst2 | 51.25 |" in card and "| overall | 51.25 |" in card
    # the step-2 checkpoint predates that evaluation: no scores on its card
    rc, _, err = _export(["--checkpoint", str(run / "checkpoints" / "step_00000002"), "--out", str(tmp_path / "e2")], capsys)
    assert rc == 0, err
    assert "51.25" not in (tmp_path / "e2" / "README.md").read_text()


def test_user_errors_and_push_flag(torch_run, tmp_path, capsys, monkeypatch):
    rc, _, err = _export(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert rc == EXIT_USER_ERROR and "no such folder" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    rc, _, err = _export(["--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], capsys)
    assert rc == EXIT_USER_ERROR and "not a complete checkpoint" in err

    from distill.export import build_parser

    args = build_parser().parse_args(["--checkpoint", "c", "--out", "o", "--push_to_hub", "org/student"])
    assert args.push_to_hub == "org/student"
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the upload must fail in one line
    rc, out, err = _export(["--checkpoint", str(torch_run / "checkpoints" / "step_00000004"), "--out",
                            str(tmp_path / "p"), "--push_to_hub", "org/student"], capsys)
    assert rc == EXIT_USER_ERROR and "--push_to_hub org/student: upload failed" in err
    assert len(err.strip().splitlines()) == 1
    assert (tmp_path / "p" / "model.safetensors").is_file()  # the export itself is complete


@pytest.mark.dist
@pytest.mark.slow
def test_zero3_checkpoint_exports_like_the_run(tiny_assets, tmp_path, capsys):
    pytest.importorskip("deepspeed")
    ds_json = tmp_path / "zero3.json"
    ds_json.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": True}}))
    run = tmp_path / "zero3"
    cfg = tiny_cfg_dict(tiny_assets, run, train={"steps": 2, "micro_batch": 4, "grad_accum": 1, "warmup_steps": 1},
                        checkpoint={"every": 2})
    cfg["deepspeed"] = {"engine": "deepspeed", "config": str(ds_json)}
    out = run_child({"cfg": cfg}, tmp_path, world=1, timeout=600)
    assert "zero_stage=3" in out[0]
    ckpt = run / "checkpoints" / "step_00000002"
    assert any((ckpt / "engine" / "engine").glob("*zero_pp_rank_0*optim_states.pt"))
    exp = tmp_path / "exp"
    rc, _, err = _export(["--checkpoint", str(ckpt), "--out", str(exp)], capsys)
    assert rc == 0, err
    _assert_same(_weights(exp), _weights(run / "export"), rtol=1e-6, atol=1e-7)
    _assert_card(exp, steps=2, assets=tiny_assets)


def test_schema_of_a_checkpoint_without_recorded_class(tmp_path):
    """Checkpoints written before trainer_state.json named the config class: a stage-only section picks
    the stage's schema (KnowDist's ``harvest``); a class outside distill is refused, not imported."""
    from pathlib import Path

    from distill.config import RunConfig
    from distill.export import ExportError, config_class
    from distill.knowdist.stage import KnowDistConfig

    f = Path(tmp_path / "config.yaml")
    assert config_class({}, {"run": {}, "harvest": {}}, f) is KnowDistConfig
    assert config_class({}, {"run": {}, "kd": {}}, f) is RunConfig
    with pytest.raises(ExportError, match="not a distill config class"):
        config_class({"config_class": "os:system"}, {}, f)
