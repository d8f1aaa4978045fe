"""topk_kd: divergence between the student's full-vocabulary logits and a top-k teacher, with
its gradient computed in the same kernel.

Math (definitions and the tail treatment in kernels/distill_kernels/ref.py, ``topk_kd_ref``; one definition):
the teacher is its k ids with log-probs plus its fp32 tail mass (mass outside the k ids), all
given AT THE TEMPERATURE OF USE T, i.e. a distribution over k + 1 outcomes used as given
(renormalised over the k + 1 buckets, the identity for exact values; ``temperature`` does not
touch it). The student is tempered and bucketed the same way: ``q = softmax(x / T)``,
``q_top = q[ids]`` and ``q_tail`` = its exact mass outside the ids. Every kind (forward KL, reverse
KL, JSD, skew KL, skew reverse KL, TVD) is taken over the k + 1 buckets, so a student equal to its
teacher has loss 0 and gradient 0 (TVD: a subgradient) at every T and k. With ``G_b = dL/dq_b`` and
``S = sum_b q_b G_b`` the gradient w.r.t. the logits is ``q_v (G_{bucket(v)} - S) / T``: one
coefficient for every non-top token, k for the ids. Forward KL (and JSD with beta 0) has the
closed form ``(q - p~) / T``, ``p~`` being the teacher on its ids and its tail mass spread over
the other tokens in proportion to q (``p_tail * q_v / q_tail``, formed from logs because
``p_tail / q_tail`` is unbounded).

The student's tail is computed without the ``1 - sum(q_top)`` cancellation: during the scan each
block's exponentials ``e_v = exp2((x_v - m) * log2(e) / T)`` (<= 1) are summed in fp64 and the
top ids that fall in the block are subtracted with bit-identical ``e`` values (same load, same
subtraction, same multiply, same exp2). The terms >= BLOCK_V * 2^-30 are summed apart from the
rest: they lie on a grid of BLOCK_V * 2^-53 and add up to at most BLOCK_V, so that fp64 sum and
the subtraction are exact, and only the small terms are rounded. (A single fp64 sum per block
carries the rounding of the top terms, ~1e-16 of the row's mass, into the tail.) The fp64 work
per element is one conversion, two adds and two selects.
Accuracy, as tests/kernels/test_topk_kd.py::test_topk_tail_gradient_matches_fp64_when_tail_is_tiny
shows it (Triton interpreter, fp32 logits, T in {0.5, 1, 2}, every kind): with a student tail
mass of 1e-6, 1e-12 and 1e-20, every non-top token's gradient matches an fp64 evaluation of the
definition on the same logits to 2e-5 relative (observed <= 7.1e-6). That error is the fp32
``exp2`` of arguments of size ``|x - m| / T`` (~50-100 there), not the tail sum; the single fp64
sum gave up to 2.6e-4 at 1e-12 and 77-280% for forward KL at 1e-16.

Requires distinct ids per row (a teacher's top-k always has them). Ids outside [0, V) are masked
on the device in every load and store they index (memory-safe: a bad id never touches memory
outside its row and is an empty student bucket; that row's values are then not meaningful);
callers validate ids before the launch (distill.losses.teacher_output.TopKTeacher.check), since a
device-side check would need a sync.

Passes per row (one program per row): (1) online max / normaliser / tail over the vocabulary,
then the k + 1 bucket loss and S in registers (k <= 256 lives in one block); (2) the gradient:
every token gets ``q_v * coef_tail`` (forward KL: minus ``p_tail * q_v / q_tail``) and, after a
CTA barrier, the k ids are overwritten with their own values. HBM traffic for bf16
forward+backward: 2 * 2V read + 2V written per row, plus O(k). Skipped pass 2 when no gradient
is needed.

Layout: student ``[..., V]`` unit stride on the vocabulary, any row stride; ids int32/int64
``[..., k]``; log-probs any float dtype ``[..., k]``; tail mass ``[...]`` (or None: derived
in-kernel as ``clamp(1 - sum exp(logprobs), 0, 1)``, as the reference does).

Memory: no [tokens x vocab] fp32 temporary; one gradient buffer in the logits dtype, or none
with ``grad_inplace=True`` (the gradient overwrites the student logits: same aliasing rules and
version-counter bump as kd_div). Host syncs: none.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distill_kernels._common import (
    NEG_BIG, check_common, div_terms, interp_bf16_rounding, launch_config, no_grad_for,
    reduce_rows, resolve_kind, rows_2d, rtne_bf16, stash_grad, take_scaled_grad,
    valid_count_scale,
)

MAX_K = 256


@triton.jit
def _topk_kd_fwd_kernel(
    s_ptr, s_stride, ids_ptr, ids_stride, lp_ptr, lp_stride, tail_ptr,
    g_ptr, g_stride, labels_ptr, loss_ptr, scale_ptr,
    V, K, inv_T, beta, alpha, ignore_index,
    KIND: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_LABELS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    RTNE_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    g_row = g_ptr + row * g_stride
    offs0 = tl.arange(0, BLOCK_V)

    valid = True
    if HAS_LABELS:
        valid = tl.load(labels_ptr + row) != ignore_index

    if valid:
        koffs = tl.arange(0, BLOCK_K)
        kmask = koffs < K
        ids = tl.load(ids_ptr + row * ids_stride + koffs, mask=kmask, other=0).to(tl.int64)
        lp = tl.load(lp_ptr + row * lp_stride + koffs, mask=kmask,
                     other=float("-inf")).to(tl.float32)

        # Teacher over k + 1 buckets, already at the temperature of use (renormalised only).
        if HAS_TAIL:
            tail = tl.load(tail_ptr + row).to(tl.float32)
        else:
            tail = 1.0 - tl.sum(tl.where(kmask, tl.exp(lp), 0.0), axis=0)
        tail = tl.minimum(tl.maximum(tail, 0.0), 1.0)
        ut = tl.where(tail > 0, tl.log(tl.maximum(tail, 1e-38)), float("-inf"))
        mu = tl.maximum(tl.max(lp, axis=0), ut)
        lse_p = mu + tl.log(tl.sum(tl.exp(lp - mu), axis=0) + tl.exp(ut - mu))
        log_p = lp - lse_p
        log_p_tail = ut - lse_p

        # Every access indexed by an id is masked by the vocabulary bound as well as by k: an id
        # outside [0, V) never touches memory outside its row and is an empty student bucket
        # (callers validate ids before the launch; this only keeps a bad one memory-safe).
        idmask = kmask & (ids >= 0) & (ids < V)

        # Student scan: max, normaliser and exact non-top mass (fp64 block sums minus the
        # bit-identical top-id terms). Terms e >= big = BLOCK_V * 2^-30 (e <= 1) are fp32 values
        # on a grid of BLOCK_V * 2^-53 summing to at most BLOCK_V: their fp64 sum, and the
        # subtraction of the top-id terms among them, are exact in any order. Only the smaller
        # terms are rounded, so the top terms' fp64 rounding (~1e-16 of the row) never lands in
        # the tail (header: it was all of a 1e-16 tail, and forward KL's tail gradient with it).
        big = BLOCK_V * 9.313225746154785e-10
        x_top = tl.load(s_row + ids, mask=idmask, other=float("-inf")).to(tl.float32)
        c = inv_T * 1.4426950408889634
        m = tl.full([], NEG_BIG, tl.float32)
        z = tl.zeros([], tl.float32)
        zt = tl.full([], 0.0, tl.float64)
        for start in range(0, V, BLOCK_V):
            offs = start + offs0
            x = tl.load(s_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            r = tl.exp2((m - m_new) * c)
            e = tl.exp2((x - m_new) * c)
            in_blk = idmask & (ids >= start) & (ids < start + BLOCK_V)
            e_top = tl.where(in_blk, tl.exp2((x_top - m_new) * c), 0.0)
            z = z * r + tl.sum(e, axis=0)
            e64 = e.to(tl.float64)
            t64 = e_top.to(tl.float64)
            exact = (tl.sum(tl.where(e >= big, e64, 0.0), axis=0)
                     - tl.sum(tl.where(e_top >= big, t64, 0.0), axis=0))
            rest = (tl.sum(tl.where(e >= big, 0.0, e64), axis=0)
                    - tl.sum(tl.where(e_top >= big, 0.0, t64), axis=0))
            zt = zt * r.to(tl.float64) + (exact + rest)
            m = m_new
        log_z = tl.log(z)
        if K >= V:
            zt = tl.full([], 0.0, tl.float64)
        ratio = tl.maximum(zt / z.to(tl.float64), 0.0).to(tl.float32)
        log_q_tail = tl.where(ratio > 0, tl.log(tl.maximum(ratio, 1e-38)), float("-inf"))
        log_q = tl.where(kmask, (x_top - m) * inv_T - log_z, float("-inf"))
        q_top = tl.exp(log_q)

        if KIND == 0:
            # Forward KL over the k + 1 buckets: G_b = -p_b / q_b, q_b G_b = -p_b, S = -sum_b p_b,
            # so dL/da_v = q_v sum_b p_b - p_v on the ids and q_v sum_b p_b - p_tail q_v / q_tail
            # on the other tokens. p_tail / q_tail is unbounded as q_tail -> 0, so q_v / q_tail is
            # formed in pass 2 as one exp2 against log2 of the fp64 tail sum (it never underflows)
            # instead of as q_v times a huge coefficient; log q_tail of the loss comes from the
            # same fp64 sum.
            p = tl.exp(log_p)
            p_tail = tl.exp(log_p_tail)
            has_tail = zt > 0
            zt_safe = tl.where(has_tail, zt, 1.0)
            log_q_tail64 = (tl.log(zt_safe) - tl.log(z.to(tl.float64))).to(tl.float32)
            log_q_tail = tl.where(has_tail, log_q_tail64, float("-inf"))
            loss = (tl.sum(tl.where(p > 0, p * (log_p - log_q), 0.0), axis=0)
                    + tl.where(p_tail > 0, p_tail * (log_p_tail - log_q_tail), 0.0))
            coef_tail = tl.sum(p, axis=0) + p_tail
            log2_zt = tl.where(has_tail, tl.log2(zt_safe).to(tl.float32), 0.0)
            p_spread = tl.where(has_tail, p_tail, 0.0)
        else:
            term, g, qg = div_terms(log_q, log_p, KIND, beta, alpha)
            term_t, g_t, qg_t = div_terms(log_q_tail, log_p_tail, KIND, beta, alpha)
            loss = tl.sum(tl.where(kmask, term, 0.0), axis=0) + term_t
            s_sum = tl.sum(tl.where(kmask, qg, 0.0), axis=0) + qg_t
            coef_tail = tl.where(ratio > 0, g_t - s_sum, 0.0)
        tl.store(loss_ptr + row, loss)

        if COMPUTE_GRAD:
            gscale = tl.load(scale_ptr) * inv_T
            log2_z = tl.log2(z)
            for start in range(0, V, BLOCK_V):
                offs = start + offs0
                mask = offs < V
                x = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                q = tl.exp2((x - m) * c - log2_z)
                grad = tl.where(q > 0, q * coef_tail, 0.0)
                if KIND == 0:
                    # p_tail * q_v / q_tail (q_v <= q_tail on a non-top token; the clamp only
                    # matters on the ids, which are overwritten below).
                    grad -= p_spread * tl.exp2(tl.minimum((x - m) * c - log2_zt, 0.0))
                grad = grad * gscale
                tl.store(g_row + offs, rtne_bf16(grad, RTNE_BF16).to(g_ptr.dtype.element_ty),
                         mask=mask)
            # The ids were written with the tail coefficient above; overwrite them after every
            # thread's block stores are done.
            tl.debug_barrier()
            if KIND == 0:
                g_top = coef_tail * q_top - p
            else:
                g_top = qg - q_top * s_sum
            g_top = rtne_bf16(g_top * gscale, RTNE_BF16).to(g_ptr.dtype.element_ty)
            tl.store(g_row + ids, g_top, mask=idmask)
    else:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + offs0
                tl.store(g_row + offs, tl.zeros([BLOCK_V], dtype=g_ptr.dtype.element_ty),
                         mask=offs < V)


def topk_kd_fwd(
    student_2d: torch.Tensor,
    ids_2d: torch.Tensor,
    logprobs_2d: torch.Tensor,
    tail_1d: torch.Tensor | None,
    labels_1d: torch.Tensor | None,
    *,
    kind_code: int,
    beta: float,
    alpha: float,
    temperature: float,
    ignore_index: int,
    scale: torch.Tensor,
    grad_out: torch.Tensor | None,
) -> torch.Tensor:
    """Launch on ``[N, V]`` student rows and ``[N, k]`` teacher rows. Writes ``scale``-scaled
    gradients into ``grad_out`` (may alias ``student_2d``); returns fp32 per-row losses."""
    n, vocab = student_2d.shape
    k = ids_2d.shape[1]
    per_row = torch.empty(n, device=student_2d.device, dtype=torch.float32)
    if n == 0:
        return per_row
    block, num_warps = launch_config(vocab)
    g = grad_out if grad_out is not None else student_2d
    _topk_kd_fwd_kernel[(n,)](
        student_2d, student_2d.stride(0), ids_2d, ids_2d.stride(0), logprobs_2d,
        logprobs_2d.stride(0), tail_1d if tail_1d is not None else per_row,
        g, g.stride(0), labels_1d if labels_1d is not None else per_row, per_row, scale,
        vocab, k, 1.0 / temperature, float(beta), float(alpha), int(ignore_index),
        KIND=kind_code, HAS_TAIL=tail_1d is not None, HAS_LABELS=labels_1d is not None,
        COMPUTE_GRAD=grad_out is not None, BLOCK_V=block,
        BLOCK_K=max(16, triton.next_power_of_2(k)), RTNE_BF16=interp_bf16_rounding(g.dtype),
        num_warps=num_warps,
    )
    return per_row


def _prep_topk(student_logits, topk_ids, topk_logprobs, tail_mass, labels):
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"top-k ids {tuple(topk_ids.shape)} / log-probs {tuple(topk_logprobs.shape)} do not "
            f"match student logits {tuple(student_logits.shape)}")
    k = topk_ids.shape[-1]
    vocab = student_logits.shape[-1]
    if not 1 <= k <= min(MAX_K, vocab):
        raise NotImplementedError(f"top-k kernel supports 1 <= k <= min({MAX_K}, vocab={vocab}), "
                                  f"got k={k}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    s2 = rows_2d(student_logits, "student_logits")
    ids2 = topk_ids.reshape(-1, k)
    lp2 = topk_logprobs.reshape(-1, k)
    if ids2.stride(-1) != 1:
        ids2 = ids2.contiguous()
    if lp2.stride(-1) != 1:
        lp2 = lp2.contiguous()
    tail = None
    if tail_mass is not None:
        if tail_mass.numel() != s2.shape[0]:
            raise ValueError(f"tail_mass has {tail_mass.numel()} elements, expected one per "
                             f"position ({s2.shape[0]})")
        tail = tail_mass.reshape(-1).contiguous()
    lab = None
    if labels is not None:
        lab = labels.reshape(-1).contiguous()
        if lab.numel() != s2.shape[0]:
            raise ValueError(f"labels has {lab.numel()} elements, logits have {s2.shape[0]} rows")
    return s2, ids2, lp2, tail, lab


class TopKKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, topk_ids, topk_logprobs, tail_mass, labels, kind, beta,
                alpha, temperature, ignore_index, reduction, grad_inplace):
        kind_code = resolve_kind(kind, beta)
        s2, ids2, lp2, tail, lab = _prep_topk(student_logits, topk_ids, topk_logprobs,
                                              tail_mass, labels)
        n_valid, scale = valid_count_scale(lab, s2.shape[0], ignore_index, reduction, s2.device)
        need_grad = ctx.needs_input_grad[0]
        grad = None
        if need_grad:
            grad = s2 if grad_inplace else torch.empty(s2.shape, dtype=s2.dtype, device=s2.device)
        per_row = topk_kd_fwd(s2, ids2, lp2, tail, lab, kind_code=kind_code, beta=beta,
                              alpha=alpha, temperature=temperature, ignore_index=ignore_index,
                              scale=scale, grad_out=grad)
        if need_grad:
            stash_grad(ctx, grad, student_logits, reduction)
        return reduce_rows(per_row, n_valid, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        return (take_scaled_grad(ctx, grad_output),) + (None,) * 11


def topk_kd(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_mass: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    grad_inplace: bool = False,
) -> torch.Tensor:
    """Divergence ``kind`` between student logits ``[..., V]`` and a top-k teacher
    (``topk_ids``/``topk_logprobs`` ``[..., k]``, k <= 256, ``tail_mass`` ``[...]``).

    Same arguments and result as ``kernels.ref.topk_kd_ref``; differentiable in the student logits
    only (teacher tensors that require grad raise NotImplementedError, as do unsupported kinds).
    ``grad_inplace=True``: the gradient overwrites the student-logits buffer (module docstring).
    """
    check_common(temperature, reduction, alpha)
    no_grad_for("topk_logprobs", topk_logprobs)
    no_grad_for("tail_mass", tail_mass)
    resolve_kind(kind, beta)
    return TopKKDFunction.apply(student_logits, topk_ids, topk_logprobs, tail_mass, labels, kind,
                                float(beta), float(alpha), float(temperature), int(ignore_index),
                                reduction, bool(grad_inplace))
