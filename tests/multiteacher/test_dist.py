"""2 ranks x 2 micro-batches under DeepSpeed ZeRO-3 (student and both teachers partitioned, the gate
a partitioned part of the student) follow 1 rank on the whole batch (plain engine): the same
losses and logged teacher weights, and every rank holds the same learned weights (gate / meta)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import mt_cfg_dict, read_metrics

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _spawn(cfg: dict, tmp: Path, world: int) -> list[str]:
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"cfg": cfg}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(world):
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                   RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        procs.append(subprocess.Popen([sys.executable, str(HERE / "_child.py"), str(spec)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        outs.append(out)
        if p.returncode:
            for q in procs:
                q.kill()
            raise AssertionError(f"rank exited {p.returncode}:\n{out[-4000:]}")
    return outs


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["attention", "meta"])
def test_zero3_two_ranks_match_one_rank(mt_assets, tmp_path, weighting):
    pytest.importorskip("deepspeed")
    ds_json = tmp_path / "zero3.json"
    ds_json.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 1000,
        "reduce_bucket_size": 1000, "stage3_gather_16bit_weights_on_model_save": True}}))
    knobs = {"meta": {"every": 2, "heldout_path": mt_assets["heldout"], "heldout_batch": 4}}
    common = {"train": {"steps": 4, "warmup_steps": 0}, "multiteacher": knobs}
    ds = mt_cfg_dict(mt_assets, tmp_path / "zero3", weighting, **common)
    ds["train"].update(micro_batch=2, grad_accum=2)
    ds["deepspeed"] = {"engine": "deepspeed", "config": str(ds_json)}
    ds["teacher"] = {"placement": "partitioned"}
    out = _spawn(ds, tmp_path, 2)
    assert "zero_stage=3 world=2" in out[0]
    one = mt_cfg_dict(mt_assets, tmp_path / "one", weighting, **common)
    one["train"].update(micro_batch=8, grad_accum=1)
    out1 = _spawn(one, tmp_path, 1)
    a, b = read_metrics(tmp_path / "zero3"), read_metrics(tmp_path / "one")
    for key in ("loss", "ce", "kd", "w_good", "w_noise"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=2e-4, abs=1e-6), key
    r0, r1 = (json.loads((tmp_path / "zero3" / f"rank{r}.json").read_text()) for r in (0, 1))
    ref = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert r0 == r1  # identical on every rank, exactly
    key = "gate" if weighting == "attention" else "meta"
    flat = lambda x: [v for p in x for v in p] if key == "gate" else x["a"]  # noqa: E731
    assert flat(r0[key]) == pytest.approx(flat(ref[key]), rel=1e-3, abs=1e-5)
    assert any(abs(v) > 0 for v in flat(r0[key]))
    assert out1
