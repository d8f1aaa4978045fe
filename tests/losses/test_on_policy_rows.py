"""On-policy rows on the lean path: rows whose response the student wrote get the KD term only.

The step's loss is ``(sum_off (ce_w * CE + kd_w * T^2 * KD) + sum_on kd_w * T^2 * KD) / N`` with N
every supervised row of the step, on- and off-policy. The reference below is written from that
definition, independently of the implementation: fp64, the student's logits at every position
(``hidden @ W.T``), the supervised positions picked from the shifted labels, ``torch.log_softmax``
on both sides, the divergence written out (over the k + 1 buckets for a top-k teacher), autograd for
the gradients w.r.t. the hidden states and the head weight.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from distill.losses import divergences as D
from distill.losses.divergences import KernelUnavailable
from distill.losses.lean import HiddenTeacher, linear_distill, supervised_rows, topk_rows
from distill.losses.multiteacher import MultiTeacherObjective, Spec, TeacherSet
from distill.losses.objective import DistillObjective
from distill.losses.teacher_output import TopKTeacher
from distill.multiteacher.weighting import Fixed

B, L, H, HT, V, VS, VT, K = 4, 9, 16, 12, 61, 64, 70, 7  # tokenizer 61; student head 64 rows, teacher 70
CE_W, KD_W = 0.6, 1.3
MIXES = {"mixed": [True, False, True, False], "all_on": [True] * B, "all_off": [False] * B}


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, L, H, generator=g)
    w = torch.randn(VS, H, generator=g) * 0.4
    ht = torch.randn(B, L, HT, generator=g)
    wt = torch.randn(VT, HT, generator=g) * 0.5
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :3] = -100  # prompts of different lengths
    labels[1, :5] = -100
    labels[2, :2] = -100
    labels[3, :4] = -100
    labels[3, -2:] = -100  # padding
    return hs, w, ht, wt, labels


# ------------------------------------------------------------------------------------------------
# The reference, from the definition


def _bucket_logprobs(log_q_full, ids, logprobs, tail):
    """(log q, log p) over the k + 1 buckets: the student's mass on the teacher's k ids and outside
    them, and the teacher's given k probabilities and tail mass (normalised)."""
    log_q_top = log_q_full.gather(-1, ids)
    outside = torch.ones_like(log_q_full, dtype=torch.bool).scatter_(-1, ids, False)
    log_q_tail = torch.logsumexp(log_q_full.masked_fill(~outside, -float("inf")), -1, keepdim=True)
    p = torch.cat([logprobs.double().exp(), tail.double()[:, None]], -1)
    p = p / p.sum(-1, keepdim=True)
    return torch.cat([log_q_top, log_q_tail], -1), p.log()


def _divergence(log_q, log_p, kind, beta):
    q, p = log_q.exp(), log_p.exp()

    def kl(a, log_a, log_b):
        return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)

    if kind == "forward_kl":
        return kl(p, log_p, log_q)
    assert kind == "jsd"
    log_m = ((1 - beta) * q + beta * p).log()
    return beta * kl(p, log_p, log_m) + (1 - beta) * kl(q, log_q, log_m)


def _reference(hs, w, ht, wt, labels, on_seq, teacher, *, kind, beta, T, norm, upstream):
    """(loss, total, ce_sum, kd_sum, dL/dhidden, dL/dW) of the whole batch, fp64."""
    h = hs.double().requires_grad_(True)
    wr = w.double().requires_grad_(True)
    logits = h @ wr[:V].t()  # [B, L, V]: every position, the tokenizer's vocabulary
    nxt = labels[:, 1:]
    sup = nxt != -100  # position t predicts labels[:, t + 1]
    s = logits[:, :-1][sup]
    tgt = nxt[sup]
    on = torch.tensor(on_seq)[:, None].expand(B, L - 1)[sup]
    ce = -torch.log_softmax(s, -1).gather(-1, tgt[:, None]).squeeze(-1)
    log_q = torch.log_softmax(s / T, -1)
    t_logits = (ht @ wt.t())[:, :-1][sup][:, :V].double()
    if teacher == "topk":
        tk = TopKTeacher.from_logits(ht @ wt.t(), K, temperature=T, vocab_size=V)
        ids, lp = tk.ids[:, :-1][sup].long(), tk.logprobs[:, :-1][sup]
        log_q, log_p = _bucket_logprobs(log_q, ids, lp, tk.tail_mass[:, :-1][sup])
    else:
        log_p = torch.log_softmax(t_logits / T, -1)
    kd = _divergence(log_q, log_p, kind, beta)
    ce_sum = ce[~on].sum()
    total = CE_W * ce_sum + KD_W * T * T * kd.sum()
    loss = total / norm
    gh, gw = torch.autograd.grad(loss * upstream, (h, wr))
    return loss.detach(), total.detach(), ce_sum.detach(), kd.sum().detach(), gh, gw


