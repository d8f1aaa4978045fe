"""Distillation divergences in torch, chunked over tokens, with the gradient computed in forward.

What is computed is defined once in ``distill_kernels.ref`` (kernels/distill_kernels/ref.py): forward KL(p || q),
reverse KL, generalized JSD (TRL convention, beta=0 -> forward, beta=1 -> reverse), skew KL and
skew reverse KL (DistiLLM, alpha), TVD; ``p`` the teacher, ``q`` the student, both at temperature T;
no T^2 factor here. A teacher is either full logits ``[..., V]`` or a
:class:`~distill.losses.teacher_output.TopKTeacher` ``[..., k]`` computed at the temperature of use (k+1
buckets on both sides, for every kind; a teacher at another temperature is refused;
see the reference's docstring and docs/losses.md).

Memory
------
Eager torch materialises several fp32 ``[tokens x vocab]`` tensors (two log-softmaxes, their
exponentials, the mixture, and the same again in autograd's backward). Here the rows are processed
``chunk_tokens`` at a time inside one :class:`torch.autograd.Function`: for each chunk the loss per
row AND its gradient w.r.t. the student logits are computed in closed form in forward (fp32
arithmetic) and the gradient is written into one buffer of the student logits' shape and dtype.
Backward only multiplies that buffer by the upstream gradient (in place). The peak above the inputs
is therefore the gradient buffer plus the fp32 working set of ONE chunk (a handful of
``[chunk_tokens x vocab]`` fp32 tensors). With ``grad_inplace=True`` the gradient is written into
the student-logits buffer itself and the gradient buffer disappears too: the caller gives the
logits up (they hold the gradient after the call; autograd's version counter makes any other
consumer that saved them fail loudly instead of silently reading gradients).

Gradient formulas
-----------------
For a per-row loss ``L(q)`` with ``q = softmax(s / T)``: ``dL/ds = (qg - q * sum(qg)) / T`` where
``qg = q * dL/dq``. Each kind supplies ``qg`` in closed form (forward KL: ``-p``; reverse KL:
``q (log q - log p)``; JSD: ``(1-beta) q (log q - log m)``; skew KL: ``-(1-alpha) p q / m``; skew
reverse KL: ``q (log q - log m) - alpha q^2 / m``; TVD: ``q sign(q - p) / 2``). For a top-k teacher
the same is applied to the k+1 bucket probabilities and spread back to the vocabulary: a top-k id
gets ``qg_b - q_j S``, a tail token ``q_j (qg_tail / Q_tail - S)`` with ``S = sum_b qg_b``. Forward
KL's top-k gradient is therefore exactly ``q - p~``, ``p~`` the teacher on its k ids and its tail
mass spread over the other tokens in proportion to ``q`` (0 when the student equals the teacher).

The teacher is frozen: it gets no gradient, and teacher logits that require grad are refused (an
autograd graph through the teacher is wasted memory; compute them under ``torch.no_grad()``).

Final-logit softcapping (Gemma-2: ``cap * tanh(x / cap)``) is applied per side, chunk by chunk,
before the temperature (``student_softcap``, ``teacher_softcap``); the student's gradient includes
the ``1 - tanh^2`` factor.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from typing import Callable, NamedTuple

import torch

from distill.errors import UserError
from distill.losses.teacher_output import TopKTeacher

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "torch", "triton")

# Default chunk: one fp32 [chunk_tokens x vocab] tensor of about this many bytes. The working set of a
# chunk is a few such tensors (about 5 for a full teacher, 3 for a top-k teacher); at vocab 151,936
# this is 55 rows per chunk.
DEFAULT_CHUNK_BYTES = 32 * 1024 * 1024

# Floor for log() of a probability that may be 0 (same constant as the reference).
_TINY = 1e-30


def default_chunk_tokens(vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one fp32 ``[rows x vocab]`` tensor is about ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * max(1, vocab)))


# ----------------------------------------------------------------------------------------------
# Registry: kind -> closed-form (per-row loss, q * dL/dq) on log-probabilities over the last dim.
# One definition serves the full-vocabulary teacher and the k+1 buckets of a top-k teacher.
# ----------------------------------------------------------------------------------------------


class KindParams(NamedTuple):
    """The parameters of a divergence kind: JSD's ``beta``, the skew KLs' ``alpha``."""

    beta: float
    alpha: float


TermsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, KindParams], tuple]


# Each kind may overwrite ``log_q``, ``log_p`` and ``p`` (the caller no longer needs them) but
# keeps ``q``: that is how a chunk's working set stays at ~5 fp32 [chunk x vocab] tensors.


def _xlogy_ratio_(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a * (log a - log b) with 0 * anything = 0, written over ``log_a``."""
    return log_a.sub_(log_b).mul_(a).masked_fill_(a <= 0, 0.0)


