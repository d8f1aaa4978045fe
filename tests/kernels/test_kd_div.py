"""kd_div vs kernels/distill_kernels/ref.py kd_div_ref: outputs and student-logit gradients, flash-attention rule."""

from __future__ import annotations

import pytest
import torch

from distill_kernels.ref import assert_close_to_ref, kd_div_ref

# NaNs in the untaken branch of tl.where (log 0 - log 0) are expected; numpy warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

from .conftest import grad_atol, make_labels, randn, ref_pair

KINDS = [
    ("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0),
    ("jsd", 0.9), ("skew_kl", 0.5), ("skew_reverse_kl", 0.5), ("tvd", 0.5),
]


def _check(shape, kind, beta, dtype, *, temperature=2.0, reduction="mean", labels="some",
           upstream=1.7, alpha=0.1, device="cpu", seed=0):
    from distill_kernels.kd_div import kd_div

    s = randn(shape, seed=seed, device=device).to(dtype)
    t = randn(shape, seed=seed + 1, device=device).to(dtype)
    lab = None
    if labels == "some":
        lab = make_labels(shape[:-1], seed=seed, device=device)
    elif labels == "all":
        lab = make_labels(shape[:-1], all_ignored=True, device=device)
    kw = dict(kind=kind, beta=beta, alpha=alpha, temperature=temperature, reduction=reduction)
    sk = s.clone().requires_grad_(True)
    out = kd_div(sk, t, lab, **kw)
    w = randn(out.shape, seed=9, device=device) if reduction == "none" else torch.tensor(upstream)
    (out * w).sum().backward()
    (r_out, r_g), (f_out, f_g) = ref_pair(
        lambda student_logits, teacher_logits: kd_div_ref(student_logits, teacher_logits, lab, **kw),
        {"student_logits": s, "teacher_logits": t}, ["student_logits"], w,
    )
    assert out.dtype == torch.float32 and out.shape == f_out.shape
    assert sk.grad.dtype == dtype and sk.grad.shape == s.shape
    assert_close_to_ref(out, r_out, f_out, name=f"{kind} loss")
    assert_close_to_ref(sk.grad, r_g[0], f_g[0], atol=grad_atol(f_g[0], dtype), name=f"{kind} grad")
    return out, sk.grad


@pytest.mark.triton_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,beta", KINDS, ids=[f"{k}-{b}" for k, b in KINDS])
def test_kd_div_matches_ref(small_blocks, kind, beta, dtype):
    _check((3, 5, 301), kind, beta, dtype)


@pytest.mark.triton_interp
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("jsd", 0.5), ("reverse_kl", 0.5)])
def test_kd_div_reductions_and_temperature_one(small_blocks, kind, beta, reduction):
    _check((4, 1271 // 4), kind, beta, torch.float32, temperature=1.0, reduction=reduction,
           upstream=0.3)


@pytest.mark.triton_interp
@pytest.mark.parametrize("kind,beta", [("jsd", 0.5), ("forward_kl", 0.5)])
def test_kd_div_all_ignored_gives_zero(small_blocks, kind, beta):
    out, grad = _check((2, 3, 200), kind, beta, torch.float32, labels="all")
    assert float(out.detach()) == 0.0
    assert bool((grad == 0).all())


@pytest.mark.triton_interp
def test_kd_div_no_labels_one_block_odd_vocab():
    _check((7, 47), "jsd", 0.3, torch.float32, labels=None, temperature=0.7)


@pytest.mark.triton_interp
def test_kd_div_grad_inplace_aliases_student_buffer(small_blocks):
    from distill_kernels.kd_div import kd_div

    s = randn((6, 300))
    t = randn((6, 300), seed=1)
    leaf = s.clone().requires_grad_(True)
    base = leaf * 1.0  # non-leaf buffer whose storage receives the gradient
    ptr = base.data_ptr()
    out = kd_div(base, t, kind="jsd", grad_inplace=True)
    out.backward()
    ref_leaf = s.clone().requires_grad_(True)
    kd_div_ref(ref_leaf, t, kind="jsd").backward()
    assert_close_to_ref(leaf.grad, ref_leaf.grad, ref_leaf.grad, name="inplace grad")
    assert base.data_ptr() == ptr
    assert torch.equal(base.detach(), leaf.grad)  # the buffer now holds the gradient


@pytest.mark.triton_interp
def test_kd_div_grad_inplace_breaks_other_savers_loudly():
    """Another op that saved the logits for backward must fail, not use the overwritten data."""
    from distill_kernels.kd_div import kd_div

    leaf = randn((4, 64)).requires_grad_(True)
    logits = leaf * 1.0
    other = (logits * logits).sum()  # saves `logits`
    kd = kd_div(logits, randn((4, 64), seed=1), kind="forward_kl", grad_inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (other + kd).backward()


@pytest.mark.triton_interp
def test_kd_div_vocab_slice_view_no_copy(small_blocks):
    """A [..., :V] view of padded logits is read in place (row stride != V)."""
    from distill_kernels.kd_div import kd_div

    full = randn((2, 3, 320)).requires_grad_(True)
    t = randn((2, 3, 300), seed=1)
    kd_div(full[..., :300], t, kind="reverse_kl").backward()
    ref = full.detach().clone().requires_grad_(True)
    kd_div_ref(ref[..., :300], t, kind="reverse_kl").backward()
    assert_close_to_ref(full.grad, ref.grad, ref.grad, name="sliced grad")
    assert bool((full.grad[..., 300:] == 0).all())


@pytest.mark.triton_interp
def test_kd_div_no_grad_forward_matches():
    from distill_kernels.kd_div import kd_div

    s, t = randn((5, 100)), randn((5, 100), seed=1)
    with torch.no_grad():
        out = kd_div(s, t, kind="skew_kl")
    ref = kd_div_ref(s, t, kind="skew_kl")
    assert_close_to_ref(out, ref, ref)


@pytest.mark.triton_interp
def test_kd_div_rejects_what_it_cannot_do():
    from distill_kernels.kd_div import kd_div

    s, t = randn((2, 16)), randn((2, 16), seed=1)
    with pytest.raises(NotImplementedError):
        kd_div(s, t, kind="wasserstein")
    with pytest.raises(NotImplementedError):
        kd_div(s, t.requires_grad_(True), kind="jsd")
    with pytest.raises(ValueError, match="differ in shape"):
        kd_div(s, randn((2, 17)), kind="jsd")
    with pytest.raises(ValueError, match="temperature"):
        kd_div(s, s, temperature=0.0)
    x = s.clone().requires_grad_(True)
    loss = kd_div(x, t.detach(), kind="jsd")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        loss.backward()


GPU_VOCABS = [32_000, 128_256, 152_064]


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", GPU_VOCABS)
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5),
                                       ("jsd", 0.0), ("jsd", 1.0), ("skew_kl", 0.5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_kd_div_matches_ref_gpu(kind, beta, dtype, vocab):
    _check((3, 37, vocab), kind, beta, dtype, device="cuda")
