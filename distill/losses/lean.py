"""The lean KD step: the student's final hidden states at the supervised positions in, loss out.

Nothing of size [tokens x V] exists on this path, for the student or the teacher:

1. The supervised rows are chosen first, on the host, from the batch's CPU labels
   (:func:`supervised_rows`: the flat positions whose shifted label is not ``ignore_index``, and
   their targets). Prompt and padding positions never reach a vocabulary-sized computation.
2. The student body runs as usual; its lm_head (:class:`LeanHead`, the model's own ``nn.Linear``
   with the same parameters and state-dict keys) receives the final hidden states ``[B, L, H]``
   and, while a :class:`LossRequest` is pending, returns the micro-batch's loss instead of logits:
   it picks the supervised rows ``[N, H]`` and runs :func:`linear_distill` over them, a chunk of
   rows at a time: ``logits_c = rows_c @ W[:vocab].T`` (input dtype), then CE + KD and the
   gradient of the chunk in one pass (the same per-chunk math as the full-logits objective,
   :func:`distill.losses.divergences.chunk_terms`), then ``dL/drows_c = g @ W`` and
   ``dL/dW += g.T @ rows_c`` (fp32 accumulator). The gradients are formed in the forward; the
   backward only scales them by the upstream gradient.
3. The teacher is given at the same rows: a :class:`~distill.losses.teacher_output.TopKTeacher`
   ``[N, k]``, or a :class:`HiddenTeacher` (its final hidden states ``[N, Ht]`` and a context
   manager that yields its head), whose logits are computed inside the same chunk loop.

ZeRO-3: the loss runs inside the head module's own forward, so DeepSpeed's module hooks gather the
partitioned (possibly tied) lm_head before it and release it after; in backward the same hooks
gather it again, the returned [V, H] gradient reaches the partitioned parameter and ZeRO
reduce-scatters it as for any layer. No full copy of the weight is kept beyond the op.

CUDA with ``impl`` triton: the chunk loop is :func:`distill_kernels.fused_linear_kd.fused_linear_kd`
(Triton divergence kernels, CE in the same pass); elsewhere the torch loop below. Both equal the
full-logits objective on the same rows (tests/losses/test_lean.py, tests/trainer/test_lean_path.py).

Host syncs: the row selection is computed from CPU labels (no device sync); none in the loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from distill.losses.divergences import (
    ChunkConfig,
    KindParams,
    check_teacher,
    chunk_terms,
    default_chunk_tokens,
    effective_kind,
    kernel_fallback,
)
from distill.losses.teacher_output import TopKTeacher


def supervised_rows(labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [N] long, targets [N] long)``: flat positions ``b * L + t`` of ``labels [B, L]`` whose
    next token is supervised (``labels[b, t + 1] != ignore_index``) and those next tokens. Call it on
    the CPU labels (no device sync), then move both to the device."""
    nxt = torch.full_like(labels, ignore_index)
    nxt[:, :-1] = labels[:, 1:]
    flat = nxt.reshape(-1)
    index = (flat != ignore_index).nonzero().squeeze(1)
    return index, flat[index]


@dataclass
class HiddenTeacher:
    """A full-distribution teacher at the supervised rows: its final hidden states ``[N, Ht]`` and
    ``head()``, a context manager yielding ``(weight [Vt, Ht], bias or None)`` for the duration of
    the loss (under ZeRO-3: gathered by ``GatheredParameters`` and released on exit). ``scale``
    and ``softcap`` reproduce the model's own logit transform (``logits * scale``, then
    ``cap * tanh(x / cap)``)."""

    hidden: torch.Tensor
    head: Callable[[], Any]
    scale: float = 1.0
    softcap: float | None = None


def topk_rows(t: TopKTeacher, index: torch.Tensor) -> TopKTeacher:
    """The rows ``index`` of a top-k teacher ``[B, L, k]`` (flattened positions) as ``[N, k]``."""
    k = t.k
    return TopKTeacher(ids=t.ids.reshape(-1, k).index_select(0, index),
                       logprobs=t.logprobs.reshape(-1, k).index_select(0, index),
                       tail_mass=None if t.tail_mass is None else t.tail_mass.reshape(-1).index_select(0, index),
                       temperature=t.temperature)


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, first: bool = False) -> None:
    """Accumulate a head gradient in fp32: acc += a @ b; ``first``: acc = a @ b (its old contents, e.g. ``torch.empty``, unread)."""
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        a, b = a.float(), b.float()
    if first:
        torch.mm(a, b, out=acc)
    else:
        acc.addmm_(a, b)


