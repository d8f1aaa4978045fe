"""fused_linear_kd: the student's lm_head folded into the distillation loss, chunked over tokens,
so the full [tokens x vocab] student logits never exist.

Math (reference: kernels/ref.py ``fused_linear_kd_ref``): ``s = hidden @ lm_head.T`` then
``kd_div`` (teacher given as ``(teacher_hidden, teacher_lm_head)``, its logits computed per chunk
too) or ``topk_kd`` (teacher given as an object with ``.ids``, ``.logprobs``, ``.tail_mass``, e.g.
``distill.teacher.output.TopKTeacher``). With ``g = dL/ds`` of a chunk:
``dL/dhidden = g @ lm_head`` and ``dL/dlm_head = sum over chunks of g.T @ hidden``.

Per chunk of ``C`` tokens (forward does everything; backward only scales by the upstream grad):
1. ``logits = hidden_c @ lm_head.T`` in the input dtype (cuBLAS accumulates in fp32);
2. the divergence kernel writes the chunk's loss rows and ``g`` IN PLACE into ``logits``
   (``grad_inplace``: the buffer is private, nothing else reads it);
3. ``grad_hidden_c = g @ lm_head`` into its slice of the hidden gradient;
4. ``grad_lm_head += g.T @ hidden_c`` into an fp32 accumulator (``addmm`` with
   ``out_dtype=float32`` on CUDA: bf16 operands, fp32 accumulate and store, no bf16 rounding
   per chunk).

Memory above inputs and weights: one chunk of student logits (C x V, input dtype; also the
gradient), one chunk of teacher logits for a co-located teacher, the hidden gradient (tokens x H,
input dtype) and the fp32 lm_head-gradient accumulator (V x H x 4 bytes) plus its cast to the
weight dtype at the end of backward (V x H x 2 bytes for bf16; none for fp32 weights). For 8k
tokens, H = 4096, V = 128k in bf16 that is 2 GiB + 1 GiB for the weight gradient alone: the fp32
accumulation is the one [vocab x hidden] cost paid on purpose (bf16 accumulation across chunks
would lose low bits of the lm_head update). Default chunk: ``C`` such that the chunk's logits
buffers take about 256 MiB, rounded to a multiple of 64 tokens, so the GEMMs stay large.

Host syncs: none (the mean's divisor is a device tensor; no ``.item()``). ``reduction="none"``
is not supported (the gradient is formed in the forward, before per-row upstream gradients are
known): it raises NotImplementedError so the loss dispatcher falls back to torch.
"""

from __future__ import annotations

import warnings

import torch

from distill_kernels._common import (
    check_common, no_grad_for, reduce_rows, resolve_kind, valid_count_scale,
)
from distill_kernels.kd_div import kd_div_fwd
from distill_kernels.topk_kd import MAX_K, topk_kd_fwd

CHUNK_BYTES = 256 * 2**20


