"""fused_linear_kd: the student's lm_head folded into the distillation objective, chunked over
tokens, so the full [tokens x vocab] student (and teacher) logits never exist.

Math (reference: kernels/distill_kernels/ref.py ``fused_linear_kd_ref``): with ``V = vocab_size`` (default: the
student head's row count), ``s = hidden @ lm_head[:V].T`` and, per non-ignored row,

    loss = ce_weight * CE + kd_weight * KD,   CE = -log softmax(s)[label]   (T = 1, untempered)

summed over rows (``reduction="sum"``) or divided by the number of non-ignored rows (``"mean"``).
KD is ``kd_div`` with the teacher given as ``(teacher_hidden, teacher_lm_head)`` (its logits
``teacher_hidden @ teacher_lm_head[:V].T`` computed per chunk too; the teacher head may have more
rows than the student's) or ``topk_kd`` with a top-k teacher (an object with ``.ids``,
``.logprobs``, ``.tail_mass``, e.g. ``distill.losses.teacher_output.TopKTeacher``, ids < V). Defaults
(``ce_weight=0``, ``kd_weight=1``) are the divergence alone. With ``g = dL/ds`` of a chunk:
``dL/dhidden = g @ lm_head[:V]`` and ``dL/dlm_head[:V] = sum over chunks of g.T @ hidden``;
rows ``>= V`` of the lm_head gradient are exactly 0.

Per chunk of ``C`` tokens (forward does everything; backward only scales by the upstream grad),
one head GEMM per model:
1. ``logits = hidden_c @ lm_head[:V].T`` in the input dtype (cuBLAS accumulates in fp32);
2. with ``ce_weight > 0``, in torch and BEFORE the divergence kernel overwrites ``logits``:
   ``LP = log_softmax(logits)`` in fp32 (a chunk-sized fp32 temporary), the CE rows
   ``-LP[label]``, then in place ``LP -> ce_weight * scale * (softmax - onehot)`` (0 on ignored
   rows);
3. the divergence kernel writes the chunk's KD rows and ``kd_weight * scale * g_kd`` IN PLACE into
   ``logits`` (``grad_inplace``: the buffer is private; ``kd_weight`` is folded into the kernel's
   gradient scale, so without CE the gradient is rounded to the input dtype once); with CE the
   two are added in fp32 and rounded once more into ``logits`` (bf16: the KD part is rounded
   twice);
4. ``grad_hidden_c = g @ lm_head[:V]`` into its slice of the hidden gradient;
5. ``grad_lm_head[:V] += g.T @ hidden_c`` into an fp32 accumulator (:func:`accumulate_fp32`:
   ``addmm`` with ``out_dtype=float32`` on CUDA: bf16 operands, fp32 accumulate and store, no
   bf16 rounding per chunk).
With CE, ``kd_weight == 0`` skips the kernel's gradient pass (the KD rows are still computed
when a teacher is given, for ``return_parts``) and ``teacher=None`` (only with ``kd_weight == 0``)
skips the teacher entirely.

Memory above inputs and weights: one chunk of student logits (C x V, input dtype; also the
gradient), one chunk of teacher logits for a co-located teacher, with CE one fp32 C x V chunk
(plus, for 16-bit logits, a transient fp32 upcast inside ``log_softmax``), the hidden gradient
(tokens x H, input dtype) and the fp32 lm_head-gradient accumulator (V_student x H x 4 bytes)
plus its cast to the weight dtype at the end of backward (V x H x 2 bytes for bf16; none for fp32
weights). For 8k tokens, H = 4096, V = 128k in bf16 that is 2 GiB + 1 GiB for the weight gradient
alone: the fp32 accumulation is the one [vocab x hidden] cost paid on purpose (bf16 accumulation
across chunks would lose low bits of the lm_head update). Default chunk: ``C`` such that the
chunk's buffers (logits, teacher logits, CE's fp32 chunk) take about 256 MiB, rounded to a
multiple of 64 tokens, so the GEMMs stay large.

Host syncs: none (the mean's divisor and the gradient scales are device tensors; no ``.item()``;
``return_parts`` gives device scalars). ``reduction="none"`` is not supported (the gradient is
formed in the forward, before per-row upstream gradients are known): it raises
NotImplementedError so the loss dispatcher falls back to torch. Labels and top-k ids are the
caller's contract (CE targets in ``[0, V)`` on non-ignored rows, ids in ``[0, V)``): checking
them on the device would need a sync.
"""

from __future__ import annotations

import math
import warnings

import torch

