"""The plain engine's optimizer step on the CPU: fused AdamW, and clipping that leaves gradients
below the threshold untouched while giving torch's norm and factor (docs/trainer.md, "Where a
step's time goes")."""

from __future__ import annotations

import types

import pytest
import torch

from distill.dist.engine import build_optimizer, clip_grad_norm


def _params(scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(40, 7, generator=g)) for _ in range(3)]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * scale
    return ps


@pytest.mark.parametrize("scale", [1e-3, 10.0, float("nan")])
def test_clip_matches_torch(scale):
    ours, ref = _params(scale), _params(scale)
    n_ours, n_ref = clip_grad_norm(ours, 1.0), torch.nn.utils.clip_grad_norm_(ref, 1.0)
    torch.testing.assert_close(n_ours, n_ref, equal_nan=True, rtol=0, atol=0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True, rtol=0, atol=0)


def test_clip_below_threshold_does_not_rewrite_gradients():
    ps = _params(1e-3)
    before = [p.grad._version for p in ps]
    norm = clip_grad_norm(ps, 1.0)
    assert 0 < float(norm) < 1.0
    assert [p.grad._version for p in ps] == before  # no in-place pass over the gradients


def test_cpu_adamw_is_fused():
    cfg = types.SimpleNamespace(lr=1e-3, adam_betas=[0.9, 0.95], adam_eps=1e-8, weight_decay=0.0)
    opt = build_optimizer(_params(1.0), cfg)
    assert opt.defaults["fused"] is True
