"""kd.path=lean (hidden states in, loss out) follows kd.path=logits (the models' full logits) through
the trainer: same losses, same student weights after the steps, on the plain engine in-process and on
2-rank DeepSpeed ZeRO-3 with a tied-embedding student and partitioned student and teacher."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import read_metrics, run_child, save_tiny_model, tiny_cfg_dict


def _run(cfg_dict):
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    tr = build_trainer(from_dict(RunConfig, cfg_dict))
    tr.train()
    return tr


def _weights(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _assert_same_run(a_dir, b_dir, rel=2e-5):
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for key in ("loss", "ce", "kd", "grad_norm", "response_tokens"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=rel, abs=1e-6), key
    wa, wb = _weights(a_dir / "export"), _weights(b_dir / "export")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("kd", [{"kind": "forward_kl"}, {"kind": "jsd", "beta": 0.3, "temperature": 2.0},
                                {"kind": "forward_kl", "topk": 8, "temperature": 2.0}],
                         ids=["full-fkl", "full-jsd-T2", "topk8-T2"])
def test_lean_equals_logits_plain_engine(tiny_assets, tmp_path, kd):
    runs = {}
    for path in ("lean", "logits"):
        d = tiny_cfg_dict(tiny_assets, tmp_path / path, train={"steps": 3}, kd={**kd, "path": path})
        runs[path] = _run(d)
    assert runs["lean"].lean_head is not None and runs["logits"].lean_head is None
    _assert_same_run(tmp_path / "lean", tmp_path / "logits")
    assert read_metrics(tmp_path / "lean")[0]["kd"] > 0.01  # a real teacher signal was compared


def test_lean_is_the_default_and_never_forms_full_logits(tiny_assets, tmp_path, monkeypatch):
    """The student's head never returns [B, L, V] logits during a lean step, and the teacher's
    full forward is not run (only its decoder and, once, its last-position check)."""
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    assert RunConfig().kd.path == "lean"
    tr = build_trainer(from_dict(RunConfig, tiny_cfg_dict(tiny_assets, tmp_path / "r", train={"steps": 1})))
    shapes = []
    head = tr.engine.module.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    t_head = tr.teacher.engine.module.get_output_embeddings()
    t_shapes = []
    t_handle = t_head.register_forward_hook(lambda m, i, o: t_shapes.append(tuple(i[0].shape)))
    tr.train_step(0)
    tr.train_step(1)
    handle.remove()
    t_handle.remove()
    assert shapes and all(s == () for s in shapes)  # the head returned the loss, never logits
    assert all(s[1] == 1 for s in t_shapes)  # the teacher's own head ran only for the one-time check


@pytest.mark.dist
@pytest.mark.slow
def test_lean_zero3_two_ranks_tied_student_matches_one_rank_logits(tiny_assets, tmp_path):
    """2 ranks x 2 micro-batches under ZeRO-3 (lean; student with tied embeddings, student and
    teacher partitioned) == 1 rank on the whole batch (plain engine, full logits)."""
    pytest.importorskip("deepspeed")
    from distill.models.tiny import TinySize

    tied = save_tiny_model(tiny_assets["tokenizer"], TinySize(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64),
                       5, tmp_path / "tied_student", tie_word_embeddings=True)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tied)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    ds_json = tmp_path / "zero3_test.json"
    ds_json.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 1000,
        "reduce_bucket_size": 1000, "stage3_gather_16bit_weights_on_model_save": True}}))
    common = {"train": {"steps": 2, "warmup_steps": 0, "grad_clip": 1.0}, "model": {"student": str(tied)},
              "kd": {"kind": "forward_kl", "temperature": 2.0}}
    ds_cfg = tiny_cfg_dict(tiny_assets, tmp_path / "zero3", **common)
    ds_cfg["train"].update(micro_batch=2, grad_accum=2)
    ds_cfg["deepspeed"] = {"engine": "deepspeed", "config": str(ds_json)}
    ds_cfg["teacher"] = {"placement": "partitioned"}
    ds_cfg["kd"]["path"] = "lean"
    out = run_child({"cfg": ds_cfg}, tmp_path, world=2)
    assert "zero_stage=3 world=2" in out[0]

    ref_cfg = tiny_cfg_dict(tiny_assets, tmp_path / "one", **common)
    ref_cfg["train"].update(micro_batch=8, grad_accum=1)
    ref_cfg["kd"]["path"] = "logits"
    _run(ref_cfg)
    _assert_same_run(tmp_path / "zero3", tmp_path / "one", rel=2e-4)
    # tied in the export too: one tensor for both names
    w = _weights(tmp_path / "zero3" / "export")
    torch.testing.assert_close(w["lm_head.weight"], w["model.embed_tokens.weight"])


@pytest.mark.parametrize("topk", [0, 8])
def test_packing_equals_unpacked(tiny_assets, tmp_path, topk):
    """data.packing puts several examples in one row (per-example positions, no attention mask):
    the same losses, token counts and student weights as the padded batches."""
    runs = {}
    for packing in (True, False):
        d = tiny_cfg_dict(tiny_assets, tmp_path / str(packing), train={"steps": 3},
                          data={"packing": packing, "max_len": 128}, kd={"topk": topk, "temperature": 2.0})
        runs[packing] = _run(d)
    batch = runs[True].micro_batches(0)[0]
    assert batch["input_ids"].shape[0] < 4 and "attention_mask" not in batch  # 4 examples in fewer rows
    _assert_same_run(tmp_path / "True", tmp_path / "False")
    a, b = read_metrics(tmp_path / "True"), read_metrics(tmp_path / "False")
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
