"""On-policy distillation (kd.on_policy): the student's sampler, the rollouts, the run.

* the sampler (KV cache, left-padded batch) gives transformers' own greedy ``generate`` tokens, stops
  at EOS and at each row's limit, and a row's sampled tokens do not depend on the rest of its batch;
* a run with ``kd.on_policy.fraction=0.5`` writes the chosen share of each step with the student,
  trains on it (KD only on those rows), logs the generation, and equals a run fed the same samples;
* 2 ranks under ZeRO-3 generate the same tokens and losses as 1 rank; a run killed with SIGKILL and
  resumed reproduces the samples and losses of the run that never stopped.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from .conftest import read_metrics, record_rollouts, run_child, tiny_cfg_dict

ON = {"on_policy": {"fraction": 0.5, "max_new_tokens": 12}}


def _student(tiny_assets):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_assets["student"]).eval()


def test_greedy_sampler_equals_generate_and_stops(tiny_assets):
    from distill.models.generate import sample_responses

    tok, model = tiny_assets["tokenizer"], _student(tiny_assets)
    prompts = [tok("Text: the film was great\nAnalysis:")["input_ids"], tok("Text: dull\nAnalysis:")["input_ids"],
               tok("the service was slow and the staff rude, the food bad\nAnalysis:")["input_ids"]]
    pad = tok.pad_token_id
    limits = [9, 4, 9]
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    got = sample_responses(model, prompts, limits=limits, temperature=0.0, top_p=1.0, eos_ids=[tok.eos_token_id],
                           pad_id=pad, generators=gens)
    for p, lim, g in zip(prompts, limits, got):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=lim, do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id)
        want = ref[0, len(p):].tolist()
        if tok.eos_token_id in want:
            want = want[:want.index(tok.eos_token_id) + 1]
        assert g == want and len(g) <= lim
    # An end-of-sequence token ends a row (kept as its last token): make the first greedy token an EOS.
    first = got[0][0]
    cut = sample_responses(model, prompts[:1], limits=[9], temperature=0.0, top_p=1.0, eos_ids=[first], pad_id=pad,
                           generators=gens[:1])
    assert cut == [[first]]


def test_sampled_row_does_not_depend_on_its_batch(tiny_assets):
    from distill.models.generate import sample_responses

    tok, model = tiny_assets["tokenizer"], _student(tiny_assets)
    prompts = [tok("Text: the room was lovely\nAnalysis:")["input_ids"], tok("Text: bad\nAnalysis:")["input_ids"]]
    kw = dict(limits=[10, 10], temperature=1.0, top_p=0.9, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    both = sample_responses(model, prompts, generators=[torch.Generator().manual_seed(s) for s in (5, 6)], **kw)
    alone = sample_responses(model, prompts[1:], generators=[torch.Generator().manual_seed(6)],
                             **{**kw, "limits": [10]})
    assert both[1] == alone[0] and len(both[0]) > 0
    again = sample_responses(model, prompts, generators=[torch.Generator().manual_seed(s) for s in (5, 6)], **kw)
    assert again == both
    other = sample_responses(model, prompts, generators=[torch.Generator().manual_seed(s) for s in (7, 8)], **kw)
    assert other != both  # the seed matters (T = 1 over a 384-token vocabulary)


def test_on_policy_run_writes_trains_and_logs(tiny_assets, tmp_path):
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    cfg = tiny_cfg_dict(tiny_assets, tmp_path / "on", train={"steps": 3, "warmup_steps": 0}, kd=ON,
                        checkpoint={"export": False})
    tr = build_trainer(from_dict(RunConfig, cfg))
    seen = record_rollouts(tr)
    tr.train()
    recs = read_metrics(tmp_path / "on")
    g = tr.batches.schedule.global_batch
    assert [len(seen[s]) for s in range(3)] == [round(0.5 * g)] * 3  # the chosen share, every step
    assert all(r["gen_seqs"] == round(0.5 * g) and r["gen_tokens"] > 0 and r["gen_time_s"] > 0 for r in recs)
    assert all(r["gen_mean_len"] == pytest.approx(r["gen_tokens"] / r["gen_seqs"]) for r in recs)
    assert all(0 < len(t) <= 12 for s in seen.values() for t in s.values())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)

    # A run fed exactly those samples (no generation) trains the same: generation leaves the student's
    # weights, optimizer, RNG and train mode as they were.
    fed = tiny_cfg_dict(tiny_assets, tmp_path / "fed", train={"steps": 3, "warmup_steps": 0}, kd=ON,
                        checkpoint={"export": False})
    tr2 = build_trainer(from_dict(RunConfig, fed))
    rollout = tr2.batches.rollout

    def replay(step, items, positions, indices):
        chosen = rollout.chosen(step)
        out = []
        for row_items, row_pos, row_idx in zip(items, positions, indices):
            row = []
            for it, p, i in zip(row_items, row_pos, row_idx):
                if p in chosen:
                    first = next(t for t, lab in enumerate(it["labels"]) if lab != -100)
                    resp = seen[step][i]
                    it = {**it, "input_ids": it["input_ids"][:first] + resp, "labels": [-100] * first + resp}
                row.append({**it, "on_policy": p in chosen})
            out.append(row)
        return out

    tr2.batches.rollout = replay
    tr2.train()
    ref = read_metrics(tmp_path / "fed")
    for key in ("loss", "ce", "kd", "response_tokens", "grad_norm"):
        assert [r[key] for r in recs] == pytest.approx([r[key] for r in ref], rel=1e-6), key


def test_on_policy_refusals():
    from distill.config import ConfigError, RunConfig, load_config

    cases = {
        ("--kd.on_policy.fraction=0.5", "--kd.teacher_backend=cache", "--kd.topk=8"): "cannot score text the student writes",
        ("--kd.on_policy.fraction=0.5", "--kd.path=logits"): "set kd.path=lean",
        ("--kd.on_policy.fraction=0.5", "--kd.kind=none"): "needs a teacher",
        ("--kd.on_policy.fraction=1.5",): "must be in [0, 1]",
        ("--kd.on_policy.fraction=0.5", "--data.packing=true"): "data.packing=false",
    }
    for argv, want in cases.items():
        with pytest.raises(ConfigError, match=want.replace("[", r"\[").replace("]", r"\]")) as e:
            load_config(RunConfig, list(argv))[0].validate()
        assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.dist
def test_zero3_two_ranks_generate_what_one_rank_does(tiny_assets, tmp_path):
    """2 ranks under ZeRO-3 (weights gathered once per generation block) write the same samples and
    train to the same losses as 1 process on the plain engine with the same global batch and seed."""
    pytest.importorskip("deepspeed")
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    ds_json = tmp_path / "zero3.json"
    ds_json.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 1000,
        "stage3_prefetch_bucket_size": 1000}}))
    common = {"train": {"steps": 3, "warmup_steps": 0}, "kd": ON, "checkpoint": {"export": False}}
    z3 = tiny_cfg_dict(tiny_assets, tmp_path / "z3", **common)
    z3["train"].update(micro_batch=4, grad_accum=1)
    z3["deepspeed"] = {"engine": "deepspeed", "config": str(ds_json)}
    run_child({"cfg": z3, "record_rollouts": str(tmp_path / "z3.rollouts.json")}, tmp_path, world=2, timeout=600)
    got: dict = {}
    for f in tmp_path.glob("z3.rollouts.json.rank*"):
        for step, by_index in json.loads(f.read_text()).items():
            got.setdefault(int(step), {}).update({int(i): t for i, t in by_index.items()})
    one = tiny_cfg_dict(tiny_assets, tmp_path / "one", **common)
    one["train"].update(micro_batch=4, grad_accum=2)
    tr = build_trainer(from_dict(RunConfig, one))
    want = record_rollouts(tr)
    tr.train()
    assert got == want and len(want) == 3 and all(len(v) == 4 for v in want.values())
    m2, m1 = read_metrics(tmp_path / "z3"), read_metrics(tmp_path / "one")
    for key in ("loss", "kd", "gen_tokens", "response_tokens"):
        assert [r[key] for r in m2] == pytest.approx([r[key] for r in m1], rel=2e-4), key


@pytest.mark.slow
def test_kill9_resume_reproduces_samples_and_losses(tiny_assets, tmp_path):
    steps = 5
    sec = {"train": {"steps": steps, "warmup_steps": 1}, "checkpoint": {"every": 2, "keep_last": 2, "export": False},
           "kd": ON}
    cut = tmp_path / "cut"
    procs = run_child({"cfg": tiny_cfg_dict(tiny_assets, cut, **sec), "sleep_per_step": 0.5}, tmp_path, wait=False)
    p = procs[0]
    deadline = time.time() + 240
    while not (cut / "checkpoints" / "step_00000002" / "trainer_state.json").is_file():
        assert p.poll() is None and time.time() < deadline, p.stdout.read()[-3000:] if p.poll() is not None else "slow"
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    p.stdout.close()
    assert max(r["step"] for r in read_metrics(cut)) < steps
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    resume = {**sec, "checkpoint": {**sec["checkpoint"], "resume": "latest"}}
    build_trainer(from_dict(RunConfig, tiny_cfg_dict(tiny_assets, cut, **resume))).train()
    build_trainer(from_dict(RunConfig, tiny_cfg_dict(tiny_assets, tmp_path / "ref", **sec))).train()
    got, ref = read_metrics(cut), read_metrics(tmp_path / "ref")
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for key in ("loss", "gen_tokens", "gen_mean_len", "response_tokens"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in ref], rel=1e-6), key


def test_bench_onpolicy_reports_each_parts_share(tiny_assets, tmp_path, capsys):
    """launchers/bench_onpolicy.py on the tiny pair: one JSON line whose parts add up to the step, with
    generation time and tokens only when the student writes."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_launcher_bench_onpolicy",
                                                  Path(__file__).parents[2] / "launchers" / "bench_onpolicy.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    common = [f"--model.student={tiny_assets['student']}", f"--model.teacher={tiny_assets['teacher']}",
              f"--data.path={tiny_assets['data']}", "--data.max_len=64", "--train.micro_batch=4", "--train.grad_accum=1",
              "--deepspeed.engine=torch", "--kd.on_policy.max_new_tokens=8", "--train.warmup_steps=0", "--steps", "3"]
    docs = {}
    for fraction in (0.5, 0.0):
        assert bench.main(common + [f"--kd.on_policy.fraction={fraction}", f"--run.out_dir={tmp_path / str(fraction)}"]) == 0
        docs[fraction] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    on, off = docs[0.5], docs[0.0]
    assert on["fraction"] == 0.5 and on["steps_measured"] == 2 and on["global_batch"] == 4
    for d in (on, off):
        sec = d["seconds_per_step"]
        assert sum(sec[k] for k in ("generation", "teacher", "student", "other")) == pytest.approx(sec["total"], abs=2e-3)
        assert sec["teacher"] > 0 and sec["student"] > 0
    assert on["seconds_per_step"]["generation"] > 0 and on["gen_tokens_per_step"] > 0
    assert off["seconds_per_step"]["generation"] == 0 and off["gen_tokens_per_step"] == 0
