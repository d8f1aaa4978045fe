"""A model folder that is not a causal LM (issue 26): the shared loader (distill.models.load) names what
it is in one line, for every entry point; KnowDist checks its folders before building or loading any
model. Tiny BERT configs built in-process; no weights are needed to be refused."""

from __future__ import annotations

import pytest

from distill.errors import UserError
from distill.models.load import not_a_causal_lm

from .conftest import tiny_cfg_dict


def bert_folder(path, **extra):
    from transformers import BertConfig

    BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               **extra).save_pretrained(path)
    return path


@pytest.mark.parametrize("config,kind", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, None),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, None),
    ({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}, None),  # in the causal mapping
    ({"model_type": "qwen2"}, None),  # no architectures: the model type's
    ({"model_type": "acme", "architectures": ["AcmeForCausalLM"]}, None),  # remote code
    ({"model_type": "acme", "auto_map": {"AutoModelForCausalLM": "m.Acme"}, "architectures": ["AcmeModel"]}, None),
    ({"model_type": "acme"}, None),  # unknown type, nothing to go by
    ({"model_type": "bert", "architectures": ["BertLMHeadModel"], "is_decoder": True}, None),
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "a bert (BertForMaskedLM)"),
    ({"model_type": "bert"}, "a bert whose config lists no architectures and does not set is_decoder (an encoder)"),
    ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, "a t5 (T5ForConditionalGeneration)"),
    ({"model_type": "llama", "architectures": ["LlamaModel"]}, "a llama (LlamaModel)"),  # no LM head
    ({"model_type": "t5"}, "a t5 model"),
])
def test_what_is_a_causal_lm(config, kind):
    assert not_a_causal_lm(config) == kind


def test_shared_loader_refuses_a_bert_folder(tmp_path):
    import torch

    from distill.models.load import load_causal_lm

    b = bert_folder(tmp_path / "bert", architectures=["BertForMaskedLM"])
    with pytest.raises(UserError, match=rf"^teacher folder \(model.teacher\) {b} is a bert \(BertForMaskedLM\), not a "
                                        r"causal language model"):
        load_causal_lm(str(b), dtype=torch.float32, attn=None, what="teacher folder (model.teacher)")


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_knowdist_refuses_a_bert_before_loading_a_model(tiny_assets, tmp_path, capsys, monkeypatch, launcher, role):
    import yaml

    import distill.train.build
    from distill.errors import run_cli

    def boom(*a, **k):
        raise AssertionError("the trainer started before the model folders were checked")

    monkeypatch.setattr(distill.train.build, "build_trainer", boom)
    b = bert_folder(tmp_path / "bert", architectures=["BertForMaskedLM"])
    cfg = tiny_cfg_dict(tiny_assets, tmp_path / "run", model={role: str(b)})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    rc = run_cli(launcher.load("knowdist.py").main, "knowdist.py", ["--config", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert f"{role} folder (model.{role}) {b} is a bert (BertForMaskedLM), not a causal language model" in err
