"""Shared test setup: markers, CPU-only skips, the Triton interpreter, tiny shared fixtures.

Each area keeps its own fixtures in tests/<area>/conftest.py.
"""

from __future__ import annotations

import os

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
