"""Fixtures of the SentiBench evaluation tests: a tiny random causal LM with the shared tiny tokenizer."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_lm(tiny_tokenizer):
    from distill.models.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(len(tiny_tokenizer), "micro", seed=0).eval()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_lm, tiny_tokenizer):
    """The tiny model as a save_pretrained folder, loadable by AutoModelForCausalLM / AutoTokenizer."""
    path = tmp_path_factory.mktemp("tiny_lm")
    tiny_lm.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny models run fastest on one intra-op thread, by far on a shared CPU; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
