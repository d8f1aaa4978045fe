"""vLLM as the teacher's engine: its top-k and its generations equal our HF engine's (fp32, CPU), the
harvest with ``teacher.engine=vllm`` writes the HF engine's corpus, and a run with
``teacher.placement=vllm`` reaches the losses of the co-located top-k teacher."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from .conftest import EAGER, trainer_helpers  # noqa: E402


@pytest.fixture(scope="module")
def engines(vllm_assets):
    from distill.teacher.local import LocalTeacher
    from distill.teacher.vllm_engine import VLLMEngine

    engine = VLLMEngine(vllm_assets["teacher"], EAGER, max_logprobs=16)
    hf = LocalTeacher(vllm_assets["teacher"], dtype="float32", values_dtype=torch.float32)
    yield engine, hf
    engine.shutdown()


def test_topk_equals_the_hf_teachers(engines):
    engine, hf = engines
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 17, 30)]  # real tokens: below every cut
    poss = [[0, 2, 4], list(range(3, 17)), [1, 28, 29]]  # the last position of a sequence too
    for temperature, vocab in ((1.0, None), (2.0, None), (0.7, 300)):
        got = engine.topk(seqs, poss, 8, temperature=temperature, vocab_size=vocab)
        want = hf.topk(seqs, poss, 8, temperature=temperature, vocab_size=vocab)
        for a, b in zip(got, want):
            assert torch.equal(a.ids, b.ids.to(torch.int32)), (temperature, vocab)
            assert a.logprobs.dtype == torch.float32 and a.temperature == temperature
            torch.testing.assert_close(a.logprobs, b.logprobs.float(), rtol=0, atol=2e-5)
            torch.testing.assert_close(a.tail_mass, b.tail_mass.float(), rtol=0, atol=2e-5)
            if vocab is not None:
                assert int(a.ids.max()) < vocab
    # the engine's logits layer is back as it was: temperature 1 again gives the first answer
    again = engine.topk(seqs, poss, 8)
    assert all(torch.equal(a.logprobs, b.logprobs) for a, b in zip(again, engine.topk(seqs, poss, 8)))
    torch.testing.assert_close(again[0].logprobs, hf.topk(seqs, poss, 8)[0].logprobs.float(), rtol=0, atol=2e-5)


def test_greedy_generation_equals_the_hf_teachers(engines, vllm_assets):
    from distill.teacher.pipeline import SamplingParams

    engine, hf = engines
    prompts = ["Text: the film was great\nAnalysis:", "Text: the food was awful and the staff rude\nAnalysis:",
               "Text: dull\nAnalysis:"]
    free = hf.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.0))
    stop = free[0].token_ids[3]  # prompt 0 now ends on its 4th token
    sp = SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=[stop])
    want, got = hf.generate(prompts, sp), engine.generate(prompts, sp)
    assert [(g.text, g.token_ids, g.finish_reason, g.prompt_tokens) for g in got] == \
           [(g.text, g.token_ids, g.finish_reason, g.prompt_tokens) for g in want]
    assert got[0].finish_reason == "stop" and len(got[0].token_ids) == 3 and stop not in got[0].token_ids
    assert "length" in [g.finish_reason for g in got]
    # sampled: seeded per prompt, the same again
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9)
    assert [g.token_ids for g in engine.generate(prompts, sp, seeds=[1, 2, 3])] == \
           [g.token_ids for g in engine.generate(prompts, sp, seeds=[1, 2, 3])]


@pytest.mark.ray
def test_harvest_with_vllm_writes_the_hf_engines_corpus(vllm_assets, tmp_path):
    """The user's path: ``teacher.engine=vllm`` builds its own engine (in this process, or 2 replicas in
    Ray actors); greedy at fp32 the corpus is the HF engine's, record for record."""
    import json

    from distill.config import load_config
    from distill.knowdist.harvest import HarvestConfig, harvest, load_corpus

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": p["prompt"].split("\n")[0][6:]}) + "\n"
                             for p in trainer_helpers.synthetic_pairs(12)))
    corpora = {}
    # hf and vllm in this process; vllm-ray: 2 vLLM replicas in Ray actors (a private Ray on loopback)
    for name, engine, backend in (("hf", "hf", "local"), ("vllm", "vllm", "local"), ("vllm-ray", "vllm", "ray")):
        cfg, _ = load_config(HarvestConfig, [
            f"--input.source=jsonl", f"--input.path={texts}", f"--teacher.model={vllm_assets['teacher']}",
            f"--teacher.backend={backend}", "--teacher.replicas=2", f"--teacher.engine={engine}", "--teacher.dtype=float32",
            "--teacher.vllm.enforce_eager=true",  # no torch.compile: a quicker start
            "--perspectives.names=[\"overall polarity\",\"emotion\"]", "--sampling.max_new_tokens=8",
            # a third of the vocabulary ends an answer: most answers end within 8 tokens (kept)
            f"--sampling.stop_token_ids=[{','.join(str(i) for i in range(5, 384, 3))}]",
            f"--output.dir={tmp_path / name}", "--output.shard_size=6", "--output.progress=false"])
        corpora[name] = load_corpus(harvest(cfg))
    key = lambda r: (r["id"], r["prompt"], r["response"])  # noqa: E731
    assert len(corpora["hf"]) >= 6
    assert sorted(map(key, corpora["vllm"])) == sorted(map(key, corpora["hf"]))
    assert sorted(map(key, corpora["vllm-ray"])) == sorted(map(key, corpora["hf"]))  # 4 shards over 2 replicas
    summary = json.loads((tmp_path / "vllm" / "summary.json").read_text())
    assert summary["this_run"]["new_tokens_per_s"] > 0


