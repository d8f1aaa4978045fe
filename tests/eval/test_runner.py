"""The model side: verbalizer checks, left-padded batching, generation, the CLI run path, ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.data.sentibench import load_task
from distill.eval.protocol import LABEL_WORDS, build_prompts
from distill.eval.runner import Runner, VerbalizerCollisionError, plan_batches, verbalizer_ids
from distill.eval.sentibench import evaluate, main

REPO = Path(__file__).resolve().parents[2]


class FirstCharTokenizer:
    """Each word is one token: its first character after the space (so " negative"/" neutral" collide)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text.strip()[:1]]}

    def convert_ids_to_tokens(self, i):
        return chr(i)


def test_colliding_label_words_are_an_error_naming_them():
    assert len(verbalizer_ids(FirstCharTokenizer(), "sc/sst2")) == 2
    with pytest.raises(VerbalizerCollisionError, match=r"sc/twitter: .*' negative', ' neutral' all start with token 110 \('n'\)"):
        verbalizer_ids(FirstCharTokenizer(), "sc/twitter")


def test_tiny_tokenizer_verbalizers_are_distinct(tiny_tokenizer):
    for task in LABEL_WORDS:
        ids = verbalizer_ids(tiny_tokenizer, task)
        assert len(set(ids)) == len(ids)


def test_plan_batches_respects_size_and_token_budget():
    lengths = [10, 50, 20, 40, 30]
    assert plan_batches(lengths, 2, None) == [[1, 3], [4, 2], [0]]
    assert plan_batches(lengths, 8, 100) == [[1, 3], [4, 2, 0]]  # 3 x 30 <= 100, a fourth would not fit
    assert plan_batches([500, 5], 8, 100) == [[0], [1]]  # an over-long prompt runs alone


def _prompts(task, n, seed=42):
    return build_prompts(task, load_task(task, "test", "sample")[:n], load_task(task, "train", "sample"), 4, seed)[0]


def test_batched_classification_matches_single_and_generate_scores(tiny_lm, tiny_tokenizer):
    prompts = _prompts("sc/twitter", 6)
    ids = verbalizer_ids(tiny_tokenizer, "sc/twitter")
    runner = Runner(tiny_lm, tiny_tokenizer, batch_size=6)
    enc = runner.tokenize(prompts)
    assert len({len(e) for e in enc}) > 1  # real padding happens
    batched = runner.classify(enc, ids)
    single = [Runner(tiny_lm, tiny_tokenizer, batch_size=1).classify([e], ids)[0] for e in enc]
    assert batched == single
    # The authors read generate(...).scores[0] of a left-padded batch; same argmax over the verbalizer.
    tiny_tokenizer.padding_side = "left"
    batch = tiny_tokenizer(prompts, padding=True, return_tensors="pt")
    out = tiny_lm.generate(**batch, max_new_tokens=1, do_sample=False, output_scores=True,
                           return_dict_in_generate=True, pad_token_id=tiny_tokenizer.pad_token_id)
    assert out.scores[0][:, ids].argmax(-1).tolist() == batched
    # label_scores: the same scores (fp32, verbalizer order), per prompt in the input order
    got = torch.tensor(runner.label_scores(enc, ids))
    torch.testing.assert_close(got, out.scores[0][:, ids].float(), rtol=1e-5, atol=1e-5)


def test_classification_applies_the_generation_config_processors(tiny_lm, tiny_tokenizer):
    prompts = _prompts("sc/sst2", 8)
    ids = verbalizer_ids(tiny_tokenizer, "sc/sst2")
    runner = Runner(tiny_lm, tiny_tokenizer, batch_size=8)
    enc = runner.tokenize(prompts)
    before = tiny_lm.generation_config.repetition_penalty
    try:
        tiny_lm.generation_config.repetition_penalty = 3.0  # as Qwen2.5's 1.05, made large
        got = runner.classify(enc, ids)
    finally:
        tiny_lm.generation_config.repetition_penalty = before
    want = []
    for e in enc:  # one prompt at a time, penalty applied by hand to the tokens of the prompt
        with torch.no_grad():
            logits = tiny_lm(input_ids=torch.tensor([e])).logits[0, -1].clone()
        seen = torch.tensor(sorted(set(e)))
        s = logits[seen]
        logits[seen] = torch.where(s > 0, s / 3.0, s * 3.0)
        want.append(int(logits[ids].argmax()))
    assert got == want


def test_generation_early_stop_gives_the_same_answers(tiny_tokenizer):
    from distill.models.tiny import build_tiny_causal_lm

    model = build_tiny_causal_lm(len(tiny_tokenizer), "micro", seed=3).eval()
    newline = tiny_tokenizer.convert_tokens_to_ids("\u010a")  # byte-level "\n"
    with torch.no_grad():  # make "\n" frequent so first lines end inside the budget
        gen = torch.Generator().manual_seed(0)
        model.lm_head.weight[newline] = 3 * torch.randn(model.lm_head.weight.shape[1], generator=gen)
    prompts = _prompts("absa/acsa_rest16", 6)
    full = Runner(model, tiny_tokenizer, batch_size=3, max_new_tokens=30, early_stop=False)
    fast = Runner(model, tiny_tokenizer, batch_size=3, max_new_tokens=30, early_stop=True)
    enc = full.tokenize(prompts)
    a, b = full.generate(enc, shots=4), fast.generate(enc, shots=4)
    assert a == b and all(isinstance(x, str) for x in a)
    assert any(x for x in a)