def default_chunk_tokens(n_tokens: int, vocab: int, elem_bytes: int, full_teacher: bool) -> int:
    per_token = vocab * elem_bytes * (2 if full_teacher else 1)
    c = max(64, (CHUNK_BYTES // max(per_token, 1)) // 64 * 64)
    return max(1, min(n_tokens, c))


_FP32_OUT_GEMM = {"ok": True}


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with fp32 accumulation and no fp32 copies of a or b on CUDA."""
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


class FusedLinearKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, topk_ids,
                topk_logprobs, tail_mass, labels, kind, beta, alpha, temperature, ignore_index,
                reduction, chunk_tokens):
        kind_code = resolve_kind(kind, beta)
        hidden_size = student_hidden.shape[-1]
        vocab = student_lm_head.shape[0]
        h2 = student_hidden.reshape(-1, hidden_size)
        n = h2.shape[0]
        full = teacher_hidden is not None
        if full:
            th2 = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
            if th2.shape[0] != n:
                raise ValueError(f"teacher hidden has {th2.shape[0]} rows, student {n}")
        else:
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

        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need = need_h or need_w
        grad_h = torch.empty_like(h2) if need_h else None
        grad_w = (torch.zeros(student_lm_head.shape, dtype=torch.float32, device=h2.device)
                  if need_w else None)
        per_row = torch.empty(n, dtype=torch.float32, device=h2.device)
        chunk = chunk_tokens or default_chunk_tokens(n, vocab, student_lm_head.element_size(), full)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            hc = h2[c0:c1]
            logits = hc @ student_lm_head.t()
            lab_c = None if lab is None else lab[c0:c1]
            common = dict(kind_code=kind_code, beta=beta, alpha=alpha, temperature=temperature,
                          ignore_index=ignore_index, scale=scale,
                          grad_out=logits if need else None)
            if full:
                t_logits = th2[c0:c1] @ teacher_lm_head.t()
                rows = kd_div_fwd(logits, t_logits, lab_c, **common)
                del t_logits
            else:
                rows = topk_kd_fwd(logits, ids2[c0:c1], lp2[c0:c1],
                                   None if tail1 is None else tail1[c0:c1], lab_c, **common)
            per_row[c0:c1] = rows
            if need_h:
                torch.mm(logits, student_lm_head, out=grad_h[c0:c1])
            if need_w:
                _accumulate_fp32(grad_w, logits.t(), hc)
            del logits
        ctx.grad_h, ctx.grad_w = grad_h, grad_w
        ctx.h_shape = student_hidden.shape
        ctx.w_dtype = student_lm_head.dtype
        return reduce_rows(per_row, n_valid, reduction)

    @staticmethod
    def backward(ctx, grad_output):
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
        return (grad_h, grad_w) + (None,) * 13


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
) -> torch.Tensor:
    """Divergence between ``softmax(student_hidden @ student_lm_head.T / T)`` and ``teacher``
    without materialising the student logits.

    student_hidden ``[..., H]``, student_lm_head ``[V, H]`` (no bias); teacher either
    ``(teacher_hidden [..., Ht], teacher_lm_head [V, Ht])`` or a top-k teacher object
    (``.ids``/``.logprobs`` ``[..., k]``, ``.tail_mass`` ``[...]`` or None) computed at the
    temperature of use ``T`` (``temperature`` tempers the student only; kernels/ref.py). Same
    result as ``kernels.ref.fused_linear_kd_ref``; gradients for the hidden states and the lm_head.
    """
    check_common(temperature, reduction, alpha)
    if reduction == "none":
        raise NotImplementedError("fused_linear_kd forms gradients in the forward; "
                                  "reduction='none' is not supported (use mean or sum)")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    resolve_kind(kind, beta)
    if student_lm_head.dim() != 2 or student_lm_head.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student_lm_head {tuple(student_lm_head.shape)} must be [V, H] with "
                         f"H = student_hidden.shape[-1] = {student_hidden.shape[-1]}")
    if isinstance(teacher, tuple):
        if len(teacher) != 2:
            raise ValueError("teacher tuple must be (teacher_hidden, teacher_lm_head)")
        t_hidden, t_head = teacher
        if t_head.shape[0] != student_lm_head.shape[0]:
            raise ValueError(f"teacher vocab {t_head.shape[0]} != student vocab "
                             f"{student_lm_head.shape[0]}")
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
        if not 1 <= ids.shape[-1] <= min(MAX_K, student_lm_head.shape[0]):
            raise NotImplementedError(f"top-k kernel supports 1 <= k <= {MAX_K}")
        no_grad_for("teacher.logprobs", lps)
        args = (None, None, ids, lps, tail)
    return FusedLinearKDFunction.apply(
        student_hidden, student_lm_head, *args, labels, kind, float(beta), float(alpha),
        float(temperature), int(ignore_index), reduction, chunk_tokens)
