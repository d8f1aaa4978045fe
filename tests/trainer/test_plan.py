"""The teacher-placement planner (distill/dist/plan.py): parameter counts against the published totals
and against a tiny transformers model, configs from a folder, the fit of a 72B teacher on one node, the
traffic formula of the partitioned teacher, and the CLI (table, --json, unknown name)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distill.dist import plan as P
from distill.train import placement as M

# Totals on the model cards (huggingface.co/<name>): "Number of Parameters" / "Params".
PUBLISHED_TOTALS = {
    "Qwen/Qwen2.5-0.5B-Instruct": 0.49e9, "Qwen/Qwen2.5-1.5B-Instruct": 1.54e9, "Qwen/Qwen2.5-3B-Instruct": 3.09e9,
    "Qwen/Qwen2.5-7B-Instruct": 7.61e9, "Qwen/Qwen2.5-14B-Instruct": 14.7e9, "Qwen/Qwen2.5-32B-Instruct": 32.5e9,
    "Qwen/Qwen2.5-72B-Instruct": 72.7e9, "meta-llama/Llama-3.2-1B-Instruct": 1.23e9,
    "meta-llama/Llama-3.2-3B-Instruct": 3.21e9, "meta-llama/Llama-3.1-8B-Instruct": 8.03e9,
    "meta-llama/Llama-3.1-70B-Instruct": 70.6e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_param_count_matches_published_total(name):
    for n in (name, name.removesuffix("-Instruct")):
        got = P.load_shape(n).params
        assert abs(got - PUBLISHED_TOTALS[name]) <= 0.02 * PUBLISHED_TOTALS[name], (n, got)


TINY = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 301, "max_position_embeddings": 128}


@pytest.mark.parametrize("model_type,tied", [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)])
def test_local_config_count_equals_built_model(tmp_path, model_type, tied):
    """Independent check: the planner's count from a folder's config.json == numel of the model
    transformers builds from it."""
    transformers = pytest.importorskip("transformers")
    cfg = {**TINY, "model_type": model_type, "tie_word_embeddings": tied}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = P.load_shape(str(tmp_path))
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(str(tmp_path)))
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert (shape.hidden, shape.layers, shape.kv_heads, shape.vocab, shape.tied) == (64, 3, 2, 301, tied)


def test_local_config_plain_json_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "not_a_transformers_type",
                                                      "tie_word_embeddings": False, "head_dim": 32}))
    s = P.load_shape(str(tmp_path))
    assert (s.head_dim, s.tied, s.qkv_bias) == (32, False, False)


def test_unknown_name_is_one_line_error(capsys):
    rc = P.main(["--teacher", "acme/NoSuchModel-9B", "--student", "Qwen/Qwen2.5-1.5B", "--gpus", "8", "--gpu-mem", "80"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "acme/NoSuchModel-9B" in err and "Qwen/Qwen2.5-72B-Instruct" in err and "meta-llama/Llama-3.1-70B" in err


def _rows(p, placement):
    return {r["stage"]: r for r in p["rows"] if r["placement"] == placement}


def test_72b_bf16_on_one_node_fits_partitioned_not_replicated():
    t, s = P.load_shape("Qwen/Qwen2.5-72B-Instruct"), P.load_shape("Qwen/Qwen2.5-1.5B-Instruct")
    p = P.plan(t, s, gpus=8, gpu_mem=80, gpus_per_node=8)
    assert all(r["fits"] == "no" for r in _rows(p, "replicated").values())
    assert all(r["fits"] == "yes" for r in _rows(p, "partitioned").values())
    assert _rows(p, "partitioned")[3]["teacher_weights"] == pytest.approx(t.params * 2 / 8)
    assert p["recommendation"] is not None
    # int4 replicated: 0.5625 bytes per decoder nn.Linear weight, bf16 for the rest
    q = P.plan(t, s, gpus=8, gpu_mem=80, teacher_dtype="int4")
    assert _rows(q, "replicated")[0]["teacher_weights"] == pytest.approx(
        t.linear_params * 0.5625 + (t.params - t.linear_params) * 2)
    assert all(r["fits"] == "n/a" for r in _rows(q, "partitioned").values())


def test_zero_stage_states_follow_the_zero_paper():
    s = P.load_shape("Qwen/Qwen2.5-1.5B")
    n, psi = 16, s.params
    assert [M.student_states(s, k, n) for k in range(4)] == pytest.approx(
        [16 * psi, 4 * psi + 12 * psi / n, 2 * psi + 14 * psi / n, 16 * psi / n])


def test_partitioned_teacher_traffic_grows_with_nodes():
    """Per optimizer step the partitioned teacher adds grad_accum x W(G-1)/G per GPU and, with a ring
    crossing every node boundary, nodes x that over the inter-node links (W = bf16 teacher bytes)."""
    t, s = P.load_shape("meta-llama/Llama-3.1-70B-Instruct"), P.load_shape("meta-llama/Llama-3.2-3B-Instruct")
    w, prev = t.params * 2, -1.0
    for nodes in (1, 2, 4, 8):
        g = 8 * nodes
        p = P.plan(t, s, gpus=g, gpu_mem=80, gpus_per_node=8, grad_accum=2)
        part, repl = _rows(p, "partitioned")[2], _rows(p, "replicated")[2]
        assert part["comm_gpu"] - repl["comm_gpu"] == pytest.approx(2 * w * (g - 1) / g)
        extra = part["internode"] - repl["internode"]
        assert extra == pytest.approx(0.0 if nodes == 1 else 2 * nodes * w * (g - 1) / g)
        assert extra > prev
        prev = extra


def test_ray_uses_fewest_shards_and_leaves_the_rest_to_the_student():
    t, s = P.load_shape("Qwen/Qwen2.5-72B-Instruct"), P.load_shape("Qwen/Qwen2.5-1.5B-Instruct")
    p = P.plan(t, s, gpus=16, gpu_mem=80)
    ray = _rows(p, "ray")[0]
    k = ray["teacher_gpus"]
    assert k >= 2 and ray["student_gpus"] == 16 - k and ray["teacher_shard_mem"] <= (80 - 6) * 1e9
    assert M.ray_shards(t, "bf16", (80 - 6) * 1e9, 16384, k - 1) is None


def test_cli_table_and_json_last_line():
    cmd = [sys.executable, "-m", "distill.dist.plan", "--teacher", "Qwen/Qwen2.5-72B-Instruct",
           "--student", "Qwen/Qwen2.5-1.5B-Instruct", "--gpus", "16", "--gpu-mem", "80", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    doc = json.loads(lines[-1])
    assert len(doc["rows"]) == 12 and doc["recommendation"]["placement"] in ("partitioned", "replicated", "ray")
    assert any(line.startswith("recommended (auto):") for line in lines)
    assert "72.71B params (computed)" in out.stdout and "act[e]" in out.stdout


def test_auto_placement_plans_with_each_gpus_own_memory(monkeypatch):
    """8 ranks on one node of 8 x 80 GB: each rank plans with its GPU's 80 GB (the bug divided one GPU's
    memory by the 8 local ranks, 10 GB, and partitioned a 7B teacher that fits replicated). On CPU the
    host's RAM is what the local ranks share."""
    import torch

    class Props:
        total_memory = 80 * P.GB

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    gpu = torch.device("cuda", 3)
    assert M.rank_memory(gpu, 8) == 80 * P.GB
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert M.rank_memory(torch.device("cpu"), 2) == pytest.approx(ram / 2)

    t, s = P.load_shape("Qwen/Qwen2.5-7B-Instruct"), P.load_shape("Qwen/Qwen2.5-0.5B")
    kw = dict(world=8, gpus_per_node=8, stage=3, seq=2048, micro_batch=4, grad_accum=1, quantization="", topk=0,
              partitioned_ok=True)
    placement, why = P.auto_placement(t, s, gpu_mem=M.rank_memory(gpu, 8) / P.GB, **kw)
    assert placement == "replicated", why
    # What the old division planned with: 10 GB per GPU, where the replicated 7B teacher does not fit.
    assert P.auto_placement(t, s, gpu_mem=80 / 8, **kw)[0] == "partitioned"