def _forward_kl(log_q, q, log_p, p, prm):
    loss = _xlogy_ratio_(p, log_p, log_q).sum(-1)
    return loss, p.neg_()


def _reverse_kl(log_q, q, log_p, p, prm):
    qg = _xlogy_ratio_(q, log_q, log_p)
    return qg.sum(-1), qg


def _jsd(log_q, q, log_p, p, prm):
    b = prm.beta
    log_m = torch.mul(q, 1.0 - b).add_(p, alpha=b).clamp_min_(_TINY).log_()
    loss = b * _xlogy_ratio_(p, log_p, log_m).sum(-1)
    kl_qm = _xlogy_ratio_(q, log_q, log_m)
    del log_m
    loss = loss + (1.0 - b) * kl_qm.sum(-1)
    return loss, kl_qm.mul_(1.0 - b)


def _skew_kl(log_q, q, log_p, p, prm):
    a = prm.alpha
    m = torch.mul(p, a).add_(q, alpha=1.0 - a).clamp_min_(_TINY)
    loss = _xlogy_ratio_(p, log_p, torch.log(m)).sum(-1)
    # qg = -(1 - a) p q / m; where m is floored, p = q = 0 and the term is 0.
    qg = p.mul_(q).div_(m).mul_(-(1.0 - a))
    return loss, qg


def _skew_reverse_kl(log_q, q, log_p, p, prm):
    a = prm.alpha
    m = torch.mul(q, a).add_(p, alpha=1.0 - a).clamp_min_(_TINY)
    kl_terms = _xlogy_ratio_(q, log_q, torch.log(m))
    loss = kl_terms.sum(-1)
    # qg = q (log q - log m) - a q^2 / m, the second term built in p's buffer.
    qg = kl_terms.sub_(p.copy_(q).mul_(q).div_(m).mul_(a))
    return loss, qg


def _tvd(log_q, q, log_p, p, prm):
    diff = p.sub_(q).neg_()  # q - p
    sgn = torch.sign(diff)
    # abs via the sign, summed with torch's pairwise sum (linalg.vector_norm(ord=1) loses ~2e-4
    # relative over 152k fp32 terms on CPU).
    loss = 0.5 * diff.mul_(sgn).sum(-1)
    return loss, sgn.mul_(q).mul_(0.5)


_REGISTRY: dict[str, TermsFn] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
    "skew_kl": _skew_kl,
    "skew_reverse_kl": _skew_reverse_kl,
    "tvd": _tvd,
}


def effective_kind(kind: str, beta: float) -> str:
    """The kind that runs for ``kind`` at ``beta`` (JSD's ends are the KLs, as TRL and the reference
    define them); an unknown kind is a ValueError."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")
    if kind == "jsd" and beta == 0.0:
        return "forward_kl"
    if kind == "jsd" and beta == 1.0:
        return "reverse_kl"
    return kind


# ----------------------------------------------------------------------------------------------
# One chunk: per-row KD / CE values and the (unreduced) gradient w.r.t. the student logits.
# ----------------------------------------------------------------------------------------------


class ChunkConfig(NamedTuple):
    """What :func:`chunk_terms` computes for every chunk of one call: kind, temperature, softcaps, weights."""

    kind: str  # effective kind (JSD ends resolved)
    prm: KindParams
    temperature: float
    student_softcap: float | None
    teacher_softcap: float | None
    kd_weight: float  # weight of d(kd_row) in the stored gradient
    ce_weight: float  # weight of d(ce_row) in the stored gradient (0: no CE)


def _owned_fp32(x: torch.Tensor) -> torch.Tensor:
    """A new contiguous fp32 copy (``.float()`` would alias an fp32 input, which we overwrite)."""
    return torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x)


def _row_shift(x: torch.Tensor) -> torch.Tensor:
    """The per-row max that logsumexp shifts by, an infinite one replaced by 0 (as torch does)."""
    m = x.amax(-1, keepdim=True)
    return m.masked_fill_(m.abs() == float("inf"), 0.0)


def _lse(x: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(x, -1, keepdim=True)`` with one [rows x V] temporary instead of two (the
    shifted exponentials are summed in place): the same max shift, infinite maxima handled as torch
    handles them. Each fresh [chunk x V] tensor is also a fresh mapping for the allocator to fault in."""
    m = _row_shift(x)
    return torch.sub(x, m).exp_().sum(-1, keepdim=True).log_().add_(m)