# ------------------------------------------------------------------------------------------------
# The implementation: the objective's lean request, as the loop drives it


def _teacher_rows(teacher, ht, wt, index, T):
    if teacher == "topk":
        return topk_rows(TopKTeacher.from_logits(ht @ wt.t(), K, temperature=T, vocab_size=V), index)
    return HiddenTeacher(ht.reshape(-1, HT)[index], lambda: contextlib.nullcontext((wt, None)))


def _lean(obj, hs, w, ht, wt, labels, on_seq, teacher, norm, *, upstream, pass_mask=True):
    """One micro-batch: (LossOutput, dL/dhidden, dL/dW). ``on_seq``: per sequence, whether the student
    wrote its response (its rows then go to ``ce_rows`` False)."""
    h = hs.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    index, targets = supervised_rows(labels)
    ce_rows = ~torch.tensor(on_seq)[index // labels.shape[1]] if pass_mask else None
    req = obj.lean_request(index, targets, _teacher_rows(teacher, ht, wt, index, obj.temperature), norm,
                           ce_rows=ce_rows)
    loss = req(h, wr, None)
    (loss if upstream == 1.0 else loss * upstream).backward()
    return obj.lean_output(loss, req), h.grad, wr.grad


def _objective(kind, beta, T):
    return DistillObjective(kind=kind, beta=beta, temperature=T, ce_weight=CE_W, kd_weight=KD_W, vocab_size=V,
                            chunk_tokens=5, impl="torch")


def _close(got, want, rtol=2e-5, atol=1e-6):
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


CASES = [("forward_kl", 0.5, 2.0), ("jsd", 0.3, 0.7)]


@pytest.mark.parametrize("teacher", ["hidden", "topk"])
@pytest.mark.parametrize("kind,beta,T", CASES, ids=["fkl-T2", "jsd-T0.7"])
@pytest.mark.parametrize("mix", list(MIXES))
def test_lean_on_policy_rows_equal_definition(mix, kind, beta, T, teacher):
    """Loss, the reported total / ce_sum / kd_sum and both gradients equal the reference, for a mixed,
    an all-on-policy and an all-off-policy batch; every supervised row counts in n_tokens."""
    hs, w, ht, wt, labels = _case()
    on_seq = MIXES[mix]
    norm = 29.0
    obj = _objective(kind, beta, T)
    got, gh, gw = _lean(obj, hs, w, ht, wt, labels, on_seq, teacher, norm, upstream=1.7)
    loss, total, ce_sum, kd_sum, rh, rw = _reference(hs, w, ht, wt, labels, on_seq, teacher, kind=kind, beta=beta,
                                                     T=T, norm=norm, upstream=1.7)
    _close(got.loss, loss)
    _close(got.total, total)
    _close(got.ce_sum, ce_sum, atol=1e-5)
    _close(got.kd_sum, kd_sum, atol=1e-5)
    _close(gh, rh, rtol=1e-4)
    _close(gw, rw, rtol=1e-4)
    assert torch.count_nonzero(gw[V:]) == 0  # the padded head rows
    assert int(got.n_tokens) == int((labels[:, 1:] != -100).sum())
    # what the step logs is what it optimised: total = ce_w * CE(rows with CE) + kd_w T^2 KD(all rows)
    _close(got.total, CE_W * got.ce_sum.double() + obj.kd_scale * got.kd_sum.double())
    if mix == "all_on":
        assert float(got.ce_sum) == 0.0
    else:
        assert float(got.ce_sum) > 1.0  # the off-policy rows' CE is there (the mixed case is not all-on)


@pytest.mark.parametrize("teacher", ["hidden", "topk"])
def test_all_off_policy_is_the_call_without_ce_rows(teacher):
    """ce_rows all True is the call without it, bit for bit (loss, sums, both gradients)."""
    hs, w, ht, wt, labels = _case(seed=3)
    obj = _objective("forward_kl", 0.5, 2.0)
    a = _lean(obj, hs, w, ht, wt, labels, MIXES["all_off"], teacher, 31.0, upstream=1.0)
    b = _lean(obj, hs, w, ht, wt, labels, MIXES["all_off"], teacher, 31.0, upstream=1.0, pass_mask=False)
    for x, y in ((a[0].loss, b[0].loss), (a[0].total, b[0].total), (a[0].ce_sum, b[0].ce_sum),
                 (a[0].kd_sum, b[0].kd_sum), (a[1], b[1]), (a[2], b[2])):
        assert torch.equal(x, y)


@pytest.mark.parametrize("teacher", ["hidden", "topk"])
def test_global_normalisation_over_micro_batches(teacher):
    """Two micro-batches with different on/off mixes (one all on-policy, one half), each divided by
    the step's N (every supervised row of both), add up to the reference's mean over the whole step:
    losses, and the gradients w.r.t. the hidden states and the head."""
    hs, w, ht, wt, labels = _case(seed=5)
    on_seq = [True, True, False, True]
    n_step = float((labels[:, 1:] != -100).sum())
    obj = _objective("forward_kl", 0.5, 2.0)
    outs = [_lean(obj, hs[sl], w, ht[sl], wt, labels[sl], on_seq[sl], teacher, torch.tensor(n_step), upstream=1.0)
            for sl in (slice(0, 2), slice(2, 4))]
    loss, total, ce_sum, kd_sum, rh, rw = _reference(hs, w, ht, wt, labels, on_seq, teacher, kind="forward_kl",
                                                     beta=0.5, T=2.0, norm=n_step, upstream=1.0)
    _close(sum(o[0].loss for o in outs), loss)
    _close(sum(o[0].total for o in outs), total)
    _close(sum(o[0].ce_sum for o in outs), ce_sum, atol=1e-5)
    _close(sum(o[0].kd_sum for o in outs), kd_sum, atol=1e-5)
    _close(torch.cat([o[1] for o in outs]), rh, rtol=1e-4)
    _close(outs[0][2] + outs[1][2], rw, rtol=1e-4)
    # a per-micro-batch mean would differ: the first micro-batch's rows are fewer than half the step's
    assert sum(int(o[0].n_tokens) for o in outs) == int(n_step)


def test_fused_path_cannot_mask_ce_by_row(monkeypatch):
    """impl=triton explicit with ce_rows: one-line error naming why; impl=auto: the torch loop (the
    same result as impl=torch), with one warning saying why."""
    monkeypatch.setattr(D, "_warned", set())
    hs, w, ht, wt, labels = _case(seed=7)
    index, targets = supervised_rows(labels)
    rows = hs.reshape(-1, H)[index]
    ce_rows = torch.arange(index.numel()) % 3 != 0
    kw = dict(temperature=2.0, kd_weight=4.0, vocab_size=V, ce_rows=ce_rows, chunk_tokens=5)
    teacher = _teacher_rows("hidden", ht, wt, index, 2.0)
    with pytest.raises(KernelUnavailable, match=r"impl='triton': distill_kernels.fused_linear_kd cannot run this "
                                                r"call \(CE on a subset of the rows, on-policy") as e:
        linear_distill(rows, w, None, teacher, targets, impl="triton", requested="triton", **kw)
    assert "\n" not in str(e.value)
    with pytest.warns(UserWarning, match="CE on a subset of the rows"):
        auto = linear_distill(rows, w, None, teacher, targets, impl="triton", requested="auto", **kw)
    torch_ = linear_distill(rows, w, None, teacher, targets, impl="torch", **kw)
    for x, y in zip(auto, torch_):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match=r"ce_rows \(torch.int64, \(\d+,\)\) must be a bool mask"):
        linear_distill(rows, w, None, teacher, targets, **{**kw, "ce_rows": ce_rows.long()})


