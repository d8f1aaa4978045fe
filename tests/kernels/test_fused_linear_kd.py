"""fused_linear_kd vs kernels/ref.py fused_linear_kd_ref: loss, hidden and lm_head gradients.

A top-k teacher is taken at the temperature it is used at (kernels/ref.py, "Top-k teacher at
temperature T").
"""

from __future__ import annotations

import pytest
import torch

from distill_kernels.ref import (
    assert_close_to_ref, fused_linear_kd_ref, kd_div_ref, topk_kd_ref, topk_of_logits_ref,
)

from .conftest import (
    EQUALITY_ATOL, EQUALITY_V, equality_cases, grad_atol, make_labels, randn,
)

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


class _TopK:
    def __init__(self, ids, logprobs, tail_mass):
        self.ids, self.logprobs, self.tail_mass = ids, logprobs, tail_mass


def _topk_teacher(logits, k, temperature):
    """The teacher's top-k at the temperature it is used at (the ops temper the student only)."""
    ids, lps, tail = topk_of_logits_ref(logits, k, temperature=temperature)
    return _TopK(ids.to(torch.int32), lps, tail)


def _check(lead, hidden, vocab, kind, beta, dtype, *, teacher="full", k=8, chunk_tokens=3,
           reduction="mean", labels="some", upstream=2.5, temperature=1.5, train_head=True,
           device="cpu"):
    from distill_kernels.fused_linear_kd import fused_linear_kd

    h = randn((*lead, hidden), scale=1.0, seed=0, device=device).to(dtype)
    w = (randn((vocab, hidden), scale=1.0, seed=1, device=device) / hidden**0.25).to(dtype)
    th = randn((*lead, hidden), scale=1.0, seed=2, device=device).to(dtype)
    tw = (randn((vocab, hidden), scale=1.0, seed=3, device=device) / hidden**0.25).to(dtype)
    if teacher == "full":
        t_arg = (th, tw)
    else:
        t_arg = _topk_teacher(th.float() @ tw.float().t(), k, temperature)
    lab = None
    if labels == "some":
        lab = make_labels(lead, device=device)
    elif labels == "all":
        lab = make_labels(lead, all_ignored=True, device=device)
    kw = dict(kind=kind, beta=beta, temperature=temperature, reduction=reduction)

    hk = h.clone().requires_grad_(True)
    wk = w.clone().requires_grad_(train_head)
    out = fused_linear_kd(hk, wk, t_arg, lab, chunk_tokens=chunk_tokens, **kw)
    (out * upstream).backward()

    # fp32 reference on the same (dtype-rounded) values.
    h32 = h.detach().float().clone().requires_grad_(True)
    w32 = w.detach().float().clone().requires_grad_(True)
    t32 = (th.float(), tw.float()) if teacher == "full" else t_arg
    ref32 = fused_linear_kd_ref(h32, w32, t32, lab, **kw)
    (ref32 * upstream).backward()

    # The same computation in the dtype: logits from dtype matmuls, gradients staged as in
    # tests/kernels/conftest.py ref_pair (unit upstream, rounded, then scaled in the dtype).
    hd = h.clone().requires_grad_(True)
    wd = w.clone().requires_grad_(True)
    logits = hd @ wd.t()
    if teacher == "full":
        ref_d = kd_div_ref(logits, th @ tw.t(), lab, **kw)
    else:
        ref_d = topk_kd_ref(logits, t_arg.ids, t_arg.logprobs, t_arg.tail_mass, lab, **kw)
    ref_d.backward()
    up = torch.tensor(upstream).to(dtype)
    gh_d, gw_d = hd.grad * up, wd.grad * up

    name = f"{kind}/{teacher}/{dtype}"
    assert_close_to_ref(out.detach(), ref_d.detach(), ref32.detach(), name=f"{name} loss")
    assert hk.grad.dtype == dtype and hk.grad.shape == h.shape
    assert_close_to_ref(hk.grad, gh_d, h32.grad, atol=grad_atol(h32.grad, dtype),
                        name=f"{name} d hidden")
    if train_head:
        assert wk.grad.dtype == dtype and wk.grad.shape == w.shape
        assert_close_to_ref(wk.grad, gw_d, w32.grad, atol=grad_atol(w32.grad, dtype),
                            name=f"{name} d lm_head")
    else:
        assert wk.grad is None
    return out, hk.grad


