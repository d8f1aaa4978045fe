"""The lean objective (distill.losses.lean) equals the full-logits objective on the same batch.

The reference is the chunked full-logits ``DistillObjective`` (itself tested against kernels/distill_kernels/ref.py):
logits = hidden @ W.T over every position, loss over the supervised ones. The lean path sees only
the supervised rows and the head; loss, its CE / KD parts and the gradients of the hidden states and
of the head must be the same, for padded heads of different sizes on both sides.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from distill.losses.lean import (
    HiddenTeacher, LeanHead, LossRequest, install_lean_head, linear_distill, supervised_rows, topk_rows,
)
from distill.losses.objective import DistillObjective
from distill.losses.teacher_output import TopKTeacher

B, L, H, V, VS, VT = 3, 11, 16, 61, 64, 70  # tokenizer 61 tokens; student head 64 rows, teacher 70


def _case(seed=0, dtype=torch.float32, bias=False):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, L, H, generator=g).to(dtype)
    w = (torch.randn(VS, H, generator=g) * 0.4).to(dtype)
    b = (torch.randn(VS, generator=g) * 0.1).to(dtype) if bias else None
    ht = torch.randn(B, L, H, generator=g).to(dtype)
    wt = (torch.randn(VT, H, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :4] = -100
    labels[1, :7] = -100
    labels[2, -3:] = -100  # padding at the end
    return hs, w, b, ht, wt, labels


def _full(obj, hs, w, b, teacher, labels, norm, upstream=1.7):
    h = hs.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    br = None if b is None else b.clone().requires_grad_(True)
    out = obj(torch.nn.functional.linear(h, wr, br), teacher, labels, norm)
    (out.loss * upstream).backward()
    return out, h.grad, wr.grad, None if br is None else br.grad


def _lean(obj, hs, w, b, teacher_rows, labels, norm, upstream=1.7):
    h = hs.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    br = None if b is None else b.clone().requires_grad_(True)
    index, targets = supervised_rows(labels)
    req = obj.lean_request(index, targets, teacher_rows(index), norm)
    loss = req(h, wr, br)
    (loss if upstream == 1.0 else loss * upstream).backward()
    return obj.lean_output(loss, req), h.grad, wr.grad, None if br is None else br.grad


@pytest.mark.parametrize("teacher_kind", ["hidden", "logits", "topk", "none"])
@pytest.mark.parametrize("kind,beta,T", [("forward_kl", 0.5, 1.0), ("jsd", 0.3, 2.0), ("reverse_kl", 0.5, 0.7),
                                         ("tvd", 0.5, 1.0)])
def test_lean_equals_full_logits(teacher_kind, kind, beta, T):
    hs, w, b, ht, wt, labels = _case(bias=teacher_kind == "logits")
    t_logits = ht @ wt.t()
    if teacher_kind == "topk":
        full_t = TopKTeacher.from_logits(t_logits, 7, temperature=T, vocab_size=V)

        def rows(index):
            return topk_rows(full_t, index)
    elif teacher_kind == "hidden":
        full_t = t_logits

        def rows(index):
            return HiddenTeacher(ht.reshape(-1, H)[index], lambda: contextlib.nullcontext((wt, None)))
    elif teacher_kind == "logits":
        full_t = t_logits

        def rows(index):
            return t_logits.reshape(-1, VT)[index]
    else:
        full_t = None

        def rows(index):
            return None
    obj = DistillObjective(kind=kind, beta=beta, temperature=T, ce_weight=0.6, kd_weight=1.3, vocab_size=V,
                           chunk_tokens=4)
    ref, gh, gw, gb = _full(obj, hs, w, b, full_t, labels, 23)
    got, lh, lw, lb = _lean(obj, hs, w, b, rows, labels, 23)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.ce_sum, ref.ce_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.kd_sum, ref.kd_sum, rtol=1e-5, atol=1e-5)
    assert int(got.n_tokens) == int(ref.n_tokens)
    torch.testing.assert_close(lh, gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lw, gw, rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(lw[V:]) == 0  # padded student rows: zero gradient
    if b is not None:
        torch.testing.assert_close(lb, gb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm", [23, torch.tensor(23.0), torch.tensor(0.0)])
def test_lean_unit_upstream_gradient_is_normalised_in_the_forward(norm):
    """The step's loss backpropagates an upstream gradient of exactly 1, which skips the backward's
    pass over the [V, H] weight gradient: the normalizer (an int, or the all-reduced tensor; < 1
    counts as 1) must then already be in the gradients formed in the forward."""
    hs, w, b, ht, wt, labels = _case(seed=2, bias=True)
    obj = DistillObjective(kind="jsd", beta=0.3, temperature=2.0, ce_weight=0.6, vocab_size=V, chunk_tokens=4)
    ref, gh, gw, gb = _full(obj, hs, w, b, ht @ wt.t(), labels, norm, upstream=1.0)
    got, lh, lw, lb = _lean(obj, hs, w, b, lambda i: HiddenTeacher(ht.reshape(-1, H)[i],
                                                                    lambda: contextlib.nullcontext((wt, None))),
                            labels, norm, upstream=1.0)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for a, r in ((lh, gh), (lw, gw), (lb, gb)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(lw[V:]) == 0


def test_lean_bf16_close_to_fp32_reference():
    hs, w, _, ht, wt, labels = _case(seed=1, dtype=torch.bfloat16)
    obj = DistillObjective(kind="forward_kl", temperature=1.5, vocab_size=V, chunk_tokens=5)
    teacher32 = hs.new_zeros(0)  # unused
    del teacher32
    ref, gh, gw, _ = _full(obj, hs.float(), w.float(), None, ht.float() @ wt.float().t(), labels, 17)
    got, lh, lw, _ = _lean(obj, hs, w, None, lambda i: HiddenTeacher(ht.reshape(-1, H)[i],
                                                                      lambda: contextlib.nullcontext((wt, None))),
                           labels, 17)
    assert lh.dtype == torch.bfloat16 and lw.dtype == torch.bfloat16
    torch.testing.assert_close(got.loss, ref.loss, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(lw.float(), gw, rtol=5e-2, atol=5e-3)


def test_supervised_rows_are_the_shifted_labels():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 10]])
    index, targets = supervised_rows(labels)
    assert index.tolist() == [1, 2, 5, 6, 7, 8]  # position t predicts token t + 1
    assert targets.tolist() == [5, 6, 7, 8, 9, 10]


def test_no_supervised_rows_gives_zero_loss_and_gradient():
    hs, w, _, ht, wt, labels = _case()
    labels[:] = -100
    obj = DistillObjective(vocab_size=V)
    got, lh, lw, _ = _lean(obj, hs, w, None, lambda i: HiddenTeacher(ht.reshape(-1, H)[i],
                                                                      lambda: contextlib.nullcontext((wt, None))),
                           labels, 1)
    assert float(got.loss) == 0.0 and int(got.n_tokens) == 0
    assert torch.count_nonzero(lh) == 0 and torch.count_nonzero(lw) == 0


def test_teacher_head_opened_once_per_call_even_without_rows():
    """Under ZeRO-3 opening the teacher head is a collective: every rank opens it exactly once."""
    opened = []

    @contextlib.contextmanager
    def head():
        opened.append(1)
        yield torch.randn(VT, H), None

    rows = torch.randn(0, H, requires_grad=True)
    linear_distill(rows, torch.randn(VS, H, requires_grad=True), None, HiddenTeacher(torch.randn(0, H), head),
                   torch.zeros(0, dtype=torch.long), vocab_size=V, chunk_tokens=4)
    linear_distill(torch.randn(9, H, requires_grad=True), torch.randn(VS, H, requires_grad=True), None,
                   HiddenTeacher(torch.randn(9, H), head), torch.randint(0, V, (9,)), vocab_size=V, chunk_tokens=4)
    assert len(opened) == 2


def test_lean_head_is_the_same_linear_until_a_request_is_pending():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(H, VS, bias=False)
    model.get_output_embeddings = lambda: model.lm_head
    weight = model.lm_head.weight
    before = model.lm_head.state_dict()
    head = install_lean_head(model, "test model")
    assert head is model.lm_head and isinstance(head, LeanHead) and head.weight is weight
    assert head.state_dict().keys() == before.keys()
    x = torch.randn(2, 3, H)
    torch.testing.assert_close(head(x), x @ weight.t())  # no request: plain logits
    seen = []
    req = LossRequest(torch.tensor([0, 4]), lambda rows, w, b: (seen.append(rows.shape) or rows.sum(), None, None))
    with head.pending(req):
        out = head(x)
    assert seen == [torch.Size([2, H])] and out.dim() == 0
    torch.testing.assert_close(head(x), x @ weight.t())  # consumed: plain again
    with pytest.raises(RuntimeError, match="did not call its lm_head"):
        with head.pending(LossRequest(torch.tensor([0]), lambda *a: None)):
            pass


def test_lean_head_refuses_a_head_that_is_not_a_linear():
    model = torch.nn.Module()
    model.lm_head = torch.nn.Embedding(4, 4)
    model.get_output_embeddings = lambda: model.lm_head
    with pytest.raises(ValueError, match="kd.path=lean needs an nn.Linear lm_head.*kd.path=logits"):
        install_lean_head(model, "odd model")