def _log_softmax_(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_softmax(x) written over x, softmax(x))`` with one new [rows x V] tensor: the shifted
    exponentials the normaliser needs are kept and divided by it (not a logsumexp, then exp again)."""
    m = _row_shift(x)
    e = torch.sub(x, m).exp_()
    z = e.sum(-1, keepdim=True)
    return x.sub_(torch.log(z).add_(m)), e.div_(z)


def _softcap_(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    if cap is not None:
        x.div_(cap).tanh_().mul_(cap)
    return x


def chunk_terms(s_raw, teacher, ce_labels, mask, cfg: ChunkConfig, need_grad: bool, *, owned: bool = False,
                teacher_owned: bool = False, kd_mask=None, ce_mask=None):
    """One chunk of rows: per-row KD and CE and the gradient w.r.t. the student rows, in one pass (the
    shared core of the logits path, the lean path and the multi-teacher loss).

    Returns (kd_rows [n] fp32 or None, ce_rows [n] fp32 or None, grad [n, V] fp32 or None).

    ``s_raw``: student rows [n, V] (any dtype, any strides); ``teacher``: teacher rows [n, V], a tuple
    (ids [n, k], logprobs [n, k], tail [n] or None), or None; ``ce_labels``: [n] long or None;
    ``mask``: [n] bool, rows to count (None: every row, as on the lean path's supervised rows). Rows
    outside the mask give 0 loss and 0 gradient.
    ``kd_mask``: [n] bool or None, the rows (among those counted) the KD term applies to; the others
    get CE only (ICLDist: token-level rows among the answer rows).
    ``ce_mask``: [n] bool or None, the rows (among those counted) the CE term applies to; the others
    get ce_rows 0 and no CE gradient, KD as usual (on-policy rows: the student wrote them).
    ``owned`` / ``teacher_owned``: the caller hands over the student / teacher rows (fresh tensors
    nothing else reads, e.g. a chunk's head GEMM output): fp32 contiguous ones are overwritten in
    place instead of copied.
    """
    T = cfg.temperature
    # the one fp32 chunk this function owns and overwrites
    s = s_raw if owned and s_raw.dtype == torch.float32 and s_raw.is_contiguous() else _owned_fp32(s_raw)
    _softcap_(s, cfg.student_softcap)  # s = capped student logits, temperature 1
    grad = None
    kd_rows = ce_rows = None
    if cfg.student_softcap is not None and need_grad:
        # d cap*tanh(x/cap) / dx = 1 - (capped / cap)^2, applied to the whole gradient at the end.
        cap_factor = torch.square(s / cfg.student_softcap).neg_().add_(1.0)
    else:
        cap_factor = None

    lse_ce = None
    if ce_labels is not None:
        lse_ce = _lse(s)
        lse1 = lse_ce.squeeze(-1)
        safe_labels = (ce_labels if mask is None else torch.where(mask, ce_labels, 0)).long()
        picked = s.gather(-1, safe_labels[:, None]).squeeze(-1)
        ce_rows = lse1 - picked if mask is None else torch.where(mask, lse1 - picked, 0.0)
        if ce_mask is not None:
            ce_rows = torch.where(ce_mask, ce_rows, 0.0)
        if need_grad and cfg.ce_weight != 0.0:
            grad = (s - lse1[:, None]).exp_()
            grad.scatter_add_(-1, safe_labels[:, None], torch.full_like(picked[:, None], -1.0))
            grad.mul_(cfg.ce_weight)
            if ce_mask is not None:
                grad.masked_fill_(~ce_mask[:, None], 0.0)

    if teacher is not None:
        if T != 1.0:
            s.div_(T)
        lse = lse_ce if T == 1.0 else None  # the CE's normaliser is the KD's at T = 1
        if isinstance(teacher, tuple):
            kd_rows, kd_grad = _topk_terms(s, teacher, cfg, need_grad, lse)
        else:
            kd_rows, kd_grad = _full_terms(s, teacher, cfg, need_grad, teacher_owned, lse)
        if mask is not None:
            kd_rows = torch.where(mask, kd_rows, 0.0)
        if kd_mask is not None:
            kd_rows = torch.where(kd_mask, kd_rows, 0.0)
            if kd_grad is not None:
                kd_grad.masked_fill_(~kd_mask[:, None], 0.0)
        if kd_grad is not None:
            # dL/dlogits = dL/ds / T.
            scale = cfg.kd_weight / T
            if grad is None:
                grad = kd_grad.mul_(scale)
            else:
                grad.add_(kd_grad, alpha=scale)
            del kd_grad
    del s
    if grad is not None:
        if cap_factor is not None:
            grad.mul_(cap_factor)
        # masked_fill, not a multiply: a masked row may hold NaN/inf from garbage (padding) logits.
        if mask is not None:
            grad.masked_fill_(~mask[:, None], 0.0)
    return kd_rows, ce_rows, grad


def _full_terms(s, t_raw, cfg: ChunkConfig, need_grad: bool, teacher_owned: bool = False, lse=None):
    """Full-vocabulary teacher. ``s`` = tempered student logits (fp32, owned: overwritten);
    ``lse``: their logsumexp ``[n, 1]`` where the caller has it."""
    if lse is None:
        log_q, q = _log_softmax_(s)
    else:
        log_q = s.sub_(lse)
        q = log_q.exp()
    owned = teacher_owned and t_raw.dtype == torch.float32 and t_raw.is_contiguous()
    t = t_raw if owned else _owned_fp32(t_raw)
    _softcap_(t, cfg.teacher_softcap)
    if cfg.temperature != 1.0:
        t.div_(cfg.temperature)
    log_p, p = _log_softmax_(t)
    loss, qg = _REGISTRY[cfg.kind](log_q, q, log_p, p, cfg.prm)
    del log_p, p, t
    if not need_grad:
        return loss, None
    total = qg.sum(-1, keepdim=True)
    # grad = qg - q * sum(qg), written over q (no new buffer).
    grad = q.mul_(total.neg()).add_(qg)
    return loss, grad


def _topk_terms(s, teacher, cfg: ChunkConfig, need_grad: bool, lse=None):
    """Top-k teacher over k+1 buckets. ``s`` = tempered student logits (fp32, owned: overwritten);
    ``lse``: their logsumexp ``[n, 1]`` where the caller has it."""
    ids, logprobs, tail = teacher
    ids = ids.long()
    k = ids.shape[-1]
    # Teacher: its k + 1 buckets at the temperature of use, as given (kernels/distill_kernels/ref.py).
    lp = logprobs.float()
    if tail is None:
        tail = (1.0 - lp.exp().sum(-1)).clamp(0.0, 1.0)
    else:
        tail = tail.float().clamp(0.0, 1.0)
    log_tail = torch.where(tail > 0, tail.clamp_min(_TINY).log(), -float("inf"))
    log_p = torch.log_softmax(torch.cat([lp, log_tail[:, None]], dim=-1), dim=-1)
    p = log_p.exp()
    # Student: exact tempered mass on the k ids and outside them.
    lse = _lse(s) if lse is None else lse
    s_top = s.gather(-1, ids)
    s.scatter_(-1, ids, -float("inf"))  # s now holds the tail logits only
    tail_lse = _lse(s)
    log_q = torch.cat([s_top - lse, tail_lse - lse], dim=-1)
    q = log_q.exp()

    # Every kind over the k + 1 buckets, forward KL included (its tail term keeps the teacher the optimum).
    loss, qg = _REGISTRY[cfg.kind](log_q, q, log_p, p, cfg.prm)
    if not need_grad:
        return loss, None
    total = qg.sum(-1, keepdim=True)  # S
    tail_lse_safe = torch.where(torch.isfinite(tail_lse), tail_lse, 0.0)
    # Tail tokens: exp(s_j - lse_tail) * qg_tail - q_j * S. Top ids are -inf in s, so they get 0
    # here and are overwritten by the scatter below.
    grad = torch.sub(s, tail_lse_safe).exp_().mul_(qg[:, k:])
    s.sub_(lse).exp_()  # s := q over the vocabulary (0 on the top ids)
    grad.addcmul_(s, total, value=-1.0)
    grad.scatter_(-1, ids, qg[:, :k] - q[:, :k] * total)
    return loss, grad


# ----------------------------------------------------------------------------------------------
# The autograd Function: chunk loop in forward, scaling only in backward.
# ----------------------------------------------------------------------------------------------


class ChunkedDistillFunction(torch.autograd.Function):
    """rows = ce_weight * ce_row + kd_weight * kd_row for every row, chunked.

    forward(student_logits [N, Vfull], teacher, ce_labels, mask, cfg, vocab, chunk_tokens, inplace)
    returns (rows [N] fp32 differentiable, kd_rows [N], ce_rows [N] non-differentiable).
    Columns ``vocab:`` of the student (padded embedding rows) are ignored and get zero gradient.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher, ce_labels, mask, cfg, vocab, chunk_tokens, inplace):
        n_rows, v_full = student_logits.shape
        need_grad = ctx.needs_input_grad[0]
        dev = student_logits.device
        kd_rows = torch.zeros(n_rows, dtype=torch.float32, device=dev)
        ce_rows = torch.zeros(n_rows, dtype=torch.float32, device=dev)
        grad_buf = None
        if need_grad:
            if inplace and student_logits.is_contiguous():
                grad_buf = student_logits  # documented: the caller gives the logits up
            else:
                grad_buf = torch.empty_like(student_logits, memory_format=torch.contiguous_format)
            if vocab < v_full:
                grad_buf[:, vocab:].zero_()
        for start in range(0, n_rows, chunk_tokens):
            end = min(start + chunk_tokens, n_rows)
            t_chunk = None
            if isinstance(teacher, tuple):
                ids, lp, tail = teacher
                t_chunk = (ids[start:end], lp[start:end], None if tail is None else tail[start:end])
            elif teacher is not None:
                t_chunk = teacher[start:end, :vocab]
            kd, ce, g = chunk_terms(
                student_logits[start:end, :vocab],
                t_chunk,
                None if ce_labels is None else ce_labels[start:end],
                mask[start:end],
                cfg,
                need_grad,
            )
            if kd is not None:
                kd_rows[start:end] = kd
            if ce is not None:
                ce_rows[start:end] = ce
            if need_grad:
                if g is None:
                    grad_buf[start:end, :vocab].zero_()
                else:
                    grad_buf[start:end, :vocab].copy_(g)
                del g
        rows = cfg.kd_weight * kd_rows + cfg.ce_weight * ce_rows
        ctx.mark_non_differentiable(kd_rows, ce_rows)
        ctx.grad_buf = grad_buf
        ctx.chunk_tokens = chunk_tokens
        return rows, kd_rows, ce_rows

    @staticmethod
    def backward(ctx, grad_rows, _grad_kd, _grad_ce):
        grad_buf = ctx.grad_buf
        if grad_buf is None:
            raise RuntimeError(
                "ChunkedDistillFunction: backward called twice (the stored gradient is scaled in "
                "place and freed); retain_graph=True is not supported"
            )
        ctx.grad_buf = None
        # Row chunks: on CPU an in-place bf16 *= fp32 goes through a full-size fp32 temporary
        # (TensorIterator computes in the common dtype), i.e. 2 fp32 copies of the logits at once.
        step = ctx.chunk_tokens
        for start in range(0, grad_buf.shape[0], step):
            grad_buf[start:start + step].mul_(grad_rows[start:start + step, None])
        return grad_buf, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Driver shared by the functionals and the objective.
# ----------------------------------------------------------------------------------------------


def _flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V]; a view when the leading dims are mergeable (also for vocab-sliced views)."""
    return x.reshape(-1, x.shape[-1])


def check_teacher(teacher, temperature: float) -> None:
    """Refuse a top-k teacher at another temperature, and teacher tensors that require grad."""
    if isinstance(teacher, TopKTeacher) and teacher.temperature != float(temperature):
        raise ValueError(
            f"the top-k teacher was computed at temperature {teacher.temperature:g}, but the loss uses "
            f"temperature {float(temperature):g}: a top-k distribution is only valid at its own temperature "
            f"(ask the teacher for its top-k at {float(temperature):g}, or rebuild the cache at it)")
    tensors = [teacher] if isinstance(teacher, torch.Tensor) else [teacher.logprobs]
    if isinstance(teacher, TopKTeacher) and teacher.tail_mass is not None:
        tensors.append(teacher.tail_mass)
    for t in tensors:
        if t.requires_grad:
            raise ValueError(
                "teacher tensors require grad: the teacher is frozen and gets no gradient. Compute "
                "its logits under torch.no_grad() (or pass .detach()) so no autograd graph is kept"
            )


def _check_kind(kind: str, beta: float, alpha: float, temperature: float) -> str:
    """The effective kind (:func:`effective_kind`) after checking the temperature and the kind's parameters."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    eff = effective_kind(kind, beta)
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if kind in ("skew_kl", "skew_reverse_kl") and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{kind} alpha must be in [0, 1], got {alpha}")
    return eff


