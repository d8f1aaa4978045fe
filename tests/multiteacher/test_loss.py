"""The multi-teacher chunk loop against references written from the definition (explicit
probabilities, fp64 autograd), and against the single-teacher lean loss where one teacher has all
the weight: loss, dL/drows and dL/dW, full and top-k teachers, own temperatures, odd shapes."""

from __future__ import annotations

import contextlib

import pytest
import torch

from distill.losses.lean import HiddenTeacher, linear_distill
from distill.losses.multiteacher import MultiLinearFunction, MultiRowsFunction, Spec, _Parts
from distill.losses.teacher_output import TopKTeacher

N, H, V = 37, 16, 131  # odd shapes; chunk 8 -> several chunks and a ragged last one


def _hidden_teacher(seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, 12, generator=g)
    w = torch.randn(V, 12, generator=g) * 0.7

    @contextlib.contextmanager
    def head():
        yield w, None

    return HiddenTeacher(h, head), h @ w.t()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.3).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=g)
    return rows, weight, targets


def _run(rows, weight, teachers, targets, weights, spec):
    parts = _Parts(spec.n, N, rows.device, spec.conf_signal is not None, False)
    total = MultiLinearFunction.apply(rows, weight, None, teachers, targets, weights, spec, None, parts)
    gr, gw = torch.autograd.grad(total * 1.7, (rows, weight))  # upstream gradient != 1
    return total.detach(), gr, gw, parts


def _ref(rows, weight, t_logits, temps, targets, weight_fn, kd_weight=1.0, ce_weight=1.0):
    """Definition: ce_weight CE + sum_t w_t kd_weight T_t^2 KL(p_t || q_t), fp64, autograd."""
    r, w = rows.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    s = r @ w.t()
    total = ce_weight * torch.nn.functional.cross_entropy(s, targets, reduction="sum")
    logp = [torch.log_softmax(t.double() / T, -1) for t, T in zip(t_logits, temps)]
    wts = weight_fn(logp)
    for i, (lp, T) in enumerate(zip(logp, temps)):
        log_q = torch.log_softmax(s / T, -1)
        kl = (lp.exp() * (lp - log_q)).sum(-1)
        total = total + (wts[:, i] * kd_weight * T * T * kl).sum()
    gr, gw = torch.autograd.grad(total * 1.7, (r, w))
    return total.detach(), gr, gw


def _spec(temps, **kw):
    return Spec(kind="forward_kl", beta=0.5, alpha=0.1, temperatures=temps, ce_weight=kw.pop("ce_weight", 1.0),
                kd_weight=kw.pop("kd_weight", 1.0), vocab=V, chunk=8, **kw)


@pytest.mark.parametrize("temps", [[1.0, 1.0], [2.0, 0.7]], ids=["T1", "T2-0.7"])
def test_fixed_weights_equal_definition(temps):
    rows, weight, targets = _inputs()
    (t1, l1), (t2, l2) = _hidden_teacher(1), _hidden_teacher(2)
    wts = torch.tensor([0.3, 0.7]).expand(N, 2)
    got = _run(rows, weight, [t1, t2], targets, wts, _spec(temps, kd_weight=0.6))
    want = _ref(rows, weight, [l1, l2], temps, targets, lambda lp: wts.double(), kd_weight=0.6)
    for a, b in zip(got[:3], want):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=1e-5)
    assert torch.allclose(got[3].w, torch.tensor([0.3 * N, 0.7 * N]))


@pytest.mark.parametrize("signal", ["gold_prob", "neg_entropy"])
def test_confidence_weights_equal_definition(signal):
    rows, weight, targets = _inputs(3)
    (t1, l1), (t2, l2), (t3, l3) = _hidden_teacher(4), _hidden_teacher(5), _hidden_teacher(6)
    temps, tau = [1.0, 2.0, 1.5], 0.5

    def weight_fn(logp):
        if signal == "gold_prob":
            c = torch.stack([lp.gather(-1, targets[:, None]).squeeze(-1) for lp in logp], -1)
        else:
            c = torch.stack([(lp.exp() * lp).sum(-1) for lp in logp], -1)
        return torch.softmax(c / tau, -1)  # weights are constants of the loss (no gradient through them)

    got = _run(rows, weight, [t1, t2, t3], targets, None, _spec(temps, conf_signal=signal, conf_temperature=tau))
    want = _ref(rows, weight, [l1, l2, l3], temps, targets, lambda lp: weight_fn([x.detach() for x in lp]))
    for a, b in zip(got[:3], want):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(got[3].w.sum(), torch.tensor(float(N)))


def test_one_teacher_with_all_weight_is_the_single_teacher_lean_loss():
    """Weights (1, 0) with a full and a top-k teacher (each at its own temperature) equal
    linear_distill with that teacher alone; (0, 1) equals the other one alone."""
    rows, weight, targets = _inputs(7)
    ht, logits = _hidden_teacher(8)
    topk = TopKTeacher.from_logits(_hidden_teacher(9)[1], 6, temperature=2.0, vocab_size=V)
    spec = _spec([1.0, 2.0])
    for i, (alone, T) in enumerate([(ht, 1.0), (topk, 2.0)]):
        wts = torch.nn.functional.one_hot(torch.full((N,), i), 2).float()
        got = _run(rows, weight, [ht, topk], targets, wts, spec)
        total, _, _ = linear_distill(rows, weight, None, alone, targets, temperature=T, kd_weight=T * T,
                                     chunk_tokens=8)
        gr, gw = torch.autograd.grad(total * 1.7, (rows, weight))
        torch.testing.assert_close(got[0], total.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], gr, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[2], gw, rtol=1e-5, atol=1e-6)


def test_skipped_teacher_and_logits_path_match_lean():
    """A teacher given as None (not run) contributes nothing; the kd.path=logits Function on the rows'
    logits equals the lean Function on the hidden rows."""
    rows, weight, targets = _inputs(11)
    ht, logits = _hidden_teacher(12)
    wts = torch.tensor([1.0, 0.0]).expand(N, 2)
    spec = _spec([1.5, 1.0])
    lean = _run(rows, weight, [ht, None], targets, wts, spec)
    s = (rows @ weight.t()).detach().requires_grad_(True)
    parts = _Parts(2, N, s.device, False, False)
    total = MultiRowsFunction.apply(s, [logits, None], targets, wts, spec, parts)
    (gs,) = torch.autograd.grad(total * 1.7, (s,))
    torch.testing.assert_close(total.detach(), lean[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gs @ weight.detach(), lean[1], rtol=1e-4, atol=1e-5)
    assert float(parts.kd[1]) == 0.0 and float(parts.w[1]) == 0.0
