"""fused_linear_kd vs kernels/distill_kernels/ref.py fused_linear_kd_ref: loss, hidden and lm_head gradients,
for the divergence alone and for the lean KD step's objective (ce_weight * CE + kd_weight * KD over
the first vocab_size rows of padded heads, with its parts).

A top-k teacher is taken at the temperature it is used at (kernels/distill_kernels/ref.py, "Top-k teacher at
temperature T").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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


class _RoundGrad(torch.autograd.Function):
    """Identity whose backward rounds the gradient to ``dtype`` (and back to fp32)."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype).float(), None


def _check(lead, hidden, vocab, kind, beta, dtype, *, teacher="full", k=8, chunk_tokens=3,
           reduction="mean", labels="some", upstream=2.5, temperature=1.5, train_head=True,
           device="cpu", ce_weight=0.0, kd_weight=1.0, student_pad=0, teacher_pad=0):
    """fused_linear_kd against fused_linear_kd_ref: loss, d hidden, d lm_head and the parts.

    ``vocab`` is the real vocabulary V; the student head has ``vocab + student_pad`` rows, the
    teacher head ``vocab + teacher_pad`` (``vocab_size=vocab`` is passed when either is padded).
    ``teacher``: "full", "topk" or "none" (CE only: ``kd_weight`` must be 0)."""
    from distill_kernels.fused_linear_kd import fused_linear_kd

    vs, vt = vocab + student_pad, vocab + teacher_pad
    vocab_size = vocab if (student_pad or teacher_pad) else None
    h = randn((*lead, hidden), scale=1.0, seed=0, device=device).to(dtype)
    w = (randn((vs, hidden), scale=1.0, seed=1, device=device) / hidden**0.25).to(dtype)
    th = randn((*lead, hidden), scale=1.0, seed=2, device=device).to(dtype)
    tw = (randn((vt, hidden), scale=1.0, seed=3, device=device) / hidden**0.25).to(dtype)
    if teacher == "full":
        t_arg = (th, tw)
    elif teacher == "topk":
        # The teacher's top-k over the real vocabulary at the temperature of use (the ops temper
        # the student only).
        ids, lps, tail = topk_of_logits_ref(th.float() @ tw.float().t(), k,
                                            temperature=temperature, vocab_size=vocab)
        t_arg = _TopK(ids.to(torch.int32), lps, tail)
    else:
        t_arg = None
    lab = None
    if labels == "some":
        lab = make_labels(lead, device=device)
    elif labels == "all":
        lab = make_labels(lead, all_ignored=True, device=device)
    if lab is not None and ce_weight > 0:  # CE targets over the whole real vocabulary
        g = torch.Generator().manual_seed(7)
        targets = torch.randint(0, vocab, lab.shape, generator=g).to(device)
        targets.view(-1)[0] = vocab - 1  # the last real id
        lab = torch.where(lab == -100, lab, targets)
    kw = dict(kind=kind, beta=beta, temperature=temperature, reduction=reduction)
    obj = {}
    if ce_weight != 0.0 or kd_weight != 1.0 or vocab_size is not None:
        obj = dict(ce_weight=ce_weight, kd_weight=kd_weight, vocab_size=vocab_size)

    hk = h.clone().requires_grad_(True)
    wk = w.clone().requires_grad_(train_head)
    out, kd_sum, ce_sum = fused_linear_kd(hk, wk, t_arg, lab, chunk_tokens=chunk_tokens,
                                          return_parts=True, **kw, **obj)
    assert out.dtype == kd_sum.dtype == ce_sum.dtype == torch.float32
    assert not kd_sum.requires_grad and not ce_sum.requires_grad
    (out * upstream).backward()

    # fp32 reference on the same (dtype-rounded) values.
    h32 = h.detach().float().clone().requires_grad_(True)
    w32 = w.detach().float().clone().requires_grad_(True)
    t32 = (th.float(), tw.float()) if teacher == "full" else t_arg
    ref32, kd32, ce32 = fused_linear_kd_ref(h32, w32, t32, lab, return_parts=True, **kw, **obj)
    (ref32 * upstream).backward()

    # The same computation in the dtype, to set the tolerance: logits from a dtype matmul, the
    # reference's per-row terms on them, and the gradient staged the way fused_linear_kd stages
    # it: d loss / d logits at a unit upstream rounded to the dtype once (with CE the KD part
    # is rounded first, then added to the fp32 CE part: kernels/distill_kernels/fused_linear_kd.py, step 3);
    # d hidden = g @ lm_head in the dtype, times the upstream in the dtype (as conftest.py
    # ref_pair); d lm_head = g.T @ hidden accumulated in fp32, times the upstream in fp32, rounded
    # once (the fp32 accumulator). With fp32 inputs this run must equal the reference (checked
    # below), so its composition of the terms cannot drift from kernels/distill_kernels/ref.py.
    logits = (h @ w[:vocab].t()).float().requires_grad_(True)
    kd_in = _RoundGrad.apply(logits, dtype) if ce_weight != 0.0 else logits
    rows = dict(kw, reduction="none")
    if teacher == "full":
        kd_d = kd_div_ref(kd_in, th @ tw[:vocab].t(), lab, **rows)
    elif teacher == "topk":
        kd_d = topk_kd_ref(kd_in, t_arg.ids, t_arg.logprobs, t_arg.tail_mass, lab, **rows)
    else:
        kd_d = torch.zeros(logits.shape[:-1], device=device)
    ce_d = torch.zeros_like(kd_d)
    if ce_weight != 0.0:
        ce_d = F.cross_entropy(logits.flatten(0, -2), lab.reshape(-1), reduction="none",
                               ignore_index=-100).view(kd_d.shape)
    counted = kd_d.numel() if lab is None else int((lab != -100).sum())
    ref_d = (kd_weight * kd_d + ce_weight * ce_d).sum()
    if reduction == "mean":
        ref_d = ref_d / max(counted, 1)
    ref_d.backward()
    g_d = logits.grad.to(dtype)
    gh_d = (g_d @ w[:vocab]) * torch.tensor(upstream).to(dtype)
    gw_d = torch.zeros_like(w)
    gw_d[:vocab] = ((g_d.float().flatten(0, -2).t() @ h.float().flatten(0, -2))
                    * upstream).to(dtype)

    name = f"{kind}/{teacher}/{dtype}/ce={ce_weight}/kd={kd_weight}"
    if dtype == torch.float32:
        for got, ref, what in [(ref_d, ref32, "loss"), (gh_d, h32.grad, "d hidden"),
                               (gw_d, w32.grad, "d lm_head")]:
            assert_close_to_ref(got.detach(), ref.detach(), ref.detach(),
                                name=f"{name} in-dtype run {what}")
    assert_close_to_ref(out.detach(), ref_d.detach(), ref32.detach(), name=f"{name} loss")
    assert_close_to_ref(kd_sum, kd_d.sum().detach(), kd32, name=f"{name} kd_sum")
    assert_close_to_ref(ce_sum, ce_d.sum().detach(), ce32, name=f"{name} ce_sum")
    assert hk.grad.dtype == dtype and hk.grad.shape == h.shape
    assert_close_to_ref(hk.grad, gh_d, h32.grad, atol=grad_atol(h32.grad, dtype),
                        name=f"{name} d hidden")
    if train_head:
        assert wk.grad.dtype == dtype and wk.grad.shape == w.shape
        assert bool((wk.grad[vocab:] == 0).all()), f"{name}: padded student rows got gradient"
        assert_close_to_ref(wk.grad, gw_d, w32.grad, atol=grad_atol(w32.grad, dtype),
                            name=f"{name} d lm_head")
    else:
        assert wk.grad is None
    return out, hk.grad, (kd_sum, ce_sum)


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
    out, gh, _ = _check((2, 3), 16, 150, "jsd", 0.5, torch.float32, labels="all")
    assert float(out.detach()) == 0.0 and bool((gh == 0).all())