from distill_kernels._common import (
    check_common, no_grad_for, reduce_rows, resolve_kind, valid_count_scale,
)
from distill_kernels.kd_div import kd_div_fwd
from distill_kernels.topk_kd import MAX_K, topk_kd_fwd

CHUNK_BYTES = 256 * 2**20


def default_chunk_tokens(n_tokens: int, vocab: int, elem_bytes: int, full_teacher: bool,
                         ce: bool = False) -> int:
    per_token = vocab * (elem_bytes * (2 if full_teacher else 1) + (4 if ce else 0))
    c = max(64, (CHUNK_BYTES // max(per_token, 1)) // 64 * 64)
    return max(1, min(n_tokens, c))


_FP32_OUT_GEMM = {"ok": True}


def accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with fp32 accumulation and no fp32 copies of a or b on CUDA.

    ``acc`` is fp32 (may be a contiguous row slice of a larger accumulator); ``a`` and ``b`` in
    one dtype. On CUDA with 16-bit operands: ``torch.addmm(..., out_dtype=torch.float32)`` (torch
    >= 2.8), else (one warning) the product rounded to the operand dtype, then added. On CPU the
    chunk is upcast (chunk-sized fp32 copies; exact products).
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _FP32_OUT_GEMM["ok"]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError) as exc:  # torch without fp32-output GEMMs (< 2.8)
            _FP32_OUT_GEMM["ok"] = False
            warnings.warn(f"fp32-output addmm unavailable ({exc}); each chunk's lm_head "
                          "gradient is rounded to the input dtype before fp32 accumulation",
                          stacklevel=3)
    if a.is_cuda:
        acc.add_(a @ b)
    else:  # CPU (tests): upcast the chunk (chunk-sized fp32 copies; exact products)
        acc.addmm_(a.float(), b.float())


def _ce_chunk(logits: torch.Tensor, lab_c: torch.Tensor, ignore_index: int,
              coef_scale: torch.Tensor | None, need_grad: bool):
    """CE rows of a chunk at T = 1 (fp32, 0 on ignored rows) and, when ``need_grad``, the fp32
    chunk ``coef_scale * (softmax(logits) - onehot(label))`` (0 on ignored rows)."""
    valid = lab_c != ignore_index
    safe = torch.where(valid, lab_c, torch.zeros_like(lab_c)).long().unsqueeze(1)
    lp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # the chunk's fp32 temporary
    rows = torch.where(valid, -lp.gather(1, safe).squeeze(1), torch.zeros((), device=lp.device))
    if not need_grad:
        return rows, None
    coef = (valid.to(torch.float32) * coef_scale).unsqueeze(1)  # [C, 1], on device
    g = lp.exp_().mul_(coef)
    g.scatter_add_(1, safe, -coef)
    return rows, g


class FusedLinearKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, topk_ids,
                topk_logprobs, tail_mass, labels, kind, beta, alpha, temperature, ignore_index,
                reduction, chunk_tokens, ce_weight, kd_weight, vocab_size):
        kind_code = resolve_kind(kind, beta)
        hidden_size = student_hidden.shape[-1]
        vocab = vocab_size
        w = student_lm_head[:vocab]  # a view: the first rows are contiguous
        h2 = student_hidden.reshape(-1, hidden_size)
        n = h2.shape[0]
        full = teacher_hidden is not None
        has_kd = full or topk_ids is not None
        has_ce = ce_weight > 0
        if full:
            th2 = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
            tw = teacher_lm_head[:vocab]
            if th2.shape[0] != n:
                raise ValueError(f"teacher hidden has {th2.shape[0]} rows, student {n}")
        elif has_kd:
            k = topk_ids.shape[-1]
            ids2 = topk_ids.reshape(-1, k).contiguous()
            lp2 = topk_logprobs.reshape(-1, k).contiguous()
            tail1 = None if tail_mass is None else tail_mass.reshape(-1)
            if ids2.shape[0] != n:
                raise ValueError(f"top-k teacher has {ids2.shape[0]} rows, student hidden {n}")
        lab = None if labels is None else labels.reshape(-1)
        if lab is not None and lab.numel() != n:
            raise ValueError(f"labels has {lab.numel()} elements, hidden has {n} rows")
        n_valid, scale = valid_count_scale(lab, n, ignore_index, reduction, h2.device)
        # The weights are folded into the gradient scales (device tensors, no sync): the kernel
        # writes kd_weight * scale * g_kd, the CE chunk is ce_weight * scale * g_ce.
        kd_scale = scale if kd_weight == 1.0 else scale * kd_weight
        ce_scale = scale * ce_weight if has_ce else None

        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need = need_h or need_w
        # The kernel's gradient pass runs unless CE alone carries the gradient.
        kd_grad = need and has_kd and not (has_ce and kd_weight == 0.0)
        grad_h = torch.empty_like(h2) if need_h else None
        grad_w = (torch.zeros(student_lm_head.shape, dtype=torch.float32, device=h2.device)
                  if need_w else None)
        grad_w_v = None if grad_w is None else grad_w[:vocab]
        kd_rows = torch.zeros(n, dtype=torch.float32, device=h2.device)
        ce_rows = torch.zeros(n, dtype=torch.float32, device=h2.device) if has_ce else None
        chunk = chunk_tokens or default_chunk_tokens(n, vocab, student_lm_head.element_size(),
                                                     full, has_ce)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            hc = h2[c0:c1]
            logits = hc @ w.t()
            lab_c = None if lab is None else lab[c0:c1]
            g_ce = None
            if has_ce:  # before the kernel overwrites the logits with the KD gradient
                ce_rows[c0:c1], g_ce = _ce_chunk(logits, lab_c, ignore_index, ce_scale, need)
            if has_kd:
                common = dict(kind_code=kind_code, beta=beta, alpha=alpha,
                              temperature=temperature, ignore_index=ignore_index, scale=kd_scale,
                              grad_out=logits if kd_grad else None)
                if full:
                    t_logits = th2[c0:c1] @ tw.t()
                    kd_rows[c0:c1] = kd_div_fwd(logits, t_logits, lab_c, **common)
                    del t_logits
                else:
                    kd_rows[c0:c1] = topk_kd_fwd(
                        logits, ids2[c0:c1], lp2[c0:c1], None if tail1 is None else tail1[c0:c1],
                        lab_c, **common)
            if g_ce is not None:
                if kd_grad:
                    g_ce.add_(logits)  # fp32 += kd_weight * scale * g_kd (input dtype)
                logits.copy_(g_ce)  # g = kd_weight * g_kd + ce_weight * g_ce, times scale
                del g_ce
            if need_h:
                torch.mm(logits, w, out=grad_h[c0:c1])
            if need_w:
                accumulate_fp32(grad_w_v, logits.t(), hc)
            del logits
        ctx.grad_h, ctx.grad_w = grad_h, grad_w
        ctx.h_shape = student_hidden.shape
        ctx.w_dtype = student_lm_head.dtype
        kd_sum = kd_rows.sum()
        ce_sum = ce_rows.sum() if has_ce else torch.zeros((), dtype=torch.float32,
                                                          device=h2.device)
        per_row = kd_rows if kd_weight == 1.0 else kd_rows * kd_weight
        if has_ce:
            per_row = per_row + ce_weight * ce_rows
        loss = reduce_rows(per_row, n_valid, reduction)
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return loss, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_output, _grad_kd_sum, _grad_ce_sum):
        grad_h, grad_w = ctx.grad_h, ctx.grad_w
        if getattr(ctx, "consumed", False):
            raise RuntimeError("fused_linear_kd: the gradient formed in the forward was consumed by "
                               "a first backward; backward twice (retain_graph) is not supported")
        ctx.consumed = True
        ctx.grad_h = ctx.grad_w = None
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_output).view(ctx.h_shape)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_output)
            if grad_w.dtype != ctx.w_dtype:
                grad_w = grad_w.to(ctx.w_dtype)
        return (grad_h, grad_w) + (None,) * 16


