"""``model.teacher_dtype`` holds under ZeRO-3: the teacher's inference-only engine partitions it in its
own dtype, not the student's (zero.Init casts to the dtype of the config's bf16/fp16 flags).

One DeepSpeed rank in a subprocess (gloo on 127.0.0.1, a private rendezvous): the dtype does not
depend on the world size, and one rank keeps the test at ~20 s once DeepSpeed's CPU op is built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO, tiny_cfg_dict

pytestmark = [pytest.mark.dist, pytest.mark.slow]

CHILD = """
import json, sys
from distill.config import RunConfig, from_dict
from distill.train.build import build_trainer

cfg = from_dict(RunConfig, json.loads(open(sys.argv[1]).read()))
cfg.validate()
tr = build_trainer(cfg)
tp, sp = list(tr.teacher.engine.module.parameters()), list(tr.engine.module.parameters())
out = {"teacher": sorted({str(p.ds_tensor.dtype) for p in tp} | {str(p.dtype) for p in tp}),
       "student": sorted({str(p.ds_tensor.dtype) for p in sp} | {str(p.dtype) for p in sp}),
       "teacher_partitioned": all(hasattr(p, "ds_id") for p in tp), "loss": tr.train_step(0)["loss"]}
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.mark.parametrize("student,teacher", [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_zero3_teacher_in_teacher_dtype(tiny_assets, tmp_path, student, teacher):
    pytest.importorskip("deepspeed")
    ds_json = tmp_path / "zero3.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    cfg = tiny_cfg_dict(tiny_assets, tmp_path / "run", model={"dtype": student, "teacher_dtype": teacher},
                        train={"steps": 1, "micro_batch": 4, "grad_accum": 1, "warmup_steps": 0},
                        checkpoint={"export": False})
    cfg["deepspeed"] = {"engine": "deepspeed", "config": str(ds_json)}
    cfg["teacher"] = {"placement": "partitioned"}
    (tmp_path / "spec.json").write_text(json.dumps(cfg))
    (tmp_path / "child.py").write_text(CHILD)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "spec.json")], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stdout[-4000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert got["teacher_partitioned"]  # the teacher really is ZeRO-3 (partitioned at load)
    assert got["teacher"] == [f"torch.{teacher}"] and got["student"] == [f"torch.{student}"], got
    assert 0 < got["loss"] < 20
