"""The lean KD step's Triton branch (distill.losses.lean, impl="triton": the fused_linear_kd op with
CE in the same pass) equals its torch chunk loop on the supervised rows, for padded heads of
different sizes, full (hidden + head) and top-k teachers, and CE only."""

from __future__ import annotations

import contextlib

import pytest
import torch

pytestmark = [pytest.mark.triton_interp,
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


@pytest.mark.parametrize("teacher_kind", ["hidden", "topk", "none"])
def test_lean_triton_equals_torch(small_blocks, teacher_kind, monkeypatch):
    import importlib

    from distill.losses.lean import HiddenTeacher, linear_distill
    from distill.losses.teacher_output import TopKTeacher

    flk = importlib.import_module("distill_kernels.fused_linear_kd")  # the module (the package attribute is the op)
    calls = []
    real = flk.fused_linear_kd
    monkeypatch.setattr(flk, "fused_linear_kd", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    N, H, V, VS, VT, T = 13, 16, 301, 320, 333, 2.0
    rows = torch.randn(N, H)
    w = torch.randn(VS, H) * 0.3
    th, tw = torch.randn(N, H), torch.randn(VT, H) * 0.4
    targets = torch.randint(0, V, (N,))
    if teacher_kind == "hidden":
        teacher = HiddenTeacher(th, lambda: contextlib.nullcontext((tw, None)))
    elif teacher_kind == "topk":
        teacher = TopKTeacher.from_logits(th @ tw.t(), 16, temperature=T, vocab_size=V)
    else:
        teacher = None
    out = {}
    for impl in ("torch", "triton"):
        r = rows.clone().requires_grad_(True)
        ww = w.clone().requires_grad_(True)
        total, kd, ce = linear_distill(r, ww, None, teacher, targets, kind="jsd", beta=0.3, temperature=T,
                                       ce_weight=0.7, kd_weight=1.3 * T * T, vocab_size=V, chunk_tokens=5, impl=impl)
        (total * 1.5).backward()
        out[impl] = (total.detach(), kd, ce, r.grad, ww.grad)
    assert calls == [1]  # the triton branch ran the fused op (not the torch loop)
    for a, b in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    assert torch.count_nonzero(out["triton"][4][V:]) == 0