def test_training_with_the_vllm_teacher_equals_the_colocated_topk(vllm_assets, tmp_path):
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    runs = {}
    for placement in ("replicated", "vllm"):
        d = trainer_helpers.tiny_cfg_dict(vllm_assets, tmp_path / placement, train={"steps": 3, "warmup_steps": 0},
                                          kd={"topk": 8, "temperature": 2.0}, checkpoint={"export": False})
        d["teacher"] = {"placement": placement, "vllm": {"enforce_eager": True}}
        tr = build_trainer(from_dict(RunConfig, d))
        tr.train()
        runs[placement] = trainer_helpers.read_metrics(tmp_path / placement)
    assert len(runs["vllm"]) == 3
    for key in ("loss", "ce", "kd", "response_tokens", "grad_norm"):
        assert [r[key] for r in runs["vllm"]] == pytest.approx([r[key] for r in runs["replicated"]], rel=1e-5), key
    assert runs["vllm"][0]["kd"] > 0.01


def test_bench_harvest_runs_both_engines_on_the_same_work(capsys):
    """launchers/bench_harvest.py: both engines write the same number of tokens, and the ratio printed is
    the ratio of the rows' rates (a tiny setting: the figures themselves mean nothing here)."""
    import json

    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_launcher_bench_harvest",
                                                  Path(__file__).parents[2] / "launchers" / "bench_harvest.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    bench.main(["--prompts", "6", "--max-new-tokens", "5", "--repeats", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(out[-1])
    hf, vl = doc["rows"]
    assert (hf["engine"], vl["engine"]) == ("hf", "vllm")
    assert hf["new_tokens"] == vl["new_tokens"] == 6 * 5
    assert doc["vllm_over_hf"] == pytest.approx(vl["tok_s_p50"] / hf["tok_s_p50"], rel=1e-2)
    assert any(line.startswith("vllm / hf generated tokens per second:") for line in out)


def test_icldist_online_targets_through_vllm_equal_the_hf_teachers(vllm_assets):
    """ICLDist's ``teacher.engine=vllm``: its online top-k targets (prefetched, checked where they enter)
    equal those of the in-process HF teacher (fp32), at the run's temperature over the real vocabulary."""
    from distill.icldist.config import TeacherSection
    from distill.icldist.data import TeacherRequest
    from distill.icldist.online import OnlineTargets, close_teacher, open_teacher
    from distill.teacher.local import LocalTeacher

    tok = vllm_assets["tokenizer"]
    texts = ["Text: the film was great\nSentiment: positive", "Text: dull plot and rude staff\nSentiment: negative",
             "Text: the music was lovely\nSentiment:"]
    requests = []
    for t in texts:
        ids = tok(t)["input_ids"]
        requests.append(TeacherRequest(seq=ids, pos=[len(ids) - 3, len(ids) - 2, len(ids) - 1]))
    client = open_teacher(TeacherSection(engine="vllm", dtype="float32", k=8, vllm=EAGER), vllm_assets["teacher"])
    hf = LocalTeacher(vllm_assets["teacher"], dtype="float32", values_dtype=torch.float32)
    try:
        assert type(client).__name__ == "VLLMEngine"
        kw = dict(temperature=2.0, vocab_size=len(tok))
        got = OnlineTargets(client, requests, 8, **kw)
        want = OnlineTargets(hf, requests, 8, **kw)
        got.prefetch([0, 1])
        for ids in ([0, 1], [2]):
            for a, b in zip(got.get(ids), want.get(ids)):
                assert torch.equal(a.ids, b.ids.to(torch.int32)) and a.temperature == 2.0
                torch.testing.assert_close(a.logprobs, b.logprobs.float(), rtol=0, atol=2e-5)
        assert got.n_requests == 2
    finally:
        close_teacher(client)


def test_a_head_dimension_vllm_cannot_run_on_a_cpu_is_one_line(vllm_assets, tmp_path):
    """Head dimension 16 (the built-in student's): refused before the engine starts, naming the key."""
    from distill.config import ConfigError
    from distill.models.tiny import TinySize
    from distill.teacher.vllm_engine import VLLMEngine

    if torch.cuda.is_available():
        pytest.skip("the limit is vLLM's CPU attention")
    small = trainer_helpers.save_tiny_model(vllm_assets["tokenizer"], TinySize(hidden=64, layers=1, heads=4, kv_heads=2,
                                                                              intermediate=64), 3, tmp_path / "h16")
    with pytest.raises(ConfigError, match=r"^kd\.on_policy\.engine=vllm on a CPU: .* head dimension 16, .* at least 32"):
        VLLMEngine(small, key="kd.on_policy.engine")
