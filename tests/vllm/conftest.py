"""The vLLM tests (marker ``vllm``): they run in an environment with vLLM's CPU build (``.ci/run``
builds it beside the main one; docs/teacher.md, "vLLM on a CPU") and skip where vLLM is not importable.

Each module starts its engines once (about 10-30 s each on a 2-core CPU, about 3 GiB) and shares them
between its tests. The tiny models have a head dimension of 32: vLLM's CPU attention refuses 16.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

# vLLM's CPU defaults: a KV cache of 92% of RAM (refused on a 24 GiB machine) and one core left idle.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(1, len(os.sched_getaffinity(0))) - 1}")

_spec = importlib.util.spec_from_file_location("trainer_helpers", Path(__file__).parents[1] / "trainer" / "conftest.py")
trainer_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trainer_helpers)

# Engines in the tests skip torch.compile (a quicker start); launchers/bench_harvest.py's test runs the
# default, compiled engine.
from distill.config import VLLMSection  # noqa: E402

EAGER = VLLMSection(enforce_eager=True)

# hidden 64 over 2 heads: head dimension 32.
VLLM_SIZE = dict(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128)


@pytest.fixture(scope="session")
def vllm_assets(tmp_path_factory):
    """{tokenizer, teacher, student, data, root}: a peaked random teacher and a student, both with
    head dimension 32, on a 384-token tokenizer; 96 prompt/response records."""
    from distill.models.tiny import TinySize, train_tokenizer

    root = tmp_path_factory.mktemp("vllm_assets")
    pairs = trainer_helpers.synthetic_pairs(96)
    tok = train_tokenizer([p["prompt"] + p["response"] for p in pairs] * 3, vocab_size=384)
    teacher = trainer_helpers.save_tiny_model(tok, TinySize(**VLLM_SIZE), 1, root / "teacher", initializer_range=0.3)
    student = trainer_helpers.save_tiny_model(tok, TinySize(**VLLM_SIZE), 2, root / "student")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return {"tokenizer": tok, "teacher": str(teacher), "student": str(student), "data": str(data), "root": root}