def _topk_teacher_rows(teacher: TopKTeacher, student_logits: torch.Tensor, vocab: int,
                       temperature: float, teacher_softcap: float | None) -> tuple:
    """A checked top-k teacher as flat rows: ``(ids [N, k], logprobs [N, k], tail [N] or None)``."""
    check_teacher(teacher, temperature)
    if teacher.ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"top-k teacher positions {tuple(teacher.ids.shape[:-1])} do not match student "
            f"logits {tuple(student_logits.shape)}"
        )
    if teacher.k > vocab:
        raise ValueError(f"top-k teacher k={teacher.k} exceeds the vocabulary size {vocab}")
    if teacher_softcap is not None:
        raise ValueError(
            "teacher_softcap applies to full teacher logits; a top-k teacher must be built from "
            "the teacher's softcapped logits (TopKTeacher.from_logits(cap*tanh(logits/cap), k))"
        )
    k = teacher.k
    return (
        teacher.ids.reshape(-1, k),
        teacher.logprobs.reshape(-1, k),
        None if teacher.tail_mass is None else teacher.tail_mass.reshape(-1),
    )


def _full_teacher_rows(teacher: torch.Tensor, student_logits: torch.Tensor, vocab: int, vocab_size: int | None,
                       temperature: float) -> torch.Tensor:
    """Checked full teacher logits as rows ``[N, Vt]`` (a view where the leading dims merge)."""
    check_teacher(teacher, temperature)
    v_teacher, v_student = teacher.shape[-1], student_logits.shape[-1]
    if teacher.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher logits {tuple(teacher.shape)} and student logits "
            f"{tuple(student_logits.shape)} differ in their leading (position) dims"
        )
    if vocab_size is None and v_teacher != v_student:
        raise ValueError(
            f"teacher has {v_teacher} logit columns and student {v_student}: pass vocab_size "
            f"(the tokenizer's real vocabulary) to compare the first vocab_size columns"
        )
    if vocab > v_teacher:
        raise ValueError(
            f"vocab_size={vocab} is larger than the teacher's {v_teacher} logit columns "
            f"(student has {v_student})"
        )
    return _flatten_rows(teacher)


