"""Shared test setup: markers, CPU-only skips, the Triton interpreter, tiny shared fixtures.

Each area keeps its own fixtures in tests/<area>/conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Must happen before anything imports triton: on a machine without CUDA, Triton kernels run in the
# interpreter (marker triton_interp). On a GPU machine they run natively.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep every socket a test opens on loopback (gloo, DeepSpeed), and keep tokenizers quiet in forks.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No model hub is reachable from the tests (models are built in-process): a hub name fails at once
# instead of after the hub client's connection retries (about 20 s each, inherited by subprocesses).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def sentibench_texts():
    """Training texts of every SentiBench task (the shared data, else the packaged sample)."""
    from distill.data.sentibench import load_texts

    return load_texts(split="train")


@pytest.fixture(scope="session")
def tiny_tokenizer(sentibench_texts):
    """A 4096-token byte-level BPE tokenizer trained on SentiBench text (about 5 s, once)."""
    from distill.models.tiny import train_tokenizer

    return train_tokenizer(sentibench_texts, vocab_size=4096)


# -- user errors: how the tests check them (distill.errors.run_cli) ---------------------------------

REPO = Path(__file__).resolve().parents[1]


def run_launcher(script: str, *args: str, env: dict | None = None, timeout: int = 300, cwd=None):
    """``python launchers/<script> args...`` (or ``-m module`` when ``script`` starts with ``-m``)."""
    cmd = [sys.executable] + (script.split() if script.startswith("-m ") else [str(REPO / "launchers" / script)])
    e = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    e.pop("DISTILL_DEBUG", None)
    e.update(env or {})
    return subprocess.run(cmd + list(args), env=e, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def load_launcher(script: str):
    """``launchers/<script>`` imported as a module (registered in ``sys.modules``, which dataclasses
    need to resolve annotations), to call its functions in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_launcher_{Path(script).stem}", REPO / "launchers" / script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def assert_user_error(proc, *needles: str) -> str:
    """rc 2, no traceback, and the last stderr line (the error) contains every needle; returns it."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"rc={proc.returncode}\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    line = [x for x in proc.stderr.splitlines() if x.strip()][-1]
    assert ": error: " in line, line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


def assert_checkpoint_exports(run_dir: Path, out: Path, stage_class: str) -> None:
    """``python -m distill.export`` on the newest checkpoint of ``run_dir``: it reads the checkpoint's
    config with the stage's schema (``stage_class`` recorded in trainer_state.json), the folder loads in
    plain transformers, and its weights equal the run's own end-of-run export where there is one."""
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from distill.errors import run_cli
    from distill.export import find_checkpoint, main

    ckpt = find_checkpoint(run_dir)
    assert json.loads((ckpt / "trainer_state.json").read_text())["config_class"] == stage_class
    assert run_cli(main, "distill-export", ["--checkpoint", str(run_dir), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    own = run_dir / "export" / "model.safetensors"
    if own.is_file():
        ref = load_file(str(own))
        sd = model.state_dict()
        assert ref.keys() <= sd.keys()
        for k, v in ref.items():
            torch.testing.assert_close(sd[k], v, rtol=0, atol=0, msg=k)


class _Launchers:
    run = staticmethod(run_launcher)
    load = staticmethod(load_launcher)
    assert_user_error = staticmethod(assert_user_error)


@pytest.fixture
def launcher():
    """``launcher.run("knowdist.py", "--a.b=c")`` then ``launcher.assert_user_error(proc, "a.b")``:
    a launcher in a subprocess must exit 2 with one error line naming the file/key, no traceback."""
    return _Launchers
