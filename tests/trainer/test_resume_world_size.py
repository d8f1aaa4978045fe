"""A ZeRO-3 checkpoint written by 2 ranks resumes on 1 and on 4 ranks (gloo on CPU).

The global batch is kept (2 x micro 4 x accum 1 = 1 x 4 x 2 = 4 x 2 x 1 = 8), so the data order is
the uninterrupted run's; the optimizer partitions are re-cut through DeepSpeed's universal checkpoint,
converted once into ``universal-step_N/`` beside the checkpoint and reused by the second resume. Steps
3-4 of each resumed run equal the 2-rank run's. A changed global batch is refused in one line that
names a layout keeping it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import read_metrics, run_child, tiny_cfg_dict

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _tree(folder: Path) -> dict:
    from distill.fileio import sha256_file

    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_zero3_checkpoint_of_2_ranks_resumes_on_1_and_4(tiny_assets, tmp_path):
    pytest.importorskip("deepspeed")
    ds_json = tmp_path / "zero3_test.json"
    ds_json.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 1000,
        "reduce_bucket_size": 1000}}))
    common = {"train": {"steps": 4, "warmup_steps": 1, "grad_clip": 1.0}, "checkpoint": {"every": 2, "keep_last": 3}}
    ref_dir = tmp_path / "two_ranks"
    ref_cfg = tiny_cfg_dict(tiny_assets, ref_dir, **common)
    ref_cfg["train"].update(micro_batch=4, grad_accum=1)
    ref_cfg["deepspeed"] = {"engine": "deepspeed", "config": str(ds_json)}
    ref_cfg["checkpoint"]["export"] = False
    run_child({"cfg": ref_cfg}, tmp_path, world=2)
    ref = read_metrics(ref_dir)
    assert [r["step"] for r in ref] == [1, 2, 3, 4]
    ckpt = ref_dir / "checkpoints" / "step_00000002"
    before = _tree(ckpt)

    outs = {}
    for world, micro, accum in ((1, 4, 2), (4, 2, 1)):
        out_dir = tmp_path / f"resumed_on_{world}"
        cfg = json.loads(json.dumps(ref_cfg))
        cfg["run"]["out_dir"] = str(out_dir)
        cfg["train"].update(micro_batch=micro, grad_accum=accum)
        cfg["checkpoint"] = {"every": 0, "resume": str(ckpt), "export": False}
        outs[world] = run_child({"cfg": cfg}, tmp_path, world=world)[0]
        got = read_metrics(out_dir)
        assert [r["step"] for r in got] == [3, 4], world
        for key in ("loss", "ce", "kd", "grad_norm", "lr"):
            assert [r[key] for r in got] == pytest.approx([r[key] for r in ref[2:]], rel=1e-6), (world, key)

    universal = ckpt.with_name("universal-step_00000002")
    assert "converting its ZeRO-3 partitions with deepspeed.checkpoint.ds_to_universal" in outs[1]
    assert f"using the universal copy {universal}" in outs[4]  # converted once, reused
    assert (universal / "engine" / "zero" / "optimizer_state.pt").is_file()
    assert "saved by 2 rank(s), this run has 4" in outs[4]
    assert _tree(ckpt) == before  # the checkpoint itself is only read


def test_changed_global_batch_is_refused_with_a_layout_that_keeps_it(tmp_path):
    from distill.train.checkpoint import _batch_mismatch

    state = {"global_batch": 8, "world_size": 2}
    msg = _batch_mismatch(tmp_path / "step_00000002", state, 12, 3, 4, 1)
    assert "\n" not in msg and "saved with global batch 8 (2 rank(s))" in msg and "a world size that divides 8" in msg
    assert "use --train.micro_batch=4 --train.grad_accum=2" in _batch_mismatch(tmp_path, state, 4, 1, 4, 1)
    assert "use --train.micro_batch=2 --train.grad_accum=1" in _batch_mismatch(tmp_path, state, 16, 4, 4, 1)
