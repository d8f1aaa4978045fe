"""Trainer.evaluate(): the gathered student is loaded strictly (a missing or unexpected key is an error
naming it; a tied alias or a non-persistent buffer is not), evaluated, and the result logged."""

from __future__ import annotations

import json

import pytest
import torch

from distill.config import RunConfig, from_dict

from .conftest import tiny_cfg_dict

EVAL = {"tasks": "sc/sst2", "limit": 2, "shots": 1, "batch_size": 4}


@pytest.fixture(scope="module")
def trainer(tiny_assets, tmp_path_factory):
    from distill.train.build import build_trainer

    out = tmp_path_factory.mktemp("eval_run")
    cfg = from_dict(RunConfig, tiny_cfg_dict(tiny_assets, out, train={"steps": 2, "warmup_steps": 0},
                                             checkpoint={"export": True}, eval={**EVAL, "every": 1, "at_end": True,
                                                                                               "teacher": True}))
    cfg.validate()
    return build_trainer(cfg)


def test_evaluate_loads_trained_student_and_logs(trainer, monkeypatch):
    import distill.eval.sentibench as sb

    seen = {}
    real = sb.evaluate

    def spy(model, tokenizer, **kw):
        if not str(kw.get("model_name")).startswith("teacher "):  # the student's evaluations
            seen["sd"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return real(model, tokenizer, **kw)

    monkeypatch.setattr(sb, "evaluate", spy)
    result = trainer.train()
    assert result["eval"]["tasks"]["sc/sst2"]["n"] == 2
    trained = trainer.engine.module.state_dict()
    assert seen["sd"].keys() == trained.keys()
    for k, v in trained.items():
        torch.testing.assert_close(seen["sd"][k], v.detach().cpu(), rtol=0, atol=0, msg=k)
    recs = [json.loads(x) for x in (trainer.out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "eval" in r]
    # during training on the validation split (sst2 has one), at the end on the test split
    assert [(r["step"], r["eval"]["split"]) for r in evals] == [(1, "val"), (2, "val"), (2, "test")]
    assert evals[-1]["eval"]["tasks"]["sc/sst2"]["score"] == pytest.approx(result["eval"]["tasks"]["sc/sst2"]["score"])
    assert evals[-1]["eval"]["model"] == f"{trainer.out_dir.name} (step 2)"
    # the final scores as a SentiBench results.json that `sentibench plot` reads
    from distill.errors import run_cli
    from distill.eval.sentibench import main as sentibench_main

    res = trainer.out_dir / "sentibench" / "results.json"
    assert json.loads(res.read_text())["split"] == "test"
    png = trainer.out_dir / "plot.png"
    assert run_cli(sentibench_main, "sentibench", ["plot", str(res), "-o", str(png)]) == 0 and png.is_file()
    # eval.teacher: the teacher on the same slice, beside the student in results.md
    teacher = json.loads((trainer.out_dir / "sentibench" / "teacher" / "results.json").read_text())
    assert teacher["split"] == "test" and teacher["tasks"]["sc/sst2"]["n"] == 2 and teacher["model"].startswith("teacher ")
    md = (trainer.out_dir / "sentibench" / "results.md").read_text()
    assert f"| {trainer.out_dir.name} (step 2) |" in md and f"| {teacher['model']} |" in md
    # the export comes after the final evaluation: its model card shows the test scores
    card = (trainer.out_dir / "export" / "README.md").read_text()
    assert "Not evaluated" not in card and "Scores x100 at step 2, first 2 test examples per task" in card


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_evaluate_refuses_a_mismatched_state_dict(trainer, monkeypatch, change):
    import distill.eval.sentibench as sb

    sd = trainer.gathered_state_dict()
    if change == "missing":
        key = "model.layers.1.mlp.down_proj.weight"
        del sd[key]
    else:
        key = "model.layers.2.mlp.down_proj.weight"  # a layer the 2-layer config does not have
        sd[key] = torch.zeros(1)
    monkeypatch.setattr(trainer.outputs, "gathered_state_dict", lambda: sd)
    monkeypatch.setattr(sb, "evaluate", lambda *a, **k: pytest.fail("evaluated a model with a bad state dict"))
    with pytest.raises(RuntimeError, match=rf"{change} 1 \['{key}'\]") as e:
        trainer.evaluate()
    msg = str(e.value)
    assert "\n" not in msg and "LlamaForCausalLM(model_type=llama" in msg and trainer.outputs.student_path in msg


def test_strict_load_accepts_tied_alias_and_non_persistent_buffer():
    from transformers import AutoModelForCausalLM

    from distill.models.tiny import build_tiny_causal_lm
    from distill.train.outputs import load_state_dict_strict

    src = build_tiny_causal_lm(64, "micro", seed=5, tie_word_embeddings=True)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    del sd["lm_head.weight"]  # stored once, under the embedding's name
    sd["model.rotary_emb.inv_freq"] = src.model.rotary_emb.inv_freq.clone()  # non-persistent: rebuilt, dropped
    dst = AutoModelForCausalLM.from_config(src.config)
    load_state_dict_strict(dst, sd, what="tied")
    assert dst.lm_head.weight is dst.model.embed_tokens.weight
    torch.testing.assert_close(dst.lm_head.weight, src.model.embed_tokens.weight, rtol=0, atol=0)

    # The same missing key is an error when the embeddings are not tied.
    untied = build_tiny_causal_lm(64, "micro", seed=5)
    sd = dict(untied.state_dict())
    del sd["lm_head.weight"]
    with pytest.raises(RuntimeError, match=r"tie_word_embeddings=False\): missing 1 \['lm_head.weight'\]"):
        load_state_dict_strict(AutoModelForCausalLM.from_config(untied.config), sd, what="untied")
    # Tied in the model but different in the state dict: also an error.
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["lm_head.weight"] = torch.zeros_like(sd["lm_head.weight"])
    with pytest.raises(RuntimeError, match="tied in the model but different"):
        load_state_dict_strict(AutoModelForCausalLM.from_config(src.config), sd, what="tied")