def _is_one(grad: torch.Tensor) -> bool:
    """Whether an upstream gradient is exactly 1, where reading it costs no device sync (CPU)."""
    return grad.device.type == "cpu" and grad.numel() == 1 and float(grad) == 1.0


def forward_grads(ctx, grad_total: torch.Tensor, what: str) -> tuple:
    """The backward of a loss whose gradients were formed in its forward (``ctx.grads`` = (hidden,
    weight, bias), ``ctx.w_dtype`` / ``ctx.b_dtype``): each scaled in place by the upstream
    gradient, once (a second backward is an error). An upstream gradient of exactly 1 on the CPU
    (the step's loss, its normalizer applied in the forward) skips the pass over the [V, H] weight
    gradient; on a GPU reading it would cost a sync, so the multiply runs."""
    if ctx.grads is None:
        raise RuntimeError(f"{what}: the gradient formed in the forward was consumed by a first "
                           "backward; retain_graph=True is not supported")
    grad_h, grad_w, grad_b = ctx.grads
    ctx.grads = None
    scale = not _is_one(grad_total)
    if grad_h is not None and scale:
        grad_h = grad_h.mul_(grad_total)
    if grad_w is not None:
        grad_w = (grad_w.mul_(grad_total) if scale else grad_w).to(ctx.w_dtype)
    if grad_b is not None:
        grad_b = (grad_b.mul_(grad_total) if scale else grad_b).to(ctx.b_dtype)
    return grad_h, grad_w, grad_b