def test_decode_applies_the_tokenizers_space_cleanup_like_transformers_4(tiny_tokenizer):
    from distill.eval.runner import decode_like_reference

    ids = [tiny_tokenizer("Label: I do n't like it .", add_special_tokens=False)["input_ids"]]
    before = tiny_tokenizer.clean_up_tokenization_spaces
    try:
        tiny_tokenizer.clean_up_tokenization_spaces = False
        assert decode_like_reference(tiny_tokenizer, ids) == ["Label: I do n't like it ."]
        tiny_tokenizer.clean_up_tokenization_spaces = True  # e.g. Llama-3's tokenizer_config
        assert decode_like_reference(tiny_tokenizer, ids) == ["Label: I don't like it."]
    finally:
        tiny_tokenizer.clean_up_tokenization_spaces = before


def test_evaluate_in_process_restores_training_mode(tiny_lm, tiny_tokenizer):
    tiny_lm.train()
    res = evaluate(tiny_lm, tiny_tokenizer, tasks="sc/sst2,absa/atsa_rest16", seeds=(42,), limit=4,
                   batch_size=4, data_dir="sample", max_new_tokens=8, progress=False, model_name="tiny")
    assert tiny_lm.training
    tiny_lm.eval()
    assert set(res["tasks"]) == {"sc/sst2", "absa/atsa_rest16"} and res["sample"] is True
    assert res["overall"]["n_tasks"] == 2 and res["overall"]["complete"] is False
    assert 0 <= res["tasks"]["sc/sst2"]["score"] <= 100 and res["tasks"]["sc/sst2"]["n"] == 4
    assert res["categories"]["basic"]["complete"] is False


def test_cli_run_writes_the_three_files(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["run", "--model", str(tiny_lm_dir), "--limit", "5", "--data-dir", "sample", "--batch-size", "16",
               "--out", str(out), "--no-progress", "--seeds", "42,52", "--max-new-tokens", "16"])
    stdout = capsys.readouterr().out
    assert rc == 0
    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert res["sample"] is True and res["limit"] == 5 and res["seeds"] == [42, 52] and res["shots"] == 4
    assert res["overall"]["complete"] is True and len(res["tasks"]) == 12
    assert set(res["tasks"]["absa/opener"]["seeds"]) == {"42", "52"} and res["max_new_tokens"] == 16
    assert {"torch", "transformers", "python"} <= set(res["versions"])
    md = (out / "results.md").read_text()
    assert "| Model | IMDB | Yelp2 | SST2 |" in md and "packaged sample" in md
    assert len((out / "predictions" / "sc-sst2.seed52.jsonl").read_text().splitlines()) == 5
    last = json.loads(stdout.strip().splitlines()[-1])
    assert last["sample"] is True and last["overall"] == pytest.approx(res["overall"]["score"])
    # the saved predictions re-score, through the module's own entry point, to the reported number
    proc = subprocess.run(
        [sys.executable, "-m", "distill.eval.sentibench", "score", "--task", "absa/atsa_rest16", "--limit", "5",
         "--data-dir", "sample", "--predictions", str(out / "predictions" / "absa-atsa_rest16.seed42.jsonl")],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rescored = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rescored["f1"] == pytest.approx(100 * res["tasks"]["absa/atsa_rest16"]["seeds"]["42"]["f1"])


def _dist_worker(rank, world, init_file, model_dir, out_file):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        res = evaluate(model, tok, tasks="sc/twitter,absa/acsa_rest16", seeds=(42,), limit=5, batch_size=2,
                       data_dir="sample", max_new_tokens=6, progress=False, model_name="tiny")
        Path(f"{out_file}.{rank}").write_text(json.dumps({t: v["seeds"] for t, v in res["tasks"].items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_match_one(tiny_lm_dir, tiny_lm, tiny_tokenizer, tmp_path):
    import torch.multiprocessing as mp

    # fork: the children reuse this process's imports (spawn re-imports transformers: minutes on a busy CPU)
    mp.start_processes(_dist_worker, args=(2, str(tmp_path / "init"), str(tiny_lm_dir), str(tmp_path / "res")),
                       nprocs=2, start_method="fork")
    single = evaluate(tiny_lm, tiny_tokenizer, tasks="sc/twitter,absa/acsa_rest16", seeds=(42,), limit=5,
                      batch_size=2, data_dir="sample", max_new_tokens=6, progress=False)
    want = json.loads(json.dumps({t: v["seeds"] for t, v in single["tasks"].items()}))
    for rank in range(2):
        assert json.loads((tmp_path / f"res.{rank}").read_text()) == want
