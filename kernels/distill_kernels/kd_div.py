"""kd_div: divergence between student and teacher logits over the full vocabulary, with its
gradient computed in the same kernel.

Math (definitions in kernels/distill_kernels/ref.py, ``kd_div_ref``): per row, ``a = x_student / T``,
``b = x_teacher / T``, ``q = softmax(a)``, ``p = softmax(b)``; the loss is forward KL ``KL(p||q)``,
reverse KL ``KL(q||p)``, generalized JSD(beta) (TRL convention; beta 0 / 1 are forward / reverse
KL), skew KL, skew reverse KL or TVD. No T^2 factor (the objective applies it). The gradient
w.r.t. the student logits is ``q * (G - S) / T`` (see _common.py); the kernel writes it, already
multiplied by the reduction's scale (1 / number of non-ignored rows for "mean", computed on the
device), in the logits dtype. Backward only multiplies it by the upstream gradient.

Passes over the vocabulary per row (one program per row, online softmax, fp32 accumulation):
* forward KL, reverse KL: 2 -- (1) both log-partitions and the loss together, with the
  running sum rescaled as the maximum grows; (2) the gradient (closed form).
* JSD, skew KL, skew reverse KL, TVD: 3 -- (1) both log-partitions; (2) the loss and
  ``S = sum q * dL/dq``, which need the final normalisers through ``log m``; (3) the gradient.
When no gradient is needed (inference, or the student does not require grad) the last pass is
skipped. HBM traffic per row for bf16 and forward+backward: 2 passes -> 2 * 2V reads of each
operand + 2V written; 3 passes -> 3 * 2V reads of each operand + 2V written. Later passes
re-read a row the same program read microseconds before, which often hits L2.

Layout: inputs ``[..., V]`` with unit stride on the vocabulary; any row stride (a slice
``logits[..., :V]`` is used in place). Teacher and student may differ in dtype (bf16 / fp16 /
fp32); math in fp32.

Memory: no [tokens x vocab] fp32 temporary. One gradient buffer in the student-logits dtype
([tokens x vocab], the size of the logits), or none with ``grad_inplace=True``: the gradient then
OVERWRITES the student-logits buffer during the forward (aliasing: after the call the tensor
passed as ``student_logits`` holds the gradient, not the logits; its autograd version counter is
bumped, so any other op that saved those logits for its backward, e.g. a cross-entropy on the
same logits, fails loudly instead of computing with garbage). Use it only when nothing else reads
the logits afterwards (fused_linear_kd's private chunk buffers).

Host syncs: none. The number of non-ignored rows is a device tensor; the kernel reads the scale.
The teacher is a constant: a teacher tensor that requires grad raises NotImplementedError (the
loss dispatcher then falls back to torch), as do kinds without a kernel.
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



@triton.jit
def _kd_div_fwd_kernel(
    s_ptr, s_stride, t_ptr, t_stride, g_ptr, g_stride, labels_ptr, loss_ptr, scale_ptr,
    V, inv_T, beta, alpha, ignore_index,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride
    offs0 = tl.arange(0, BLOCK_V)

    valid = True
    if HAS_LABELS:
        valid = tl.load(labels_ptr + row) != ignore_index

    if valid:
        # Pass 1: online log-partitions of a and b (and, for forward / reverse KL, the loss:
        # sum_v p_v (b_v - a_v) and sum_v q_v (a_v - b_v) with the same running rescale).
        m_a = tl.full([], NEG_BIG, tl.float32)
        m_b = tl.full([], NEG_BIG, tl.float32)
        # Sums are kept per lane and reduced once after the loop: one CTA-wide reduction per
        # block (the maxima) instead of five.
        z_a = tl.zeros([BLOCK_V], tl.float32)
        z_b = tl.zeros([BLOCK_V], tl.float32)
        acc = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + offs0
            mask = offs < V
            a = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_T
            b = tl.load(t_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_T
            m_a_new = tl.maximum(m_a, tl.max(a, axis=0))
            m_b_new = tl.maximum(m_b, tl.max(b, axis=0))
            r_a = tl.exp(m_a - m_a_new)
            r_b = tl.exp(m_b - m_b_new)
            e_a = tl.exp(a - m_a_new)
            e_b = tl.exp(b - m_b_new)
            z_a = z_a * r_a + e_a
            z_b = z_b * r_b + e_b
            if KIND == 0:
                acc = acc * r_b + tl.where(e_b > 0, e_b * (b - a), 0.0)
            elif KIND == 1:
                acc = acc * r_a + tl.where(e_a > 0, e_a * (a - b), 0.0)
            m_a = m_a_new
            m_b = m_b_new
        z_a_sum = tl.sum(z_a, axis=0)
        z_b_sum = tl.sum(z_b, axis=0)
        lse_a = m_a + tl.log(z_a_sum)
        lse_b = m_b + tl.log(z_b_sum)

        s_sum = tl.zeros([], tl.float32)
        if KIND == 0:
            loss = tl.sum(acc, axis=0) / z_b_sum + lse_a - lse_b
        elif KIND == 1:
            loss = tl.sum(acc, axis=0) / z_a_sum + lse_b - lse_a
        else:
            # Pass 2: loss and S = sum_v q_v G_v (both need log m, hence the final normalisers).
            loss_v = tl.zeros([BLOCK_V], tl.float32)
            s_v = tl.zeros([BLOCK_V], tl.float32)
            for start in range(0, V, BLOCK_V):
                offs = start + offs0
                mask = offs < V
                a = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_T
                b = tl.load(t_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_T
                term, g, qg = div_terms(a - lse_a, b - lse_b, KIND, beta, alpha)
                loss_v += tl.where(mask, term, 0.0)
                s_v += tl.where(mask, qg, 0.0)
            loss = tl.sum(loss_v, axis=0)
            s_sum = tl.sum(s_v, axis=0)
        tl.store(loss_ptr + row, loss)

        if COMPUTE_GRAD:
            # Last pass: d loss / d x = scale / T * q * (G - S), stored in the logits dtype.
            gscale = tl.load(scale_ptr) * inv_T
            for start in range(0, V, BLOCK_V):
                offs = start + offs0
                mask = offs < V
                a = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_T
                b = tl.load(t_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_T
                log_q = a - lse_a
                q = tl.exp(log_q)
                if KIND == 0:
                    grad = q - tl.exp(b - lse_b)
                elif KIND == 1:
                    log_p = b - lse_b
                    grad = tl.where(q > 0, q * (log_q - log_p - loss), 0.0)
                else:
                    term, g, qg = div_terms(log_q, b - lse_b, KIND, beta, alpha)
                    grad = qg - q * s_sum
                out = rtne_bf16(grad * gscale, RTNE_BF16).to(g_ptr.dtype.element_ty)
                tl.store(g_row + offs, out, mask=mask)
    else:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + offs0
                tl.store(g_row + offs, tl.zeros([BLOCK_V], dtype=g_ptr.dtype.element_ty),
                         mask=offs < V)


def kd_div_fwd(
    student_2d: torch.Tensor,
    teacher_2d: torch.Tensor,
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
    """Launch on ``[N, V]`` rows. Writes ``scale``-scaled gradients into ``grad_out`` (may alias
    ``student_2d``) when given; returns fp32 per-row losses (0 on ignored rows)."""
    n, vocab = student_2d.shape
    per_row = torch.empty(n, device=student_2d.device, dtype=torch.float32)
    if n == 0:
        return per_row
    block, num_warps = launch_config(vocab)
    g = grad_out if grad_out is not None else student_2d  # dummy pointer when no gradient
    lab = labels_1d if labels_1d is not None else per_row
    _kd_div_fwd_kernel[(n,)](
        student_2d, student_2d.stride(0), teacher_2d, teacher_2d.stride(0), g, g.stride(0),
        lab, per_row, scale,
        vocab, 1.0 / temperature, float(beta), float(alpha), int(ignore_index),
        KIND=kind_code, HAS_LABELS=labels_1d is not None, COMPUTE_GRAD=grad_out is not None,
        BLOCK_V=block, RTNE_BF16=interp_bf16_rounding(g.dtype), num_warps=num_warps,
    )
    return per_row


class KDDivFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, kind, beta, alpha, temperature,
                ignore_index, reduction, grad_inplace):
        kind_code = resolve_kind(kind, beta)
        s2 = rows_2d(student_logits, "student_logits")
        t2 = rows_2d(teacher_logits, "teacher_logits")
        lab = None if labels is None else labels.reshape(-1)
        if lab is not None and lab.numel() != s2.shape[0]:
            raise ValueError(f"labels has {lab.numel()} elements, logits have {s2.shape[0]} rows")
        n_valid, scale = valid_count_scale(lab, s2.shape[0], ignore_index, reduction,
                                           s2.device)
        need_grad = ctx.needs_input_grad[0]
        grad = None
        if need_grad:
            if grad_inplace:
                grad = s2
            else:
                grad = torch.empty(s2.shape, dtype=s2.dtype, device=s2.device)
        per_row = kd_div_fwd(s2, t2, lab, kind_code=kind_code, beta=beta, alpha=alpha,
                             temperature=temperature, ignore_index=ignore_index, scale=scale,
                             grad_out=grad)
        if need_grad:
            stash_grad(ctx, grad, student_logits, reduction)
        return reduce_rows(per_row, n_valid, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        return (take_scaled_grad(ctx, grad_output),) + (None,) * 9


def kd_div(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    kind: str = "jsd",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    grad_inplace: bool = False,
) -> torch.Tensor:
    """Divergence ``kind`` between student and teacher logits ``[..., V]`` (same shape).

    Same arguments and result as ``kernels.ref.kd_div_ref``; differentiable in the student
    logits only. ``grad_inplace=True`` writes the gradient into the student-logits buffer during
    the forward (the tensor is destroyed; see the module docstring). Unsupported kinds or a
    teacher that requires grad raise NotImplementedError.
    """
    check_common(temperature, reduction, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    no_grad_for("teacher_logits", teacher_logits)
    resolve_kind(kind, beta)
    return KDDivFunction.apply(student_logits, teacher_logits, labels, kind, float(beta),
                               float(alpha), float(temperature), int(ignore_index), reduction,
                               bool(grad_inplace))
