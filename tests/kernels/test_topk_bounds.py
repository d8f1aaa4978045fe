"""Top-k ids outside [0, V) are masked in the kernel: no load or store leaves the id's row.

Callers validate ids before a launch (distill.losses.teacher_output.TopKTeacher.check); the kernel's own
masking only keeps a bad id memory-safe. A masked id is an empty student bucket; the values of a
row holding one are not meaningful, so these tests assert memory, not values, for such rows: the
rows around the student stay bit-identical, and rows whose ids are all valid match the reference.
"""

from __future__ import annotations

import pytest
import torch

from distill_kernels.ref import assert_close_to_ref, topk_kd_ref, topk_of_logits_ref

from .conftest import randn

pytestmark = [pytest.mark.triton_interp,
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

V, K, T = 67, 6, 2.0
# A finite value no student logit comes near: a load of it through an unmasked id would make that
# row's loss or gradient inf/NaN (x_top = 3e38 / T overflows the softmax), so reads show up too.
POISON = 3.0e38


def _poisoned(rows: int, vocab: int) -> torch.Tensor:
    """[rows, vocab] fp32 filled with a known pattern: POISON, and a row tag every 7th column."""
    buf = torch.full((rows, vocab), POISON)
    buf[:, ::7] = torch.arange(rows, dtype=torch.float32)[:, None] + 0.25
    return buf


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().view(torch.int32)


def _teacher_with_bad_ids():
    """3 rows. Unmasked, row 0's -3 and 2V - 1 would land in the end of the row before it and in
    row 1; row 2's V + 5 in the start of the row after it (inside the last, ragged vocab block)
    and its -5 in row 1's end (the interpreter runs rows in order, so after row 1 has written
    its gradient). Row 1 is all valid."""
    t = randn((3, V), seed=1)
    ids, lps, tail = topk_of_logits_ref(t, K, temperature=T)
    ids = ids.to(torch.int32)
    ids[0, 1] = -3
    ids[0, 4] = 2 * V - 1
    ids[2, 2] = V + 5
    ids[2, 0] = -5
    return ids, lps, tail


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 0.5), ("forward_kl", 0.5)])
@pytest.mark.parametrize("grad_inplace", [True, False], ids=["inplace", "private"])
def test_topk_kd_out_of_range_ids_stay_in_their_row(tiny_blocks, kind, beta, grad_inplace):
    from distill_kernels.topk_kd import topk_kd

    s = randn((3, V))
    ids, lps, tail = _teacher_with_bad_ids()
    buf = _poisoned(5, V)
    buf[1:4] = s
    guard = _bits(buf[[0, 4]])
    ids_before, lps_before, tail_before = ids.clone(), lps.clone(), tail.clone()

    student = buf[1:4].requires_grad_(True)  # a view: its neighbours are rows 0 and 4 of buf
    kw = dict(kind=kind, beta=beta, temperature=T, reduction="none")
    out = topk_kd(student, ids, lps, tail, **kw, grad_inplace=grad_inplace)
    out.sum().backward()

    assert torch.equal(_bits(buf[[0, 4]]), guard), "a top-k access left the student's rows"
    assert torch.equal(ids, ids_before) and torch.equal(lps, lps_before)
    assert torch.equal(tail, tail_before)
    if grad_inplace:
        assert torch.equal(buf[1:4], student.grad)  # the buffer holds the gradient
    else:
        assert torch.equal(buf[1:4], s)  # the logits are untouched

    ref_s = s[1:2].clone().requires_grad_(True)
    ref = topk_kd_ref(ref_s, ids[1:2], lps[1:2], tail[1:2], **kw)
    ref.sum().backward()
    assert_close_to_ref(out.detach()[1:2], ref.detach(), ref.detach(),
                        name=f"{kind} valid row loss")
    assert_close_to_ref(student.grad[1:2], ref_s.grad, ref_s.grad, name=f"{kind} valid row grad")
    if kind != "forward_kl":
        # An empty bucket keeps these rows finite (forward KL's p log(p / 0) is inf by definition);
        # a read of the poison would not.
        assert bool(torch.isfinite(out.detach()).all())
        assert bool(torch.isfinite(student.grad).all())


def test_topk_kd_fwd_out_of_range_ids_never_store_outside_grad_rows(tiny_blocks):
    """The launcher with a gradient buffer that is itself a view into a poisoned buffer: what
    grad_inplace=False allocates privately (torch.empty), made observable."""
    from distill_kernels._common import resolve_kind
    from distill_kernels.topk_kd import topk_kd_fwd

    s = randn((3, V))
    ids, lps, tail = _teacher_with_bad_ids()
    gbuf = _poisoned(5, V)
    guard = _bits(gbuf[[0, 4]])
    for kind in ("forward_kl", "reverse_kl", "tvd"):
        topk_kd_fwd(s, ids, lps, tail, None, kind_code=resolve_kind(kind, 0.5), beta=0.5,
                    alpha=0.1, temperature=T, ignore_index=-100, scale=torch.ones(1),
                    grad_out=gbuf[1:4])
        assert torch.equal(_bits(gbuf[[0, 4]]), guard), f"{kind}: a store left the gradient rows"


class _TopK:
    def __init__(self, ids, logprobs, tail_mass):
        self.ids, self.logprobs, self.tail_mass = ids, logprobs, tail_mass


def test_fused_linear_kd_out_of_range_ids_raise_nothing_and_touch_no_input(tiny_blocks):
    """fused_linear_kd launches the same kernel on a private logits chunk: a bad id raises
    nothing, leaves every input as it was, and the hidden gradient of rows with valid ids (which
    depends on that row's logits chunk row only) matches the reference."""
    from distill_kernels.fused_linear_kd import fused_linear_kd
    from distill_kernels.ref import fused_linear_kd_ref

    hidden = 8
    h = randn((3, hidden), scale=1.0, seed=4)
    w = randn((V, hidden), scale=1.0, seed=5) / hidden**0.25
    ids, lps, tail = _teacher_with_bad_ids()
    before = [x.clone() for x in (h, w, ids, lps, tail)]
    kw = dict(kind="reverse_kl", temperature=T, reduction="sum")
    hk, wk = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    fused_linear_kd(hk, wk, _TopK(ids, lps, tail), chunk_tokens=3, **kw).backward()
    for x, x0 in zip((hk.detach(), wk.detach(), ids, lps, tail), before):
        assert torch.equal(x, x0)
    assert bool(torch.isfinite(hk.grad).all()) and bool(torch.isfinite(wk.grad).all())

    hr = h[1:2].clone().requires_grad_(True)
    fused_linear_kd_ref(hr, w, _TopK(ids[1:2], lps[1:2], tail[1:2]), **kw).backward()
    assert_close_to_ref(hk.grad[1:2], hr.grad, hr.grad, name="valid row d hidden")
