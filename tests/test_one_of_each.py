"""One print0 and one versions() (the trainer and the SentiBench evaluator alike), one Ray teacher section."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from distill.dist import env as distenv

ROOT = Path(__file__).resolve().parents[1]


def _fake_dist(rank: int | None) -> types.SimpleNamespace:
    """A stand-in for torch.distributed: a process group of which this process is ``rank`` (None: none)."""
    return types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: rank is not None,
                                 get_rank=lambda: rank)


@pytest.mark.parametrize("env, group_rank, printed", [
    ({}, None, True),                                            # plain python: rank 0 of 1
    ({"RANK": "0"}, None, True),
    ({"RANK": "1"}, None, False),                                # launched as rank 1, before the process group
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, None, False),   # srun, no RANK
    ({"RANK": "1"}, 0, True),                                    # the process group's rank wins once it exists
    ({"RANK": "0"}, 1, False),
])
def test_print0_prints_on_rank0_only(monkeypatch, capsys, env, group_rank, printed):
    for k in ("RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(sys.modules, "torch.distributed", _fake_dist(group_rank))
    distenv.print0("hello", file=sys.stderr)
    assert capsys.readouterr().err == ("hello\n" if printed else "")


def test_the_evaluator_uses_the_one_print0_and_versions(monkeypatch, capsys):
    from distill import runinfo
    from distill.eval import sentibench

    assert sentibench.print0 is distenv.print0 and sentibench.versions is runinfo.versions
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setitem(sys.modules, "torch.distributed", _fake_dist(None))
    sentibench.print0("a warning")  # torchrun'd rank 1 of the evaluator: silent too
    assert capsys.readouterr().out == ""


def test_versions_has_the_keys_of_the_run_files_and_of_results():
    from distill.runinfo import versions

    v = versions()
    assert set(v) == {"python", "torch", "deepspeed", "transformers", "triton", "datasets", "safetensors",
                      "distill", "git_sha", "git", "gpu"}
    import torch

    assert v["torch"] == torch.__version__ and v["python"] == sys.version.split()[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert v["git_sha"] == v["git"] == (head.stdout.strip() or None if head.returncode == 0 else None)


def test_one_ray_teacher_section():
    import dataclasses

    from distill.config import RayTeacherSection, TeacherSection
    from distill.icldist.config import TeacherSection as ICLTeacherSection

    ray_fields = [f.name for f in dataclasses.fields(RayTeacherSection)]
    assert ray_fields == ["quantization", "ray_address", "ray_node_ip", "replicas", "shards", "num_gpus",
                          "max_batch_tokens", "max_restarts", "max_retries"]
    for cls in (TeacherSection, ICLTeacherSection):
        assert issubclass(cls, RayTeacherSection)
        own = {f.name for f in dataclasses.fields(cls)} - set(ray_fields)
        # no Ray field declared twice: the subclasses add only their own settings
        assert not own & set(ray_fields) and all(n not in cls.__dict__.get("__annotations__", {}) for n in ray_fields)