def test_chunk_terms_ce_mask_with_counted_rows():
    """chunk_terms: rows outside ``mask`` stay 0; among the counted ones, those outside ``ce_mask``
    get ce 0 and exactly the KD-only gradient, the others exactly the CE + KD gradient."""
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(6, V, generator=g), torch.randn(6, V, generator=g)
    labels = torch.randint(0, V, (6,), generator=g)
    mask = torch.tensor([True, True, True, True, False, False])
    ce_mask = torch.tensor([True, False, True, False, True, False])
    cfg = D.ChunkConfig(kind="forward_kl", prm=D.KindParams(0.5, 0.1), temperature=2.0, student_softcap=None,
                        teacher_softcap=None, kd_weight=4.0, ce_weight=0.6)
    kd, ce, grad = D.chunk_terms(s, t, labels, mask, cfg, True, ce_mask=ce_mask)
    kd_a, ce_a, grad_a = D.chunk_terms(s, t, labels, mask, cfg, True)
    kd_k, _, grad_k = D.chunk_terms(s, t, labels, mask, cfg._replace(ce_weight=0.0), True)
    both = mask & ce_mask
    assert torch.equal(kd, kd_a)
    assert torch.equal(ce, torch.where(both, ce_a, 0.0)) and bool((ce[both] > 0).all())
    torch.testing.assert_close(grad[~ce_mask], grad_k[~ce_mask], rtol=0, atol=1e-7)
    assert torch.equal(grad[ce_mask], grad_a[ce_mask])
    assert torch.count_nonzero(grad[~mask]) == 0


