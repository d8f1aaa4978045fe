"""Teacher fixtures: a tiny teacher saved as an HF folder, and ONE loopback Ray per session."""

from __future__ import annotations

import os
import tempfile

import pytest


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer):
    """A 2-layer Llama ('micro') saved with save_pretrained, with the test tokenizer."""
    from distill.models.tiny import build_tiny_causal_lm

    path = tmp_path_factory.mktemp("teacher") / "micro"
    model = build_tiny_causal_lm(len(tiny_tokenizer), "micro", seed=0)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once, bound to 127.0.0.2 (loopback only); shut down by handle, never `ray stop`."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are length-limited
    for attempt in range(3):
        try:
            ray.init(_node_ip_address="127.0.0.2", include_dashboard=False, num_cpus=8, _temp_dir=temp,
                     log_to_driver=False)
            break
        except Exception as e:  # noqa: BLE001
            # 2026-11-23: Ray 2.60 waits a fixed 30 s for its raylet; on an overloaded 2-core CI
            # machine that can time out ("node timed out during startup"). Try again, then give up.
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
    try:
        yield ray
    finally:
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