# The lean KD step's objective: ce_weight * CE (T = 1) + kd_weight * KD, over the first
# vocab_size rows of heads with more rows (student 301 + 3, teacher 301 + 11 here; at real shapes
# 151,665 < 151,936 < 152,064).
@pytest.mark.triton_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("teacher", ["full", "topk"])
@pytest.mark.parametrize("kd_weight", [0.0, 1.7])
def test_fused_linear_kd_ce_plus_kd_padded_vocab(small_blocks, kd_weight, teacher, dtype):
    _check((2, 5), 24, 301, "jsd", 0.5, dtype, teacher=teacher, ce_weight=0.6,
           kd_weight=kd_weight, student_pad=3, teacher_pad=11)


@pytest.mark.triton_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_linear_kd_ce_only_no_teacher(small_blocks, dtype):
    """teacher=None with kd_weight=0: the student's CE alone (sum, default chunk, frozen head in
    bf16); kd_sum is 0."""
    _, _, (kd_sum, ce_sum) = _check(
        (3, 4), 16, 200, "jsd", 0.5, dtype, teacher="none", ce_weight=1.0, kd_weight=0.0,
        student_pad=5, reduction="sum", chunk_tokens=None, train_head=dtype == torch.float32)
    assert float(kd_sum) == 0.0 and float(ce_sum) > 0.0


@pytest.mark.triton_interp
@pytest.mark.parametrize("teacher,dtype,kind", [("full", torch.float32, "forward_kl"),
                                                ("topk", torch.bfloat16, "reverse_kl")],
                         ids=["full-fp32", "topk-bf16"])