def _check_weight(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name}={value} must be finite and >= 0")
    return value


def fused_linear_kd(
    student_hidden: torch.Tensor,
    student_lm_head: torch.Tensor,
    teacher,
    labels: torch.Tensor | None = None,
    *,
    kind: str = "jsd",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_tokens: int | None = None,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    vocab_size: int | None = None,
    return_parts: bool = False,
):
    """``ce_weight * CE + kd_weight * KD`` of ``s = student_hidden @ student_lm_head[:V].T``
    without materialising the student (or teacher) logits; ``V = vocab_size`` or the student
    head's row count.

    student_hidden ``[..., H]``, student_lm_head ``[Vs, H]`` (no bias, ``Vs >= V``); teacher
    either ``(teacher_hidden [..., Ht], teacher_lm_head [Vt, Ht])`` (``Vt == Vs`` without
    ``vocab_size``, ``Vt >= V`` with it), a top-k teacher object (``.ids``/``.logprobs``
    ``[..., k]`` with ids in ``[0, V)``, ``.tail_mass`` ``[...]`` or None) computed at the
    temperature of use ``T`` (``temperature`` tempers the student only; kernels/distill_kernels/ref.py), or None
    when ``kd_weight == 0`` and ``ce_weight > 0`` (CE only). KD is the divergence at ``T`` (no
    ``T^2``: pass it in ``kd_weight``); CE is the student's token cross-entropy at T = 1 on
    ``labels`` (required when ``ce_weight > 0``; targets in ``[0, V)`` on non-ignored rows).
    ``labels`` also masks rows (``ignore_index``); ``"mean"`` divides by the non-ignored rows.

    Returns the fp32 loss, or with ``return_parts`` ``(loss, kd_sum, ce_sum)``: detached fp32
    device scalars, the sums over non-ignored rows before weights and reduction (0 for a term
    not computed: CE when ``ce_weight == 0``, KD when ``teacher is None``). Same result as
    ``kernels.ref.fused_linear_kd_ref``; gradients for the hidden states and the lm_head (full
    ``[Vs, H]`` shape, rows ``>= V`` exactly 0).
    """
    check_common(temperature, reduction, alpha)
    if reduction == "none":
        raise NotImplementedError("fused_linear_kd forms gradients in the forward; "
                                  "reduction='none' is not supported (use mean or sum)")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    resolve_kind(kind, beta)
    ce_weight = _check_weight("ce_weight", ce_weight)
    kd_weight = _check_weight("kd_weight", kd_weight)
    if ce_weight > 0 and labels is None:
        raise ValueError(f"ce_weight={ce_weight} > 0 needs labels (the CE targets)")
    if student_lm_head.dim() != 2 or student_lm_head.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student_lm_head {tuple(student_lm_head.shape)} must be [V, H] with "
                         f"H = student_hidden.shape[-1] = {student_hidden.shape[-1]}")
    v_student = student_lm_head.shape[0]
    if vocab_size is None:
        vocab = v_student
    else:
        vocab = int(vocab_size)
        if not 1 <= vocab <= v_student:
            raise ValueError(f"vocab_size={vocab} must be in [1, {v_student}] (the student "
                             f"lm_head's rows)")
    if teacher is None:
        if kd_weight != 0.0 or ce_weight == 0.0:
            raise ValueError(f"teacher=None needs kd_weight=0 and ce_weight>0 (got kd_weight="
                             f"{kd_weight}, ce_weight={ce_weight})")
        args = (None, None, None, None, None)
    elif isinstance(teacher, tuple):
        if len(teacher) != 2:
            raise ValueError("teacher tuple must be (teacher_hidden, teacher_lm_head)")
        t_hidden, t_head = teacher
        if vocab_size is None and t_head.shape[0] != v_student:
            raise ValueError(f"teacher vocab {t_head.shape[0]} != student vocab {v_student} "
                             f"(pass vocab_size to use the first rows of both)")
        if t_head.shape[0] < vocab:
            raise ValueError(f"teacher lm_head has {t_head.shape[0]} rows < vocab_size={vocab}")
        if t_hidden.shape[:-1] != student_hidden.shape[:-1]:
            raise ValueError(f"teacher hidden {tuple(t_hidden.shape)} and student hidden "
                             f"{tuple(student_hidden.shape)} differ in leading shape")
        no_grad_for("teacher_hidden", t_hidden)
        no_grad_for("teacher_lm_head", t_head)
        args = (t_hidden, t_head, None, None, None)
    else:
        for attr in ("ids", "logprobs", "tail_mass"):
            if not hasattr(teacher, attr):
                raise TypeError(f"teacher must be a (hidden, lm_head) tuple or have .ids, "
                                f".logprobs and .tail_mass; missing .{attr}")
        ids, lps, tail = teacher.ids, teacher.logprobs, teacher.tail_mass
        if ids.shape != lps.shape or ids.shape[:-1] != student_hidden.shape[:-1]:
            raise ValueError(f"top-k ids {tuple(ids.shape)} / log-probs {tuple(lps.shape)} do "
                             f"not match student hidden {tuple(student_hidden.shape)}")
        if not 1 <= ids.shape[-1] <= min(MAX_K, vocab):
            raise NotImplementedError(f"top-k kernel supports 1 <= k <= min({MAX_K}, "
                                      f"vocab={vocab}), got k={ids.shape[-1]}")
        no_grad_for("teacher.logprobs", lps)
        args = (None, None, ids, lps, tail)
    loss, kd_sum, ce_sum = FusedLinearKDFunction.apply(
        student_hidden, student_lm_head, *args, labels, kind, float(beta), float(alpha),
        float(temperature), int(ignore_index), reduction, chunk_tokens, ce_weight, kd_weight,
        vocab)
    if return_parts:
        return loss, kd_sum, ce_sum
    return loss