# ------------------------------------------------------------------------------------------------
# Multi-teacher: 2 teachers at their own temperatures, fixed weights


def _mt_reference(rows, w, t_logits, temps, wts, targets, ce_on, norm, upstream):
    r = rows.double().requires_grad_(True)
    wr = w.double().requires_grad_(True)
    s = r @ wr[:V].t()
    ce = -torch.log_softmax(s, -1).gather(-1, targets[:, None]).squeeze(-1)
    total = CE_W * ce[ce_on].sum()
    for tl, T, wt in zip(t_logits, temps, wts):
        log_p = torch.log_softmax(tl[:, :V].double() / T, -1)
        total = total + wt * KD_W * T * T * _divergence(torch.log_softmax(s / T, -1), log_p, "forward_kl", 0.5).sum()
    gh, gw = torch.autograd.grad(total / norm * upstream, (r, wr))
    return (total / norm).detach(), total.detach(), ce[ce_on].sum().detach(), gh, gw


@pytest.mark.parametrize("mix", ["mixed", "all_on", "all_off"])
def test_multiteacher_ce_rows_equal_definition(mix):
    g = torch.Generator().manual_seed(13)
    n = 23
    rows, w = torch.randn(n, H, generator=g), torch.randn(VS, H, generator=g) * 0.4
    targets = torch.randint(0, V, (n,), generator=g)
    ce_on = {"mixed": torch.arange(n) % 3 != 1, "all_on": torch.zeros(n, dtype=torch.bool),
             "all_off": torch.ones(n, dtype=torch.bool)}[mix]
    teachers, t_logits = [], []
    for _ in range(2):
        th, tw = torch.randn(n, HT, generator=g), torch.randn(VT, HT, generator=g) * 0.6
        teachers.append(HiddenTeacher(th, lambda tw=tw: contextlib.nullcontext((tw, None))))
        t_logits.append(th @ tw.t())
    temps, wts, norm = [2.0, 0.7], [0.3, 0.7], 37.0
    spec = Spec(kind="forward_kl", beta=0.5, alpha=0.1, temperatures=temps, ce_weight=CE_W, kd_weight=KD_W,
                vocab=V, chunk=5)
    obj = MultiTeacherObjective(["a", "b"], spec, Fixed(wts))

    def run(ce_rows):
        h, wr = rows.clone().requires_grad_(True), w.clone().requires_grad_(True)
        index = torch.arange(n)
        req = obj.lean_request(index, targets, TeacherSet(teachers), norm, ce_rows=ce_rows)
        loss = req(h[None], wr, None)
        (loss * 1.7).backward()
        obj.take_sums()
        return obj.lean_output(loss, req), h.grad, wr.grad

    got, gh, gw = run(ce_on)
    loss, total, ce_sum, rh, rw = _mt_reference(rows, w, t_logits, temps, wts, targets, ce_on, norm, 1.7)
    _close(got.loss, loss)
    _close(got.total, total)
    _close(got.ce_sum, ce_sum, atol=1e-5)
    _close(gh, rh, rtol=1e-4)
    _close(gw, rw, rtol=1e-4)
    if mix == "all_off":
        base = run(None)
        for x, y in ((got.loss, base[0].loss), (got.total, base[0].total), (got.ce_sum, base[0].ce_sum),
                     (gh, base[1]), (gw, base[2])):
            assert torch.equal(x, y)


def test_icldist_refuses_on_policy_rows():
    from distill.icldist.loss import ICLDistLoss

    with pytest.raises(ValueError, match="ICLDist trains on its prompt set only: no on-policy rows"):
        ICLDistLoss(vocab_size=V).lean_request(torch.arange(3), torch.zeros(3, dtype=torch.long), None, 3,
                                               ce_rows=torch.ones(3, dtype=torch.bool))