def chunked_rows(
    student_logits: torch.Tensor,
    teacher,
    *,
    mask: torch.Tensor | None,
    ce_labels: torch.Tensor | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    vocab_size: int | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    chunk_tokens: int | None = None,
    grad_inplace: bool = False,
):
    """Per-row (rows, kd_rows, ce_rows), each [N] fp32, rows = kd_weight*kd + ce_weight*ce.

    The building block of the functionals and of the objective (one code path). ``teacher``: full
    logits [..., Vt], a TopKTeacher [..., k], or None (CE only). ``mask``: [...] bool or None (all).
    ``vocab_size``: use only the first ``vocab_size`` columns of both sides (views, no copies).
    """
    eff = _check_kind(kind, beta, alpha, temperature)
    v_student = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    vocab = v_student if vocab_size is None else int(vocab_size)
    if vocab > v_student:
        raise ValueError(
            f"vocab_size={vocab} is larger than the student's {v_student} logit columns"
        )
    if isinstance(teacher, TopKTeacher):
        t_arg = _topk_teacher_rows(teacher, student_logits, vocab, temperature, teacher_softcap)
    elif isinstance(teacher, torch.Tensor):
        t_arg = _full_teacher_rows(teacher, student_logits, vocab, vocab_size, temperature)
    elif teacher is not None:
        raise TypeError(f"teacher must be a tensor of logits or a TopKTeacher, got {type(teacher).__name__}")
    elif ce_labels is None:
        raise ValueError("nothing to compute: no teacher and no CE labels")
    else:
        t_arg = None

    s2d = _flatten_rows(student_logits)
    n_rows = s2d.shape[0]
    if mask is None:
        mask_flat = torch.ones(n_rows, dtype=torch.bool, device=student_logits.device)
    else:
        mask_flat = mask.reshape(-1).to(device=student_logits.device, dtype=torch.bool)
    labels_flat = None if ce_labels is None else ce_labels.reshape(-1).to(student_logits.device)
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(vocab)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    cfg = ChunkConfig(
        kind=eff,
        prm=KindParams(float(beta), float(alpha)),
        temperature=float(temperature),
        student_softcap=None if student_softcap is None else float(student_softcap),
        teacher_softcap=None if teacher_softcap is None else float(teacher_softcap),
        kd_weight=float(kd_weight) if teacher is not None else 0.0,
        ce_weight=float(ce_weight) if ce_labels is not None else 0.0,
    )
    # An in-place gradient needs the flattened rows to share the caller's storage.
    inplace = grad_inplace and s2d.is_contiguous() and s2d.data_ptr() == student_logits.data_ptr()
    rows, kd_rows, ce_rows = ChunkedDistillFunction.apply(
        s2d, t_arg, labels_flat, mask_flat, cfg, vocab, int(chunk_tokens), inplace
    )
    return rows.reshape(lead), kd_rows.reshape(lead), ce_rows.reshape(lead)


