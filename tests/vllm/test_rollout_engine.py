"""On-policy rollouts on vLLM (``kd.on_policy.engine=vllm``): rank 0's engine holds a copy of the student,
refreshed every ``sync_every`` steps. After a copy the engine's log-probs and greedy samples equal the
student's own; between copies they are the stale weights'; the run trains and logs the copies; 2 ranks
under ZeRO-3 (an engine each) write what 1 process writes at the first step."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from .conftest import trainer_helpers  # noqa: E402

ON = {"fraction": 0.5, "max_new_tokens": 8, "engine": "vllm", "sync_every": 2, "vllm": {"enforce_eager": True}}


def _student_topk(model, seqs, poss, k):
    from distill.losses.teacher_output import TopKTeacher

    out = []
    with torch.no_grad():
        for s, p in zip(seqs, poss):
            logits = model(torch.tensor([s])).logits[0, p].float()
            out.append(TopKTeacher.from_logits(logits, k, values_dtype=torch.float32))
    return out


def test_vllm_rollouts_train_and_the_copy_equals_the_student(vllm_assets, tmp_path):
    from distill.config import RunConfig, from_dict
    from distill.models.generate import sample_responses
    from distill.train.build import build_trainer

    d = trainer_helpers.tiny_cfg_dict(vllm_assets, tmp_path / "run", train={"steps": 4, "warmup_steps": 0},
                                      kd={"on_policy": ON}, checkpoint={"export": False})
    tr = build_trainer(from_dict(RunConfig, d))
    sampler = tr.batches.rollout.sampler
    engine, close = sampler.vllm, sampler.close
    sampler.close = lambda: None  # keep the engine past the end of training, to look at it
    seen = trainer_helpers.record_rollouts(tr)
    tr.train()
    recs = trainer_helpers.read_metrics(tmp_path / "run")
    g = tr.batches.schedule.global_batch
    assert [len(seen[s]) for s in range(4)] == [round(0.5 * g)] * 4
    assert all(r["gen_seqs"] == round(0.5 * g) and r["gen_tokens"] > 0 for r in recs)
    assert all(0 < len(t) <= 8 for s in seen.values() for t in s.values())
    # copies at steps 0 and 2 (sync_every=2): a copy's seconds are logged, the steps between log 0
    assert [r["gen_sync_s"] > 0 for r in recs] == [True, False, True, False]
    assert sampler.synced_at == 2

    model = tr.engine.module.eval()
    tok = vllm_assets["tokenizer"]
    seqs = [tok("Text: the film was great\nAnalysis: The")["input_ids"], tok("Text: dull and slow\nAnalysis:")["input_ids"]]
    poss = [list(range(len(s))) for s in seqs]
    # The engine holds the weights of step 2; the student trained on since: they differ...
    stale, now = engine.topk(seqs, poss, 8), _student_topk(model, seqs, poss, 8)
    assert max((a.logprobs - b.logprobs).abs().max().item() for a, b in zip(stale, now)) > 1e-3
    # ... until the next copy, after which the engine's log-probs and greedy tokens are the student's.
    assert sampler.sync() > 0
    fresh = engine.topk(seqs, poss, 8)
    for a, b in zip(fresh, now):
        assert torch.equal(a.ids, b.ids)
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=2e-5)
    eos = [tok.eos_token_id]
    want = sample_responses(model, seqs, limits=[6, 6], temperature=0.0, top_p=1.0, eos_ids=eos,
                            pad_id=tok.pad_token_id, generators=[torch.Generator().manual_seed(0)] * 2)
    got = engine.sample(seqs, limits=[6, 6], temperature=0.0, top_p=1.0, eos_ids=eos, seeds=[0, 0])
    assert got == want
    # an end-of-sequence token ends a response and is kept as its last token, as the HF sampler does
    stop = [want[0][2]]
    want = sample_responses(model, seqs, limits=[6, 6], temperature=0.0, top_p=1.0, eos_ids=stop,
                            pad_id=tok.pad_token_id, generators=[torch.Generator().manual_seed(0)] * 2)
    got = engine.sample(seqs, limits=[6, 6], temperature=0.0, top_p=1.0, eos_ids=stop, seeds=[0, 0])
    assert got == want and got[0][-1] == stop[0] and len(got[0]) <= 3
    assert engine.sample(seqs, limits=[0, 2], temperature=1.0, top_p=1.0, eos_ids=eos, seeds=[1, 2])[0] == []
    close()
    assert sampler.vllm is None


@pytest.mark.dist
def test_two_ranks_write_what_one_process_writes(vllm_assets, tmp_path):
    """2 ranks under ZeRO-3, each with a vLLM rollout engine (the weights gathered from the partitions for
    the copy) and a vLLM teacher (``teacher.placement=vllm``), both over the run's process group: step 0's
    samples and step 1's losses equal a 1-process run's (same global batch and seed)."""
    pytest.importorskip("deepspeed")
    ds_json = tmp_path / "zero3.json"
    ds_json.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 1000,
        "stage3_prefetch_bucket_size": 1000}}))
    common = {"train": {"steps": 2, "warmup_steps": 0}, "kd": {"topk": 8, "on_policy": {**ON, "sync_every": 1}},
              "checkpoint": {"export": False}, "teacher": {"placement": "vllm", "vllm": {"enforce_eager": True}}}
    runs = {}
    for name, world in (("two", 2), ("one", 1)):
        d = trainer_helpers.tiny_cfg_dict(vllm_assets, tmp_path / name, **common)
        d["train"].update(micro_batch=4, grad_accum=2 // world)
        d["deepspeed"] = {"engine": "deepspeed", "config": str(ds_json)}
        trainer_helpers.run_child({"cfg": d, "record_rollouts": str(tmp_path / f"{name}.json")}, tmp_path,
                                  world=world, timeout=600)
        got: dict = {}
        for f in tmp_path.glob(f"{name}.json.rank*"):
            for step, by_index in json.loads(f.read_text()).items():
                got.setdefault(int(step), {}).update({int(i): t for i, t in by_index.items()})
        runs[name] = got
    assert len(runs["two"][0]) == 4 and runs["two"][0] == runs["one"][0]
    m2, m1 = (trainer_helpers.read_metrics(tmp_path / n) for n in ("two", "one"))
    assert [r["step"] for r in m2] == [1, 2] and all(r["gen_seqs"] == 4 for r in m2)
    for key in ("loss", "kd", "gen_tokens", "response_tokens"):
        assert m2[0][key] == pytest.approx(m1[0][key], rel=2e-4), key


def test_bench_onpolicy_with_vllm_rollouts(vllm_assets, tmp_path, capsys):
    """launchers/bench_onpolicy.py --kd.on_policy.engine=vllm: the rollouts' time and tokens are measured."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_launcher_bench_onpolicy_vllm",
                                                  Path(__file__).parents[2] / "launchers" / "bench_onpolicy.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    assert bench.main([f"--model.student={vllm_assets['student']}", f"--model.teacher={vllm_assets['teacher']}",
                       f"--data.path={vllm_assets['data']}", "--data.max_len=64", "--train.micro_batch=4",
                       "--train.grad_accum=1", "--deepspeed.engine=torch", "--kd.on_policy.max_new_tokens=8", "--train.warmup_steps=0",
                       "--kd.on_policy.engine=vllm", "--kd.on_policy.vllm.enforce_eager=true", "--steps", "3",
                       f"--run.out_dir={tmp_path / 'bench'}"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["seconds_per_step"]["generation"] > 0 and doc["gen_tokens_per_step"] > 0
