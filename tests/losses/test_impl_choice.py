"""impl="triton" asked for explicitly runs the kernel or fails in one line; impl="auto" may use the torch
path where a kernel cannot serve the call, and then says why (once)."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from distill.losses import divergences as D
from distill.losses.divergences import KernelUnavailable, forward_kl
from distill.losses.lean import linear_distill
from distill.losses.objective import DistillObjective, count_targets
from distill.losses.teacher_output import TopKTeacher


def _logits(n=10, v=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 2, torch.randn(n, v, generator=g) * 2


@pytest.fixture
def kernels_unimportable(monkeypatch):
    """distill_kernels' op modules fail to import (None in sys.modules makes `import` raise)."""
    for name in ("kd_div", "topk_kd", "fused_linear_kd"):
        monkeypatch.setitem(sys.modules, f"distill_kernels.{name}", None)
    monkeypatch.setattr(D, "_warned", set())


def test_explicit_triton_with_unimportable_kernel_is_one_line_error(kernels_unimportable):
    s, t = _logits()
    with pytest.raises(KernelUnavailable, match=r"impl='triton': distill_kernels.kd_div cannot run") as e:
        forward_kl(s, t, impl="triton")
    assert "\n" not in str(e.value) and "not importable" in str(e.value)


def test_auto_falls_back_once_and_says_why(kernels_unimportable):
    s, t = _logits()
    with pytest.warns(UserWarning, match="distill_kernels.kd_div: not importable"):
        assert D.triton_divergence("forward_kl", s, t, None, beta=0.5, alpha=0.1, temperature=1.0,
                                   ignore_index=-100, reduction="sum", requested="auto") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process, not per call
        D.triton_divergence("forward_kl", s, t, None, beta=0.5, alpha=0.1, temperature=1.0, ignore_index=-100,
                            reduction="sum", requested="auto")


def test_explicit_triton_with_softcap_is_an_error_not_torch():
    pytest.importorskip("triton")
    s, t = _logits()
    labels = torch.zeros(1, 10, dtype=torch.long)
    obj = DistillObjective(kind="forward_kl", impl="triton", student_softcap=30.0)
    with pytest.raises(KernelUnavailable, match="softcaps are handled by the torch path only"):
        obj(s[None], t[None], labels, count_targets(labels))
    with pytest.raises(KernelUnavailable, match="softcaps"):
        forward_kl(s, t, impl="triton", student_softcap=30.0)


def test_lean_topk_beyond_the_kernels_k_explicit_fails_auto_runs_torch(monkeypatch):
    """k = 300 > 256, the top-k kernels' largest k: impl="triton" is a one-line error naming k;
    the resolved-auto path warns and gives exactly the torch loop's numbers."""
    pytest.importorskip("triton")
    monkeypatch.setattr(D, "_warned", set())
    g = torch.Generator().manual_seed(3)
    rows, w = torch.randn(6, 16, generator=g), torch.randn(400, 16, generator=g)
    targets = torch.randint(0, 400, (6,), generator=g)
    teacher = TopKTeacher.from_logits(torch.randn(6, 400, generator=g), 300)
    kw = dict(kind="forward_kl", kd_weight=1.0)
    with pytest.raises(KernelUnavailable, match=r"k=300") as e:
        linear_distill(rows, w, None, teacher, targets, impl="triton", **kw)
    assert "\n" not in str(e.value)
    with pytest.warns(UserWarning, match=r"fused_linear_kd: top-k kernel supports .* k=300; using the torch path"):
        got = linear_distill(rows, w, None, teacher, targets, impl="triton", requested="auto", **kw)
    want = linear_distill(rows, w, None, teacher, targets, impl="torch", **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