def _reduce(rows: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    n = rows.numel() if mask is None else mask.to(rows.device).sum()
    if isinstance(n, int):
        return total / max(n, 1)
    return total / n.clamp_min(1)


# ----------------------------------------------------------------------------------------------
# impl selection and the Triton path.
# ----------------------------------------------------------------------------------------------

_warned: set = set()


def _warn_once(key, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


class KernelUnavailable(UserError, ValueError):
    """``impl="triton"`` was asked for and the kernel cannot serve this call (one line, with the reason;
    a launcher's exit status 2). What the machine lacks (no CUDA, no triton) is refused before any
    model loads (:meth:`distill.config.RunConfig.check_machine`); this covers what only the call shows."""


def kernel_fallback(requested: str, what: str, reason: str) -> None:
    """A kernel cannot serve a call: with ``impl="triton"`` asked for explicitly that is an error;
    with ``"auto"`` the caller runs the torch path, and this says why once per process."""
    if requested == "triton":
        raise KernelUnavailable(f"impl='triton': {what} cannot run this call ({reason}); use impl='auto' (the torch "
                                f"path where a kernel cannot run, with a warning) or impl='torch'")
    _warn_once((what, reason), f"{what}: {reason}; using the torch path")


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def resolve_impl(impl: str, student_logits: torch.Tensor) -> str:
    """"auto" -> "triton" for CUDA logits when triton is installed, else "torch"."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return "triton" if student_logits.is_cuda and _triton_available() else "torch"
    return impl


def triton_divergence(kind, student_logits, teacher, labels, *, beta, alpha, temperature,
                      ignore_index, reduction, grad_inplace=False, requested="auto"):
    """``distill_kernels.kd_div`` / ``topk_kd`` (imported here, lazily), or None when the kernels
    cannot serve the call (not importable, or NotImplementedError for this kind / input) and
    ``requested`` is ``"auto"``: the caller then uses the torch path, warned once per reason. With
    ``requested="triton"`` that is a :class:`KernelUnavailable` error instead."""
    name = "topk_kd" if isinstance(teacher, TopKTeacher) else "kd_div"
    try:
        op = getattr(importlib.import_module(f"distill_kernels.{name}"), name)
    except Exception as exc:  # noqa: BLE001 - any import failure: the kernel cannot run
        kernel_fallback(requested, f"distill_kernels.{name}", f"not importable: {exc!r}")
        return None
    check_teacher(teacher, temperature)
    kw = dict(kind=kind, beta=beta, alpha=alpha, temperature=temperature,
              ignore_index=ignore_index, reduction=reduction)
    if grad_inplace:
        kw["grad_inplace"] = True
    try:
        if name == "topk_kd":
            out = op(student_logits, teacher.ids, teacher.logprobs, teacher.tail_mass, labels, **kw)
        else:
            out = op(student_logits, teacher, labels, **kw)
    except NotImplementedError as exc:
        kernel_fallback(requested, f"distill_kernels.{name}", str(exc))
        return None
    if reduction == "none":
        out = out.reshape(student_logits.shape[:-1])
    return out


# ----------------------------------------------------------------------------------------------
# Public functionals (contract: COMMON.md §1).
# ----------------------------------------------------------------------------------------------


def divergence(
    kind: str,
    student_logits: torch.Tensor,
    teacher,
    labels: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_tokens: int | None = None,
    vocab_size: int | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    grad_inplace: bool = False,
) -> torch.Tensor:
    """Divergence ``kind`` between the student and a teacher, per kernels/distill_kernels/ref.py.

    student_logits: ``[..., V]`` (bf16/fp16/fp32; any strides, e.g. a vocab-sliced view).
    teacher:        logits ``[..., V]`` (frozen, no grad) or a ``TopKTeacher`` ``[..., k]``.
    labels:         ``[...]`` aligned with the rows; a mask only (rows == ignore_index count 0).
    reduction:      "mean" (sum over vocab, mean over counted rows, 0 if none), "sum", "none".
    impl:           "torch" (chunked, this module), "triton" (distill_kernels; a kind, option or
                    input the kernels lack is a KernelUnavailable error), "auto" (triton for CUDA
                    logits when triton imports, torch otherwise and where the kernels cannot serve
                    the call, with a one-time warning saying why).
    chunk_tokens:   rows per chunk of the torch path (default: ~32 MiB of fp32 per [chunk x V]).
    vocab_size:     compare only the first vocab_size columns of both sides (padded vocabularies).
    student_softcap / teacher_softcap: Gemma-2 final-logit softcap per side, before the temperature.
    grad_inplace:   write the gradient into the student-logits buffer during the forward (the
                    caller must not read the logits afterwards); saves one logits-sized buffer.
    No T^2 factor (the objective applies it).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    effective_kind(kind, beta)
    if resolve_impl(impl, student_logits) == "triton":
        extras = vocab_size is not None or student_softcap is not None or teacher_softcap is not None
        if extras:
            kernel_fallback(impl, "distill_kernels", "vocab_size and softcaps are handled by the torch path only")
        else:
            out = triton_divergence(
                kind, student_logits, teacher, labels, beta=beta, alpha=alpha,
                temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                grad_inplace=grad_inplace, requested=impl,
            )
            if out is not None:
                return out
    mask = None if labels is None else labels != ignore_index
    rows, _, _ = chunked_rows(
        student_logits, teacher, mask=mask, kind=kind, beta=beta, alpha=alpha,
        temperature=temperature, vocab_size=vocab_size, student_softcap=student_softcap,
        teacher_softcap=teacher_softcap, chunk_tokens=chunk_tokens, grad_inplace=grad_inplace,
    )
    return _reduce(rows, mask, reduction)


def _make(kind: str, doc: str):
    def fn(student_logits, teacher, labels=None, *, beta=0.5, alpha=0.1, temperature=1.0,
           ignore_index=-100, reduction="mean", impl="auto", chunk_tokens=None, **options):
        return divergence(
            kind, student_logits, teacher, labels, beta=beta, alpha=alpha, temperature=temperature,
            ignore_index=ignore_index, reduction=reduction, impl=impl, chunk_tokens=chunk_tokens,
            **options,
        )

    fn.__name__ = fn.__qualname__ = kind
    fn.__doc__ = f"{doc}\n\nSame arguments as :func:`divergence` (without ``kind``)."
    return fn


forward_kl = _make("forward_kl", "Forward KL(teacher || student); top-k: one tail bucket, gradient q - p~.")
reverse_kl = _make("reverse_kl", "Reverse KL(student || teacher); top-k: one tail bucket.")
jsd = _make("jsd", "Generalized JSD, mixture (1-beta)*q + beta*p; beta=0 forward KL, beta=1 reverse KL.")
skew_kl = _make("skew_kl", "Skew KL(p || alpha*p + (1-alpha)*q) (DistiLLM); top-k: one tail bucket.")
skew_reverse_kl = _make(
    "skew_reverse_kl", "Skew reverse KL(q || alpha*q + (1-alpha)*p) (DistiLLM); top-k: one tail bucket."
)
tvd = _make("tvd", "Total variation distance 0.5 * sum |p - q|; top-k: one tail bucket.")