def test_fused_linear_kd_ce_plus_kd_odd_shapes(monkeypatch, teacher, dtype, kind):
    """3 x 47 rows, V = 1271 (blocks of 512: 3, the last ragged; 128 would take 3x longer under
    the interpreter), heads of 1280 and 1290 rows, k = 64, sum reduction, chunks of 64 rows (the
    last ragged)."""
    import distill_kernels._common as common

    monkeypatch.setattr(common, "MAX_BLOCK_V", 512)
    _check((3, 47), 16, 1271, kind, 0.5, dtype, teacher=teacher, k=64, chunk_tokens=64,
           reduction="sum", ce_weight=1.0, kd_weight=1.7, student_pad=9, teacher_pad=19,
           temperature=2.0, upstream=0.75)


@pytest.mark.triton_interp
@pytest.mark.parametrize("teacher", ["full", "none"])
def test_fused_linear_kd_ce_all_ignored(small_blocks, teacher):
    out, gh, (kd_sum, ce_sum) = _check(
        (2, 3), 16, 150, "jsd", 0.5, torch.float32, teacher=teacher, labels="all",
        ce_weight=1.0, kd_weight=0.0 if teacher == "none" else 1.7, student_pad=2, teacher_pad=4)
    assert float(out.detach()) == 0.0 and bool((gh == 0).all())
    assert float(kd_sum) == 0.0 and float(ce_sum) == 0.0


@pytest.mark.triton_interp
def test_fused_linear_kd_ce_no_grad_and_defaults(small_blocks):
    """Under no_grad the loss and parts are those of the differentiable call; explicit default
    weights give bit-identical results to the plain call; parts of the plain call are the KD sum
    and 0."""
    from distill_kernels.fused_linear_kd import fused_linear_kd

    h = randn((6, 16), scale=1.0, seed=0)
    w = randn((97, 16), scale=0.5, seed=1)
    teacher = (randn((6, 16), scale=1.0, seed=2), randn((99, 16), scale=0.5, seed=3))
    lab = make_labels((6,))
    kw = dict(temperature=1.5, ce_weight=0.4, kd_weight=2.0, vocab_size=90, return_parts=True,
              chunk_tokens=4)
    with torch.no_grad():
        parts0 = fused_linear_kd(h, w, teacher, lab, **kw)
    parts1 = fused_linear_kd(h.clone().requires_grad_(True), w.clone().requires_grad_(True),
                             teacher, lab, **kw)
    for a, b in zip(parts0, parts1):
        assert torch.equal(a, b.detach())

    t_same = (teacher[0], teacher[1][:97])
    hk = h.clone().requires_grad_(True)
    plain = fused_linear_kd(hk, w, t_same, lab, chunk_tokens=4)
    plain.backward()
    he = h.clone().requires_grad_(True)
    explicit, kd_sum, ce_sum = fused_linear_kd(he, w, t_same, lab, chunk_tokens=4, ce_weight=0.0,
                                               kd_weight=1.0, return_parts=True)
    explicit.backward()
    assert torch.equal(plain, explicit) and torch.equal(hk.grad, he.grad)
    n_valid = int((lab != -100).sum())
    torch.testing.assert_close(kd_sum, plain.detach() * n_valid)
    assert float(ce_sum) == 0.0


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
    lab = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_kd(h, w, (h, w), ce_weight=1.0)
    with pytest.raises(ValueError, match="teacher=None"):
        fused_linear_kd(h, w, None, lab, ce_weight=1.0)
    with pytest.raises(ValueError, match="teacher=None"):
        fused_linear_kd(h, w, None, lab, kd_weight=0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        fused_linear_kd(h, w, (h, w), vocab_size=51)
    with pytest.raises(ValueError, match="vocab_size"):
        fused_linear_kd(h, w, (h, randn((40, 8))), vocab_size=45)
    with pytest.raises(ValueError, match="ce_weight"):
        fused_linear_kd(h, w, (h, w), lab, ce_weight=-1.0)
    with pytest.raises(NotImplementedError, match="k <="):
        fused_linear_kd(h, w, _TopK(*topk_of_logits_ref(h @ w.t(), 10)), vocab_size=8)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32_000, 128_256, 152_064])
@pytest.mark.parametrize("teacher", ["full", "topk"])
@pytest.mark.parametrize("kind,beta", [("jsd", 0.5), ("forward_kl", 0.5), ("reverse_kl", 0.5)])
def test_fused_linear_kd_matches_ref_gpu(kind, beta, teacher, vocab):
    _check((2, 300), 1024, vocab, kind, beta, torch.bfloat16, teacher=teacher, k=64,
           chunk_tokens=256, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("teacher", ["full", "topk"])
def test_fused_linear_kd_lean_step_shapes_gpu(teacher):
    """The lean KD step at Qwen2.5-0.5B-like shapes: 4096 supervised rows, H = 896, student head
    151,936 rows, teacher head 152,064 rows, tokenizer vocabulary 151,665, bf16, CE + KD."""
    _check((4096,), 896, 151_665, "jsd", 0.5, torch.bfloat16, teacher=teacher, k=64,
           chunk_tokens=None, ce_weight=1.0, kd_weight=1.7, student_pad=151_936 - 151_665,
           teacher_pad=152_064 - 151_665, temperature=2.0, device="cuda")
