"""The co-located top-k teacher: tempered, over the real vocabulary, supervised positions only.

A teacher with padded embedding rows (whose logits would win the top-k) and a student whose weights
equal the teacher's on the real vocabulary but with a different number of padded rows: through
``launchers/knowdist.py`` the first step's KD is 0 at T = 1 and T = 2, on the torch engine and on 2
ZeRO-3 ranks (student and teacher partitioned), and the run trains on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import REPO, read_metrics, tiny_cfg_dict

TEACHER_ROWS, STUDENT_ROWS = 40, 8  # padded embedding rows beyond the tokenizer


@pytest.fixture(scope="module")
def padded_pair(tiny_assets, tmp_path_factory):
    """{teacher, student, vocab}: the student equals the teacher on the real vocabulary."""
    from transformers import AutoModelForCausalLM

    from distill.models.tiny import TinySize, build_tiny_causal_lm

    tok = tiny_assets["tokenizer"]
    vocab = len(tok)
    root = tmp_path_factory.mktemp("padded")
    size = TinySize(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)
    teacher = build_tiny_causal_lm(vocab + TEACHER_ROWS, size, seed=3, initializer_range=0.3)
    with torch.no_grad():
        # Padded rows that would dominate any top-k, log-partition or tail that included them.
        teacher.lm_head.weight[vocab:] = teacher.lm_head.weight[:1].sign() * 2.0
    student = build_tiny_causal_lm(vocab + STUDENT_ROWS, size, seed=4)
    sd = {k: v.clone() for k, v in teacher.state_dict().items()}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[key] = torch.cat([sd[key][:vocab], torch.randn(STUDENT_ROWS, size.hidden) * 3.0])
    student.load_state_dict(sd)
    for name, m in (("teacher", teacher), ("student", student)):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    check = AutoModelForCausalLM.from_pretrained(root / "teacher")
    assert check.config.vocab_size == vocab + TEACHER_ROWS
    return {"teacher": str(root / "teacher"), "student": str(root / "student"), "vocab": vocab}


def _setup(tiny_assets, padded_pair, out_dir, **kd):
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    d = tiny_cfg_dict(tiny_assets, out_dir, kd={"topk": 8, **kd})
    d["model"] = {"student": padded_pair["student"], "teacher": padded_pair["teacher"]}
    return build_trainer(from_dict(RunConfig, d))


def test_colocated_topk_on_supervised_rows_equals_topk_of_full_logits(tiny_assets, padded_pair, tmp_path):
    from distill_kernels.ref import topk_of_logits_ref

    tr = _setup(tiny_assets, padded_pair, tmp_path / "r", temperature=2.0, chunk_tokens=5)
    batch = tr.to_device(tr.micro_batches(0)[0])
    got = tr.teacher(batch)
    assert got.temperature == 2.0 and got.ids.shape == (*batch["labels"].shape, 8)
    full = tr.teacher.engine.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ids, lp, tail = topk_of_logits_ref(full, 8, temperature=2.0, vocab_size=padded_pair["vocab"])
    sup = torch.zeros_like(batch["labels"], dtype=torch.bool)
    sup[:, :-1] = batch["labels"][:, 1:] != -100
    assert 0 < int(sup.sum()) < sup.numel()
    assert torch.equal(got.ids[sup].long(), ids[sup])
    torch.testing.assert_close(got.logprobs[sup], lp[sup], rtol=0, atol=1e-5)
    torch.testing.assert_close(got.tail_mass[sup], tail[sup], rtol=1e-4, atol=1e-7)
    assert int(full.argmax(-1).max()) >= padded_pair["vocab"]  # the padded rows would have won
    assert torch.equal(got.ids[~sup].long(), torch.arange(8).expand(int((~sup).sum()), 8))  # filler rows


def test_a_head_that_is_not_lm_head_of_the_final_hidden_is_refused(tiny_assets, padded_pair, tmp_path):
    tr = _setup(tiny_assets, padded_pair, tmp_path / "r")
    tr.teacher.scale = 1.5  # as if the architecture scaled its logits in a way we did not reproduce
    with pytest.raises(RuntimeError, match="differ from lm_head"):
        tr.teacher(tr.to_device(tr.micro_batches(0)[0]))


def test_bad_ids_from_a_teacher_backend_are_refused_before_the_loss(tiny_assets, padded_pair, tmp_path):
    from distill.losses.teacher_output import TopKIdError, TopKTeacher
    from distill.teacher.base import TeacherBackend
    from distill.teacher.registry import TEACHER_BACKENDS, register_teacher_backend
    from distill.teacher.colocated import ColocatedTeacher

    @register_teacher_backend("test-bad-ids")
    class BadIds(ColocatedTeacher):
        topk_ids_checked = False
        rows = TeacherBackend.rows  # the generic one: this backend's __call__ output at the supervised rows

        def __call__(self, batch):
            t = super().__call__(batch)
            ids = t.ids.clone()
            ids[:, :, 3] = padded_pair["vocab"] + 5  # a padded row: not a token
            return TopKTeacher(ids=ids, logprobs=t.logprobs, tail_mass=t.tail_mass, temperature=t.temperature)

    try:
        tr = _setup(tiny_assets, padded_pair, tmp_path / "r", teacher_backend="test-bad-ids")
        with pytest.raises(TopKIdError, match=r"teacher backend 'test-bad-ids': top-k id \d+ .* outside the vocabulary"):
            tr.train_step(0)
        assert tr.engine.lr() is not None and tr.step == 0
    finally:
        TEACHER_BACKENDS.pop("test-bad-ids", None)


def _launch(padded_pair, tiny_assets, out_dir: Path, temperature: float, *, world: int = 1, ds_json: Path | None = None):
    args = [sys.executable, str(REPO / "launchers" / "knowdist.py"), f"--run.out_dir={out_dir}",
            f"--model.student={padded_pair['student']}", f"--model.teacher={padded_pair['teacher']}",
            f"--data.path={tiny_assets['data']}", "--data.max_len=64", "--train.steps=2", "--train.micro_batch=4",
            f"--train.grad_accum={2 // world}", "--train.warmup_steps=1", "--train.lr=3e-3",
            "--kd.topk=8", f"--kd.temperature={temperature}", "--checkpoint.every=0", "--checkpoint.export=false",
            "--log.progress_bar=false"]
    if ds_json is None:
        args.append("--deepspeed.engine=torch")
    else:
        args += ["--deepspeed.engine=deepspeed", f"--deepspeed.config={ds_json}", "--teacher.placement=partitioned"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(world):
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        if world > 1:
            env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return read_metrics(out_dir), outs[0]


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_knowdist_launcher_padded_teacher_topk_student_equal_to_teacher_has_zero_kd(
        tiny_assets, padded_pair, tmp_path, temperature):
    rec, out = _launch(padded_pair, tiny_assets, tmp_path / "run", temperature)
    assert "engine=torch" in out
    assert rec[0]["kd"] == pytest.approx(0.0, abs=1e-6), rec[0]
    assert rec[0]["ce"] > 0.5 and len(rec) == 2
    assert rec[1]["kd"] > rec[0]["kd"]  # the update moved the student off its teacher


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_knowdist_launcher_padded_teacher_topk_zero3_two_ranks(tiny_assets, padded_pair, tmp_path, temperature):
    pytest.importorskip("deepspeed")
    ds_json = tmp_path / "zero3.json"
    ds_json.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 1000,
        "reduce_bucket_size": 1000}}))
    rec, out = _launch(padded_pair, tiny_assets, tmp_path / "run", temperature, world=2, ds_json=ds_json)
    assert "zero_stage=3 world=2" in out
    assert rec[0]["kd"] == pytest.approx(0.0, abs=1e-6), rec[0]
    assert len(rec) == 2 and rec[1]["kd"] > rec[0]["kd"]
