"""``teacher.placement``: auto decides from the memory model and says why; replicated teachers in
8-bit / 4-bit (bitsandbytes, CPU here) train; a Ray-served teacher gives the co-located top-k's
losses; the removed ``deepspeed.teacher_zero3`` key names its replacement."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import REPO, read_metrics, tiny_cfg_dict


def _train(d):
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    tr = build_trainer(from_dict(RunConfig, d))
    tr.train()
    return tr


def test_removed_key_names_its_replacement_and_bad_values_are_one_line():
    from distill.config import ConfigError, RunConfig, from_dict

    with pytest.raises(ConfigError, match=r"teacher_zero3 was replaced by teacher\.placement"):
        from_dict(RunConfig, {"deepspeed": {"teacher_zero3": True}})
    for bad, msg in (({"placement": "everywhere"}, "teacher.placement='everywhere'"),
                     ({"placement": "partitioned", "quantization": "8bit"}, "ZeRO-3 partitions float weights"),
                     ({"quantization": "3bit"}, "teacher.quantization='3bit'")):
        with pytest.raises(ConfigError, match=msg):
            from_dict(RunConfig, {"teacher": bad}).validate()
    with pytest.raises(ConfigError, match="serves top-k only"):
        from_dict(RunConfig, {"teacher": {"placement": "ray"}}).validate()


def test_auto_placement_follows_the_memory_model():
    """Published shapes (no weights): a 7B teacher is replicated on one node of 80 GB GPUs; a 72B
    one does not fit a GPU and is partitioned; in 4-bit it fits again; on the torch engine
    (no ZeRO-3) nothing can partition it, and the reason says nothing fits."""
    from distill.train import placement as P

    q7, q72, s = (P.load_shape(n) for n in ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-72B-Instruct",
                                             "Qwen/Qwen2.5-0.5B-Instruct"))
    kw = dict(gpus_per_node=8, stage=3, gpu_mem=80, seq=2048, micro_batch=1, grad_accum=1, topk=0)
    place, why = P.auto_placement(q7, s, world=8, quantization="", partitioned_ok=True, **kw)
    assert place == "replicated" and "partitioned" in why and "teacher traffic" in why
    assert P.auto_placement(q72, s, world=16, quantization="", partitioned_ok=True, **kw)[0] == "partitioned"
    assert P.auto_placement(q72, s, world=16, quantization="4bit", partitioned_ok=True, **kw)[0] == "replicated"
    place, why = P.auto_placement(q72, s, world=16, quantization="", partitioned_ok=False, **kw)
    assert place == "replicated" and why.startswith("nothing fits")


def test_auto_on_the_tiny_run_is_logged(tiny_assets, tmp_path, capsys):
    tr = _train(tiny_cfg_dict(tiny_assets, tmp_path / "run", train={"steps": 1}))
    assert tr.teacher.placement == "replicated"
    line = [x for x in capsys.readouterr().out.splitlines() if "teacher placement=" in x]
    assert len(line) == 1 and "auto: least inter-node traffic" in line[0], line


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quantized_replicated_teacher_trains_close_to_the_float_one(tiny_assets, tmp_path, quant):
    import bitsandbytes as bnb

    from distill.models.tiny import TinySize

    from .conftest import save_tiny_model

    # bitsandbytes' CPU 4-bit kernel packs weights in blocks of 32 output rows (0.50.2 with transformers
    # 5.25: "N must be divisible by block_n"), so this teacher's every projection is a multiple of 32
    # (the shared one has 48- and 24-row projections). Real models' are.
    teacher = save_tiny_model(tiny_assets["tokenizer"], TinySize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
                          1, tmp_path / "teacher64", initializer_range=0.3)
    assets = {**tiny_assets, "teacher": str(teacher)}
    common = {"train": {"steps": 3}}
    ref = _train(tiny_cfg_dict(assets, tmp_path / "fp32", **common))
    d = tiny_cfg_dict(assets, tmp_path / quant, **common)
    d["teacher"] = {"placement": "replicated", "quantization": quant}
    tr = _train(d)
    kinds = {type(m) for m in tr.teacher.engine.module.modules()}
    assert (bnb.nn.Linear8bitLt if quant == "8bit" else bnb.nn.Linear4bit) in kinds
    head = tr.teacher.engine.module.get_output_embeddings()
    assert type(head).__name__ == "Linear"  # lm_head stays float: the chunked teacher head reads it
    got, want = read_metrics(tmp_path / quant), read_metrics(tmp_path / "fp32")
    assert got[0]["ce"] == pytest.approx(want[0]["ce"], rel=1e-6)  # same student, same batch
    assert got[0]["kd"] != want[0]["kd"]  # the quantized teacher is a different teacher ...
    assert got[0]["kd"] == pytest.approx(want[0]["kd"], rel=0.05 if quant == "8bit" else 0.25)  # ... but close


def test_partitioned_needs_the_deepspeed_engine(tiny_assets, tmp_path):
    from distill.config import ConfigError

    d = tiny_cfg_dict(tiny_assets, tmp_path / "run")
    d["teacher"] = {"placement": "partitioned"}
    with pytest.raises(ConfigError, match="needs deepspeed.engine=deepspeed"):
        _train(d)


RAY_RUN = """
import json, sys
from distill.config import RunConfig, from_dict
from distill.train.build import build_trainer
tr = build_trainer(from_dict(RunConfig, json.loads(sys.argv[1])))
print("BACKEND", type(tr.teacher).__name__, flush=True)
tr.train()
"""


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_ray_served_teacher_matches_the_colocated_topk(tiny_assets, tmp_path, packing):
    """Same student, data and k: the Ray-served teacher's losses equal the co-located top-k's
    (right-padded rows, and packed rows split back into their examples)."""
    pytest.importorskip("ray")
    import json

    common = {"train": {"steps": 3}, "kd": {"topk": 8}, "data": {"packing": packing}}
    _train(tiny_cfg_dict(tiny_assets, tmp_path / "colocated", **common))
    d = tiny_cfg_dict(tiny_assets, tmp_path / "ray", **common)
    d["teacher"] = {"placement": "ray", "num_gpus": 0, "ray_node_ip": "127.0.0.2"}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, "-c", RAY_RUN, json.dumps(d)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BACKEND RayTeacher" in out.stdout and "teacher placement=ray: teacher.placement" in out.stdout
    got, want = read_metrics(tmp_path / "ray"), read_metrics(tmp_path / "colocated")
    assert [r["step"] for r in got] == [1, 2, 3]
    for key in ("loss", "ce", "kd"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_ray_served_teacher_scores_the_students_samples(tiny_assets, tmp_path):
    """kd.on_policy: the Ray service's top-k of the text the student wrote gives the co-located top-k
    teacher's losses (the same samples: seeded by step and example)."""
    pytest.importorskip("ray")
    import json

    common = {"train": {"steps": 3}, "kd": {"topk": 8, "on_policy": {"fraction": 0.5, "max_new_tokens": 10}}}
    _train(tiny_cfg_dict(tiny_assets, tmp_path / "colocated", **common))
    d = tiny_cfg_dict(tiny_assets, tmp_path / "ray", **common)
    d["teacher"] = {"placement": "ray", "num_gpus": 0, "ray_node_ip": "127.0.0.2"}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, "-c", RAY_RUN, json.dumps(d)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got, want = read_metrics(tmp_path / "ray"), read_metrics(tmp_path / "colocated")
    assert [r["step"] for r in got] == [1, 2, 3] and all(r["gen_tokens"] > 0 for r in got)
    for key in ("loss", "ce", "kd", "gen_tokens"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_share_one_ray_teacher(tiny_assets, tmp_path):
    """2 DeepSpeed ranks (gloo, loopback): rank 0 starts the service, rank 1 attaches to the same
    one, and the run's losses equal the single-process co-located top-k run with the same global
    batch (ZeRO-2: 2 ranks x micro 4; torch: micro 4 x accum 2)."""
    pytest.importorskip("ray")
    pytest.importorskip("deepspeed")
    import json

    from .conftest import run_child

    ds_json = tmp_path / "zero2.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    common = {"train": {"steps": 3, "micro_batch": 4}, "kd": {"topk": 8}}
    ref = tiny_cfg_dict(tiny_assets, tmp_path / "ref", **common)
    ref["train"]["grad_accum"] = 2
    _train(ref)
    d = tiny_cfg_dict(tiny_assets, tmp_path / "ray2", **common)
    d["train"]["grad_accum"] = 1
    d["deepspeed"] = {"engine": "deepspeed", "config": str(ds_json)}
    d["teacher"] = {"placement": "ray", "num_gpus": 0, "ray_node_ip": "127.0.0.2"}
    outs = run_child({"cfg": d}, tmp_path, world=2, timeout=400,
                     env_extra={"RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""})
    assert "teacher placement=ray" in outs[0]
    got, want = read_metrics(tmp_path / "ray2"), read_metrics(tmp_path / "ref")
    assert [r["step"] for r in got] == [1, 2, 3]
    for key in ("loss", "ce", "kd"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=2e-4, abs=1e-6), key
