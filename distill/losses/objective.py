"""The distillation objective: CE on the labels + KD to the teacher, over response tokens only.

    loss = (ce_weight * CE_sum + kd_weight * T^2 * KD_sum) / normalizer

* ``CE_sum``: summed token cross-entropy of the student (temperature 1) on the response tokens.
* ``KD_sum``: summed per-token divergence (``kind``, at temperature T, see kernels/distill_kernels/ref.py) on the
  same tokens. The ``T^2`` factor (Hinton et al.) keeps the KD gradient's scale independent of
  T; ``scale_kd_by_t2=False`` drops it.
* ``normalizer``: the number of response tokens of the WHOLE optimiser step, over every
  micro-batch and every rank (``count_targets`` on each micro-batch's labels, summed, then
  all-reduced with SUM). Each micro-batch's loss is its token SUM divided by that one number, so
  the losses (and gradients) of all micro-batches of all ranks ADD UP to the mean over the step's
  tokens. Dividing each micro-batch by its own count instead over-weights the tokens of
  micro-batches with few response tokens. Engines that AVERAGE gradients over ranks (DDP,
  DeepSpeed) need ``loss * world_size`` (or ``normalizer / world_size``) to get the same sum, and
  DeepSpeed's ``engine.backward`` also divides by the accumulation steps unless told not to
  (``scale_wrt_gas=False``); docs/losses.md spells this out.

Labels are Hugging Face style: ``labels[b, t]`` is the token at position t (``-100`` on prompt and
padding), and the logits at position t predict token t + 1. The objective shifts the LABELS left
by one (last column ``ignore_index``); the logits are neither sliced nor copied.

Padded vocabularies: ``vocab_size`` is the tokenizer's real vocabulary. Columns beyond it (extra
embedding rows added for alignment, e.g. Qwen2.5-7B's 152,064 vs Qwen2.5-0.5B's 151,936 for a
151,665-token tokenizer) are ignored on both sides: the divergence and the CE run over views of the
first ``vocab_size`` columns, and the student's padded columns get zero gradient.

Softcap: ``student_softcap`` / ``teacher_softcap`` apply Gemma-2's final-logit softcap
``cap * tanh(x / cap)`` per side, chunk by chunk inside the loss, before the temperature (to both
CE and KD for the student). Leave them None when the model's forward already caps its logits
(transformers' Gemma-2 does when ``final_logit_softcapping`` is set in its config).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distill.losses.divergences import (
    IMPLS,
    effective_kind,
    chunked_rows,
    kernel_fallback,
    resolve_impl,
    triton_divergence,
)
from distill.losses.teacher_output import TopKTeacher


@dataclass
class LossOutput:
    """What an objective optimised on one micro-batch; the training loop sums and logs it as given.

    ``loss``: the differentiable objective (already divided by the step's normalizer, so the
    micro-batch losses add up to the step's loss). Detached: ``total``, the weighted sum that
    ``loss`` is before the division (the logged ``loss`` is the step's total over its response
    tokens); ``ce_sum`` and ``kd_sum`` (before weights and T^2); ``parts``, any further named sums the
    objective logs per response token (same keys on every rank and micro-batch); ``n_tokens``
    (response tokens in this micro-batch)."""

    loss: torch.Tensor
    ce_sum: torch.Tensor
    kd_sum: torch.Tensor
    n_tokens: torch.Tensor
    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def logged(self) -> dict[str, torch.Tensor]:
        """The named sums of the step's record, in a fixed order: total (-> ``loss``), ce, kd, parts."""
        return {"loss": self.total, "ce": self.ce_sum, "kd": self.kd_sum, **self.parts}


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """HF labels -> targets aligned with the logits rows: ``out[..., t] = labels[..., t + 1]``,
    last column ``ignore_index``. Copies only the (small, integer) labels."""
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def count_targets(labels: torch.Tensor, ignore_index: int = -100) -> int:
    """Number of response tokens (predicted positions) in HF-convention ``labels`` ``[B, L]``:
    the non-ignored labels after the shift, i.e. ``labels[..., 1:] != ignore_index``.

    Sum it over the step's micro-batches and all-reduce it over ranks to get the ``normalizer``.
    Returns a Python int (call it on the CPU labels before moving them to avoid a device sync).
    """
    return int((labels[..., 1:] != ignore_index).sum())


def step_divisor(normalizer, device):
    """The step's response-token count as the divisor: a device tensor stays one (no host sync),
    values < 1 count as 1."""
    if isinstance(normalizer, torch.Tensor):
        return normalizer.to(device=device, dtype=torch.float32).clamp_min(1.0)
    return float(max(normalizer, 1))


class DistillObjective:
    """CE + KD objective with global normalisation (see the module docstring).

    kind, beta, alpha, temperature: the divergence (kernels/distill_kernels/ref.py conventions).
    ce_weight, kd_weight: weights of the two terms; KD is also scaled by T^2 when
        ``scale_kd_by_t2`` (default True).
    impl: "auto" | "torch" | "triton" (auto = triton for CUDA logits when triton imports).
    chunk_tokens: rows per chunk of the torch path (default: ~32 MiB fp32 per [chunk x vocab]).
    vocab_size: tokenizer's real vocabulary; columns beyond it are masked out (None: all columns,
        and then teacher and student must have the same number).
    ignore_index: label value of prompt / padding positions.
    student_softcap, teacher_softcap: Gemma-2 final-logit softcap per side (None: off).
    grad_inplace: write the gradient into the student-logits buffer during the forward (torch
        path, one fused CE+KD pass). Saves a logits-sized buffer; the caller must not read the
        logits after the call.
    """

    def __init__(
        self,
        kind: str = "forward_kl",
        beta: float = 0.5,
        alpha: float = 0.1,
        temperature: float = 1.0,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        impl: str = "auto",
        chunk_tokens: int | None = None,
        vocab_size: int | None = None,
        ignore_index: int = -100,
        *,
        student_softcap: float | None = None,
        teacher_softcap: float | None = None,
        scale_kd_by_t2: bool = True,
        grad_inplace: bool = False,
    ) -> None:
        effective_kind(kind, beta)  # validates the kind
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if ce_weight < 0 or kd_weight < 0:
            raise ValueError(f"ce_weight={ce_weight} and kd_weight={kd_weight} must be >= 0")
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        for name, cap in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
            if cap is not None and cap <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {cap}")
        self.kind, self.beta, self.alpha = kind, float(beta), float(alpha)
        self.temperature = float(temperature)
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)
        self.impl, self.chunk_tokens = impl, chunk_tokens
        self.vocab_size, self.ignore_index = vocab_size, ignore_index
        self.student_softcap, self.teacher_softcap = student_softcap, teacher_softcap
        self.scale_kd_by_t2, self.grad_inplace = scale_kd_by_t2, grad_inplace

    @property
    def kd_scale(self) -> float:
        """Factor on KD_sum in the loss: kd_weight * T^2 (or kd_weight without the T^2 flag)."""
        return self.kd_weight * (self.temperature**2 if self.scale_kd_by_t2 else 1.0)

    def _check_vocab(self, student_logits, teacher) -> int:
        v_s = student_logits.shape[-1]
        vocab = self.vocab_size
        if isinstance(teacher, torch.Tensor):
            v_t = teacher.shape[-1]
            if vocab is None and v_t != v_s:
                raise ValueError(
                    f"teacher logits have {v_t} columns and student logits {v_s}: set vocab_size "
                    f"to the tokenizer's real vocabulary so the padded columns are masked"
                )
            if vocab is not None and (v_s < vocab or v_t < vocab):
                raise ValueError(
                    f"vocab_size={vocab} (tokenizer) exceeds the logits: student has {v_s} columns, "
                    f"teacher {v_t}; the models do not share this tokenizer"
                )
        elif vocab is not None and v_s < vocab:
            raise ValueError(
                f"vocab_size={vocab} (tokenizer) exceeds the student's {v_s} logit columns"
            )
        return v_s if vocab is None else vocab

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher,
        labels: torch.Tensor,
        normalizer,
    ) -> LossOutput:
        """student_logits [B, L, Vs]; teacher [B, L, Vt] logits, TopKTeacher [B, L, k] or None
        (CE only); labels [B, L] HF convention (unshifted); normalizer: response tokens of the
        whole optimiser step (int or tensor; values < 1 are treated as 1)."""
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"labels {tuple(labels.shape)} do not match student logits "
                f"{tuple(student_logits.shape)} (expected [B, L] and [B, L, V])"
            )
        vocab = self._check_vocab(student_logits, teacher)
        if isinstance(teacher, TopKTeacher) and teacher.ids.shape[:-1] != labels.shape:
            raise ValueError(
                f"top-k teacher positions {tuple(teacher.ids.shape[:-1])} do not match labels "
                f"{tuple(labels.shape)}"
            )
        targets = shift_labels(labels.to(student_logits.device), self.ignore_index)
        mask = targets != self.ignore_index
        use_kd = teacher is not None
        kd_scale = self.kd_scale if use_kd else 0.0

        kd_fast = None
        if use_kd and resolve_impl(self.impl, student_logits) == "triton":
            if self.student_softcap is not None or self.teacher_softcap is not None:
                kernel_fallback(self.impl, "distill_kernels", "softcaps are handled by the torch path only")
            else:
                t_in = teacher if isinstance(teacher, TopKTeacher) else teacher[..., :vocab]
                kd_fast = triton_divergence(
                    self.kind, student_logits[..., :vocab], t_in, targets, beta=self.beta,
                    alpha=self.alpha, temperature=self.temperature, ignore_index=self.ignore_index,
                    reduction="sum", requested=self.impl,
                )
        if kd_fast is not None:
            # KD from the kernel; CE from the chunked torch path (a second, CE-only pass).
            ce_rows_w, _, ce_rows = chunked_rows(
                student_logits, None, mask=mask, ce_labels=targets, ce_weight=self.ce_weight,
                vocab_size=vocab, chunk_tokens=self.chunk_tokens,
            )
            ce_sum_w = ce_rows_w.sum()
            total = ce_sum_w + kd_scale * kd_fast
            kd_sum = kd_fast.detach()
        else:
            # One fused pass: CE and KD rows and the combined gradient, chunk by chunk.
            rows, kd_rows, ce_rows = chunked_rows(
                student_logits, teacher, mask=mask, ce_labels=targets, kind=self.kind,
                beta=self.beta, alpha=self.alpha, temperature=self.temperature,
                kd_weight=kd_scale, ce_weight=self.ce_weight, vocab_size=vocab,
                student_softcap=self.student_softcap, teacher_softcap=self.teacher_softcap,
                chunk_tokens=self.chunk_tokens, grad_inplace=self.grad_inplace,
            )
            total = rows.sum()
            kd_sum = kd_rows.sum()
        norm = step_divisor(normalizer, total.device)
        return LossOutput(
            loss=total / norm,
            ce_sum=ce_rows.sum().detach(),
            kd_sum=kd_sum.detach() if use_kd else torch.zeros((), device=total.device),
            n_tokens=mask.sum().detach(),
            total=total.detach(),
        )

    def lean_request(self, index: torch.Tensor, targets: torch.Tensor, teacher, normalizer, ce_rows=None):
        """The lean path (:mod:`distill.losses.lean`): a :class:`~distill.losses.lean.LossRequest` for
        the student's :class:`~distill.losses.lean.LeanHead`, computing this objective on the
        supervised rows only. ``index`` [N] (flat positions) and ``targets`` [N] from
        :func:`~distill.losses.lean.supervised_rows`; ``teacher``: None, a TopKTeacher ``[N, k]`` or a
        HiddenTeacher at the same rows. ``ce_rows``: [N] bool on the rows' device, the rows CE applies to
        (None: all); the others (on-policy rows: the student wrote them) get KD only, and still count in
        the normalizer. The head's returned loss is already divided by the normalizer; :meth:`lean_output`
        turns it and the request into a :class:`LossOutput` (``ce_sum``: the CE of the rows with CE)."""
        from distill.losses.lean import LossRequest, linear_distill

        use_kd = teacher is not None
        impl = "triton" if resolve_impl(self.impl, index) == "triton" else "torch"

        def compute(rows, weight, bias):
            # divided inside: the gradients come out of the forward already scaled (one pass over the
            # [V, H] weight gradient fewer per step than scaling them in backward)
            total, kd_sum, ce_sum = linear_distill(
                rows, weight, bias, teacher, targets, kind=self.kind, beta=self.beta, alpha=self.alpha,
                temperature=self.temperature, ce_weight=self.ce_weight,
                kd_weight=self.kd_scale if use_kd else 0.0, vocab_size=self.vocab_size,
                student_softcap=self.student_softcap, teacher_softcap=self.teacher_softcap,
                chunk_tokens=self.chunk_tokens, impl=impl, requested=self.impl, ce_rows=ce_rows,
                normalizer=step_divisor(normalizer, rows.device))
            weighted = self.ce_weight * ce_sum + (self.kd_scale * kd_sum if use_kd else 0.0)
            return total, ce_sum, kd_sum, weighted

        return LossRequest(index, compute)

    @staticmethod
    def lean_output(loss: torch.Tensor, request) -> LossOutput:
        """LossOutput of a lean step: ``loss`` as the model forward returned it (under ZeRO-3 wrapped
        by its backward hooks: that tensor, not the request's own, goes to backward)."""
        ce_sum, kd_sum, weighted = request.parts
        return LossOutput(loss=loss.reshape(()), ce_sum=ce_sum, kd_sum=kd_sum,
                          n_tokens=torch.tensor(request.index.numel(), device=loss.device), total=weighted)

    def __repr__(self) -> str:
        return (
            f"DistillObjective(kind={self.kind!r}, beta={self.beta}, alpha={self.alpha}, "
            f"temperature={self.temperature}, ce_weight={self.ce_weight}, kd_weight={self.kd_weight}, "
            f"scale_kd_by_t2={self.scale_kd_by_t2}, impl={self.impl!r}, vocab_size={self.vocab_size}, "
            f"student_softcap={self.student_softcap}, teacher_softcap={self.teacher_softcap})"
        )