class LinearDistillFunction(torch.autograd.Function):
    """``total = ce_weight * CE_sum + kd_weight * KD_sum`` over the rows, from hidden rows and the head.

    forward(rows [N, H], weight [Vf, H], bias [Vf] or None, teacher, targets [N], kd_rows [N] bool or
    None, ce_rows [N] bool or None, cfg, vocab, chunk, scale, norm) returns (total, kd_sum, ce_sum), fp32
    scalars; only ``total`` is differentiable. ``kd_rows`` / ``ce_rows``: the rows the KD / CE term applies
    to (None: all), passed chunk by chunk to ``chunk_terms`` as its ``kd_mask`` / ``ce_mask``. ``norm``
    (None, a float or a 0-d tensor >= 1): ``total`` is divided by it and so are the gradients formed
    here, through the small [rows, H] operands (the [V, H] weight gradient then needs no pass of its
    own in backward). The head's rows ``vocab:`` (padded embedding rows)
    get zero gradient.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, teacher, targets, kd_rows, ce_rows, cfg, vocab, chunk, scale, norm):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        need = need_h or need_w or need_b
        n = rows.shape[0]
        dev = rows.device
        w = weight[:vocab]
        b = None if bias is None else bias[:vocab]
        grad_h = torch.zeros_like(rows) if need_h else None
        grad_w = None
        if need_w:
            # the first chunk's GEMM writes grad_w[:vocab] (no zero fill of the [V, H] buffer first)
            grad_w = torch.empty(weight.shape, dtype=torch.float32, device=dev)
            grad_w[vocab:].zero_()
        wrote = False
        inv = None if norm is None else 1.0 / norm
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) if need_b else None
        kd_sum = torch.zeros((), dtype=torch.float32, device=dev)
        ce_sum = torch.zeros((), dtype=torch.float32, device=dev)
        with contextlib.ExitStack() as stack:
            t_w = t_b = None
            if isinstance(teacher, HiddenTeacher):
                t_w, t_b = stack.enter_context(teacher.head())
                t_w = t_w[:vocab]
                t_b = None if t_b is None else t_b[:vocab]
            for c0 in range(0, n, chunk):
                c1 = min(n, c0 + chunk)
                h_c = rows[c0:c1]
                s = torch.nn.functional.linear(h_c, w, b)
                if scale != 1.0:
                    s = s.mul_(scale)
                t_c = None
                if isinstance(teacher, HiddenTeacher):
                    t_c = torch.nn.functional.linear(teacher.hidden[c0:c1], t_w, t_b)
                    if teacher.scale != 1.0:
                        t_c = t_c.mul_(teacher.scale)
                elif isinstance(teacher, TopKTeacher):
                    t_c = (teacher.ids[c0:c1], teacher.logprobs[c0:c1],
                           None if teacher.tail_mass is None else teacher.tail_mass[c0:c1])
                elif teacher is not None:  # teacher logits at the rows [N, Vt]
                    t_c = teacher[c0:c1, :vocab]
                kd, ce, g = chunk_terms(s, t_c, targets[c0:c1], None, cfg, need, owned=True,
                                   teacher_owned=isinstance(teacher, HiddenTeacher),
                                   kd_mask=None if kd_rows is None else kd_rows[c0:c1],
                                   ce_mask=None if ce_rows is None else ce_rows[c0:c1])
                del s, t_c
                if kd is not None:
                    kd_sum += kd.sum()
                ce_sum += ce.sum()
                if g is None:
                    continue
                if scale != 1.0:
                    g.mul_(scale)
                if need_h:
                    gh = (g if rows.dtype == torch.float32 else g.to(rows.dtype)) @ w
                    grad_h[c0:c1] = gh if inv is None else gh.mul_(inv)
                if need_w:
                    accumulate_mm(grad_w[:vocab], g.t(), h_c if inv is None else h_c.float() * inv, first=not wrote)
                    wrote = True
                if need_b:
                    grad_b[:vocab] += g.sum(0) if inv is None else g.sum(0).mul_(inv)
                del g
        if need_w and not wrote:  # no rows, or no term with a gradient
            grad_w[:vocab].zero_()
        total = cfg.ce_weight * ce_sum + cfg.kd_weight * kd_sum
        if norm is not None:
            total = total / norm
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return total, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_total, _gk, _gc):
        return (*forward_grads(ctx, grad_total, "linear_distill"), *(None,) * 9)


def _check_linear_inputs(rows, weight, teacher, targets, kd_rows, ce_rows, vocab: int, temperature: float) -> None:
    """Refuse shapes that do not fit ``rows [N, H]``, ``weight [V, H]`` and a teacher at the same rows."""
    if weight.dim() != 2 or weight.shape[1] != rows.shape[-1]:
        raise ValueError(f"lm_head weight {tuple(weight.shape)} must be [V, H] with H = {rows.shape[-1]} "
                         f"(under ZeRO-3 call it inside the head module's forward, where the weight is gathered)")
    if vocab > weight.shape[0]:
        raise ValueError(f"vocab_size={vocab} exceeds the student's {weight.shape[0]} head rows")
    if rows.dim() != 2 or targets.shape != rows.shape[:1]:
        raise ValueError(f"rows {tuple(rows.shape)} and targets {tuple(targets.shape)}: expected [N, H] and [N]")
    if isinstance(teacher, TopKTeacher):
        check_teacher(teacher, temperature)
        if teacher.ids.shape[0] != rows.shape[0]:
            raise ValueError(f"top-k teacher has {teacher.ids.shape[0]} rows, the student {rows.shape[0]}")
        if teacher.k > vocab:
            raise ValueError(f"top-k teacher k={teacher.k} exceeds the vocabulary size {vocab}")
    elif isinstance(teacher, HiddenTeacher):
        if teacher.hidden.shape[0] != rows.shape[0]:
            raise ValueError(f"teacher hidden has {teacher.hidden.shape[0]} rows, the student {rows.shape[0]}")
        if teacher.hidden.requires_grad:
            raise ValueError("teacher hidden states require grad: compute them under torch.no_grad()")
    elif isinstance(teacher, torch.Tensor):
        check_teacher(teacher, temperature)
        if teacher.dim() != 2 or teacher.shape[0] != rows.shape[0] or teacher.shape[1] < vocab:
            raise ValueError(f"teacher logits {tuple(teacher.shape)} must be [N={rows.shape[0]}, >= {vocab}]")
    elif teacher is not None:
        raise TypeError(f"teacher must be None, logits [N, V], a TopKTeacher or a HiddenTeacher, "
                        f"got {type(teacher).__name__}")
    if kd_rows is not None and kd_rows.shape != targets.shape:
        raise ValueError(f"kd_rows {tuple(kd_rows.shape)} must match targets {tuple(targets.shape)}")
    if ce_rows is not None and (ce_rows.dtype != torch.bool or ce_rows.shape != targets.shape):
        raise ValueError(f"ce_rows ({ce_rows.dtype}, {tuple(ce_rows.shape)}) must be a bool mask of the rows, "
                         f"shaped as targets {tuple(targets.shape)}")


def linear_distill(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher,
    targets: torch.Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    vocab_size: int | None = None,
    scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    kd_rows: torch.Tensor | None = None,
    ce_rows: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    impl: str = "torch",
    requested: str | None = None,
    normalizer: float | torch.Tensor | None = None,
):
    """``(total, kd_sum, ce_sum)`` over supervised ``rows [N, H]`` with ``targets [N]``.

    ``total = ce_weight * CE_sum + kd_weight * KD_sum`` (the caller passes kd_weight * T^2);
    ``teacher``: None (CE only), logits ``[N, Vt]``, a :class:`TopKTeacher` ``[N, k]`` at the
    temperature of use, or a :class:`HiddenTeacher` at the same rows. ``vocab_size``: the tokenizer's real vocabulary (head
    rows beyond it are padding on both sides). ``scale`` / ``student_softcap``: the student's own
    logit transform; ``teacher_softcap``: the cap still to apply to teacher logits given as a tensor
    ``[N, Vt]`` (a HiddenTeacher carries its own). ``kd_rows``: [N] bool, the rows KD applies to
    (None: all); the others get CE only, in the same pass. ``ce_rows``: [N] bool on the rows' device, the
    rows CE applies to (None: all); the others get KD only (on-policy rows, written by the student), and
    ``ce_sum`` is the CE over the rows with CE. ``impl="triton"`` (CUDA) runs the chunk loop in the fused
    Triton kernel (which masks neither term by row: with ``kd_rows`` or ``ce_rows`` the torch loop runs).
    ``requested``: the impl the user asked for (default ``impl``): where the kernel cannot serve the call,
    ``"triton"`` is a one-line error and ``"auto"`` runs the torch loop, warning once why.
    ``normalizer``: the step's response-token count (>= 1; a float or a 0-d tensor on the rows'
    device): ``total`` is divided by it, and the torch loop applies it to the gradients it forms in
    the forward (so the backward of the step's loss has nothing left to scale); the sums are not.
    """
    vocab = int(vocab_size or weight.shape[0])
    _check_linear_inputs(rows, weight, teacher, targets, kd_rows, ce_rows, vocab, temperature)
    if impl == "triton":
        requested = requested or impl
        fast, why = None, "KD on a subset of the rows (the fused op masks KD and CE by one label set)"
        if ce_rows is not None:
            why = ("CE on a subset of the rows, on-policy rows taking KD only (the fused op masks KD and CE by "
                   "one label set)")
        if kd_rows is None and ce_rows is None:
            try:
                fast, why = _triton_linear_distill(
                    rows, weight, bias, teacher, targets, kind=kind, beta=beta, alpha=alpha, temperature=temperature,
                    ce_weight=ce_weight, kd_weight=kd_weight, vocab=vocab, scale=scale, softcap=student_softcap,
                    teacher_softcap=teacher_softcap, chunk_tokens=chunk_tokens)
            except NotImplementedError as exc:  # a kind, k or input the kernel lacks
                why = str(exc)
        if fast is not None:
            return fast if normalizer is None else (fast[0] / normalizer, *fast[1:])
        kernel_fallback(requested, "distill_kernels.fused_linear_kd", why)
    cfg = ChunkConfig(kind=effective_kind(kind, beta), prm=KindParams(float(beta), float(alpha)),
                      temperature=float(temperature), student_softcap=student_softcap,
                      teacher_softcap=teacher.softcap if isinstance(teacher, HiddenTeacher) else teacher_softcap,
                      kd_weight=float(kd_weight) if teacher is not None else 0.0, ce_weight=float(ce_weight))
    chunk = int(chunk_tokens or default_chunk_tokens(vocab))
    return LinearDistillFunction.apply(rows, weight, bias, teacher, targets, kd_rows, ce_rows, cfg, vocab, chunk,
                                       float(scale), normalizer)


def _triton_linear_distill(rows, weight, bias, teacher, targets, *, kind, beta, alpha, temperature, ce_weight,
                           kd_weight, vocab, scale, softcap, teacher_softcap, chunk_tokens):
    """``(result, None)`` from the fused Triton op where it applies (no bias, logit scale or softcap on
    either side, teacher not given as logits); ``(None, why)`` where it does not."""
    if bias is not None or scale != 1.0 or softcap is not None or teacher_softcap is not None:
        return None, "a head bias, logit scale or softcap (the fused op has none)"
    if isinstance(teacher, torch.Tensor):
        return None, "a teacher given as logits (the fused op takes top-k or hidden states)"
    if isinstance(teacher, HiddenTeacher) and (teacher.scale != 1.0 or teacher.softcap is not None):
        return None, "a teacher logit scale or softcap (the fused op has none)"
    try:
        from distill_kernels.fused_linear_kd import fused_linear_kd
    except Exception as exc:  # noqa: BLE001 - any import failure: the kernel cannot run
        return None, f"not importable: {exc!r}"

    kw = dict(kind=kind, beta=beta, alpha=alpha, temperature=temperature, reduction="sum",
              chunk_tokens=chunk_tokens, ce_weight=ce_weight, kd_weight=kd_weight if teacher is not None else 0.0,
              vocab_size=vocab, return_parts=True)
    if isinstance(teacher, HiddenTeacher):
        with teacher.head() as (t_w, t_b):
            if t_b is not None:
                return None, "a teacher head bias (the fused op has none)"
            return fused_linear_kd(rows, weight, (teacher.hidden, t_w), targets, **kw), None
    return fused_linear_kd(rows, weight, teacher, targets, **kw), None


# ------------------------------------------------------------------------------------------------
# The student's head


class LossRequest:
    """One micro-batch's loss, computed by :class:`LeanHead` from the hidden states it receives.

    ``compute(rows, weight, bias) -> (total, *parts)`` is called with the supervised rows
    ``hidden.reshape(-1, H)[index]``; the head returns ``total`` (what the model forward then
    returns as its ``logits``) and keeps ``parts`` (the detached sums the objective logs) here."""

    def __init__(self, index: torch.Tensor, compute: Callable):
        self.index, self.compute = index, compute
        self.parts: tuple = ()

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.index)
        total, *parts = self.compute(rows, weight, bias)
        self.parts = tuple(parts)
        return total


class LeanHead(torch.nn.Linear):
    """The student's lm_head with the loss folded in. An ``nn.Linear`` (same parameters, names and
    state dict; generation and evaluation see plain logits); while :meth:`pending` holds a
    :class:`LossRequest`, the next forward returns that request's loss instead of logits. Running in
    the module's own forward is what lets ZeRO-3's hooks gather and release the (tied) weight."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's signature
        req = self.__dict__.pop("_lean_request", None)
        if req is None:
            return super().forward(input)
        return req(input, self.weight, self.bias)

    @contextlib.contextmanager
    def pending(self, request: LossRequest):
        self.__dict__["_lean_request"] = request
        try:
            yield request
        except BaseException:
            self.__dict__.pop("_lean_request", None)
            raise
        if self.__dict__.pop("_lean_request", None) is not None:
            raise RuntimeError("the model's forward did not call its lm_head on the final hidden states: "
                               "kd.path=lean cannot serve this architecture; use kd.path=logits")


def install_lean_head(model: torch.nn.Module, what: str) -> LeanHead:
    """Turn the model's output embedding (an ``nn.Linear``) into a :class:`LeanHead` in place: the
    same module object, parameters and hooks; only its forward gains the pending-request branch.
    Call it before the DeepSpeed engine is built."""
    head = model.get_output_embeddings()
    if isinstance(head, LeanHead):
        return head
    if type(head) is not torch.nn.Linear:
        raise ValueError(f"{what}: kd.path=lean needs an nn.Linear lm_head, this model has "
                         f"{type(head).__name__}; use kd.path=logits")
    head.__class__ = LeanHead
    return head