@pytest.mark.triton_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("teacher", ["full", "topk"])
@pytest.mark.parametrize("kind,beta", [("jsd", 0.5), ("forward_kl", 0.5), ("reverse_kl", 0.5)])
def test_fused_linear_kd_matches_ref(small_blocks, kind, beta, teacher, dtype):
    _check((2, 5), 24, 301, kind, beta, dtype, teacher=teacher)


@pytest.mark.triton_interp
def test_fused_linear_kd_sum_default_chunk_frozen_head(small_blocks):
    _check((3, 4), 16, 200, "jsd", 0.9, torch.float32, chunk_tokens=None, reduction="sum",
           train_head=False, temperature=1.0, upstream=1.0)


@pytest.mark.triton_interp
def test_fused_linear_kd_all_ignored(small_blocks):
    out, gh = _check((2, 3), 16, 150, "jsd", 0.5, torch.float32, labels="all")
    assert float(out.detach()) == 0.0 and bool((gh == 0).all())


@pytest.mark.triton_interp
def test_fused_linear_kd_topk_zero_at_equality(tiny_blocks):
    """The student's logits h @ W.T are the teacher's, whose top-k is taken at the temperature of
    use: loss ~0 and gradients ~0 for every kind, k in {1, 16, V}, T in {0.5, 1, 2, 4}. The
    bound on the hidden and lm_head gradients is the per-logit one (EQUALITY_ATOL) carried
    through the matmuls. TVD: loss only (no gradient at p = q; see test_topk_kd.py)."""
    from distill_kernels import fused_linear_kd

    hidden = 8
    h = randn((2, hidden), scale=1.0, seed=4) * torch.tensor([[1.0], [0.3]])
    w = randn((EQUALITY_V, hidden), scale=1.0, seed=5)
    logits = h @ w.t()
    dh_bound = EQUALITY_ATOL * w.abs().sum(0)
    dw_bound = EQUALITY_ATOL * h.abs().sum(0)
    for kind, beta, k, temperature in equality_cases():
        name = f"{kind} beta={beta} k={k} T={temperature}"
        teacher = _TopK(*topk_of_logits_ref(logits, k, temperature=temperature))
        hk, wk = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fused_linear_kd(hk, wk, teacher, kind=kind, beta=beta, temperature=temperature,
                              reduction="sum", chunk_tokens=1)
        out.backward()
        assert abs(float(out.detach())) <= 2 * EQUALITY_ATOL, f"{name}: loss {float(out):.2e}"
        if kind != "tvd":
            assert bool((hk.grad.abs() <= dh_bound).all()), f"{name}: d hidden {hk.grad}"
            assert bool((wk.grad.abs() <= dw_bound).all()), f"{name}: d lm_head"


@pytest.mark.triton_interp
def test_fused_linear_kd_rejects_none_reduction_and_bad_shapes():
    from distill_kernels.fused_linear_kd import fused_linear_kd

    h, w = randn((4, 8)), randn((50, 8))
    with pytest.raises(NotImplementedError, match="none"):
        fused_linear_kd(h, w, (h, w), reduction="none")
    with pytest.raises(ValueError, match="lm_head"):
        fused_linear_kd(h, randn((50, 9)), (h, w))
    with pytest.raises(ValueError, match="vocab"):
        fused_linear_kd(h, w, (h, randn((51, 8))))
    with pytest.raises(TypeError, match="ids"):
        fused_linear_kd(h, w, object())


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32_000, 128_256, 152_064])
@pytest.mark.parametrize("teacher", ["full", "topk"])
@pytest.mark.parametrize("kind,beta", [("jsd", 0.5), ("forward_kl", 0.5), ("reverse_kl", 0.5)])
def test_fused_linear_kd_matches_ref_gpu(kind, beta, teacher, vocab):
    _check((2, 300), 1024, vocab, kind, beta, torch.bfloat16, teacher=teacher, k=64,
           chunk_tokens=256, device="cuda")