_MODELS = ["--teacher", "Qwen/Qwen2.5-7B-Instruct", "--student", "Qwen/Qwen2.5-0.5B"]


@pytest.mark.parametrize("yaml_text,needles", [
    ("- model\n- train\n", ["c.yaml", "top level must be a mapping", "list"]),
    ("42\n", ["c.yaml", "top level must be a mapping", "int"]),
    ("model: [Qwen/Qwen2.5-7B-Instruct]\n", ["c.yaml", "model", "expected a mapping for section ModelSection", "list"]),
    ("model:\n  studnet: Qwen/Qwen2.5-0.5B\n", ["c.yaml", "unknown key(s) ['studnet']", "student"]),
    ("trian:\n  micro_batch: 2\n", ["c.yaml", "unknown key(s) ['trian']", "train"]),
    ("train:\n  micro_batch: two\n", ["c.yaml", "train.micro_batch", "expected an integer", "'two'"]),
    ("icl:\n  max_len: 512\n  max_lenght: 9\n", ["c.yaml", "unknown key(s) ['max_lenght']", "ICLSection"]),
    ("model:\n  teacher: a\n  teacher: b\n", ["c.yaml", "'teacher' is given twice"]),
])
def test_bad_config_file_is_one_line(tmp_path, capsys, yaml_text, needles):
    (tmp_path / "c.yaml").write_text(yaml_text)
    rc = P.main(["--config", str(tmp_path / "c.yaml"), *_MODELS, "--gpus", "8", "--gpu-mem", "80"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith("python -m distill.dist.plan: error: "), err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("flags,needles", [
    (["--gpu-mem", "-80"], ["--gpu-mem -80.0", "> 0"]),
    (["--gpu-mem", "nan"], ["--gpu-mem nan", "> 0"]),
    (["--gpu-mem", "80", "--reserve", "nan"], ["--reserve nan", ">= 0"]),
    (["--gpu-mem", "80", "--reserve", "-1"], ["--reserve -1.0", ">= 0"]),
    (["--gpu-mem", "80", "--topk", "-1"], ["--topk -1", ">= 1"]),
    (["--gpu-mem", "80", "--teacher-batch-tokens", "0"], ["--teacher-batch-tokens 0", ">= 1"]),
    (["--gpu-mem", "80", "--tflops", "0"], ["--tflops 0.0", "> 0"]),
    (["--gpu-mem", "80", "--inter-gbps", "nan"], ["--inter-gbps nan", "> 0"]),
])
def test_impossible_numbers_are_one_line(capsys, flags, needles):
    rc = P.main([*_MODELS, "--gpus", "8", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    for n in needles:
        assert n in err, err


def test_shipped_run_configs_pass_the_schema_check():
    from pathlib import Path

    for f in sorted((Path(P.__file__).resolve().parents[2] / "launchers" / "configs").glob("*_to_*.yaml")):
        run = P.run_settings(str(f))
        assert run["teacher"] and run["stage"] in (0, 1, 2, 3), f


def test_recommendation_ends_with_the_overrides_that_realise_it(capsys):
    """The advice can be followed: the command / overrides the planner prints load with the run's
    config, name a shipped DeepSpeed JSON of the recommended stage, and pick the recommended placement;
    every fitting row has a seconds-per-step estimate from the stated bandwidths."""
    from pathlib import Path

    from distill.config import load_config
    from distill.knowdist.stage import KnowDistConfig

    repo = Path(P.__file__).resolve().parents[2]
    cfg = repo / "launchers/configs/qwen2.5-7b-instruct_to_qwen2.5-0.5b_knowdist.yaml"
    assert P.main(["--config", str(cfg), "--gpus", "16", "--gpu-mem", "80", "--tflops", "100", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    doc = json.loads(out[-1])
    rec = doc["recommendation"]
    run = next(x for x in out if x.startswith("to run it: deepspeed --num_gpus 8 launchers/knowdist.py"))
    flags = run.split(f"--config {cfg} ")[1].split(" (on each")[0].split()
    assert flags == rec["overrides"].split()
    loaded, rest = load_config(KnowDistConfig, ["--config", str(cfg), *flags])
    assert rest == [] and loaded.teacher.placement == rec["placement"]
    ds = json.loads((repo / loaded.deepspeed.config).read_text())
    assert ds["zero_optimization"]["stage"] == rec["stage"]
    assert doc["setup"]["step_estimate"]["tflops"] == 100
    nodes = doc["setup"]["nodes"]
    for r in doc["rows"]:
        if r["fits"] != "n/a":
            want = r["flops_gpu"] / 100e12 + r["comm_gpu"] / (150 * 1e9) + r["internode"] / (nodes * 25 * 1e9)
            assert r["step_s"] == pytest.approx(want)
    assert any("s/step[e]" in x for x in out)
    for stage, f in M.DS_CONFIG_FILES.items():  # a shipped JSON for every stage the planner can recommend
        assert json.loads((repo / f).read_text())["zero_optimization"]["stage"] == stage
