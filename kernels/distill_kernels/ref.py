"""THE reference of every distillation op: pure torch, fp32, written from the definitions.

Never optimised and never used in training. Tests, benchmarks and the torch fallback compare with
these functions; nothing else in the project defines what a divergence is.

Conventions (stated once, here)
-------------------------------
* ``p`` is the teacher distribution, ``q`` the student's, both at temperature ``T``:
  ``q = softmax(student_logits / T)``, ``p = softmax(teacher_logits / T)``.
* forward KL  = KL(p || q) = sum_v p_v (log p_v - log q_v)
* reverse KL  = KL(q || p)
* generalized JSD with ``beta`` (TRL's ``generalized_jsd_loss`` convention): the mixture is
  ``m = (1 - beta) * q + beta * p`` and ``JSD = beta * KL(p || m) + (1 - beta) * KL(q || m)``;
  ``beta = 0`` is defined as forward KL and ``beta = 1`` as reverse KL (the limits of the mixture
  form are 0, so TRL special-cases both ends, and so do we).
* skew KL (DistiLLM)         = KL(p || alpha * p + (1 - alpha) * q)
* skew reverse KL (DistiLLM) = KL(q || alpha * q + (1 - alpha) * p)
* TVD = 0.5 * sum_v |p_v - q_v|
* No T^2 factor here: the objective (distill.losses.objective) applies it when configured.
* ``labels`` only masks: rows whose label equals ``ignore_index`` contribute nothing. Labels are
  aligned with the logits rows (already shifted by the caller).
* reduction ``"mean"``: sum over the vocabulary, mean over non-ignored rows (0 when every row is
  ignored); ``"sum"``: sum over non-ignored rows; ``"none"``: one value per row, 0 on ignored rows.

Top-k teacher at temperature T
------------------------------
The teacher is given as ``topk_ids [..., k]``, ``topk_logprobs [..., k]`` and ``tail_mass [...]``:
its top-k of ``p = softmax(teacher_logits[:V] / T)`` AT THE TEMPERATURE OF USE ``T``, over the
tokenizer's real vocabulary ``[0, V)`` (padded embedding rows are not tokens: they never enter the
top-k, the log-partition or the tail), and the probability mass outside the k ids at that same
``T``. The teacher computes the tail in fp32 from its log-partition
(``exp(logsumexp(tail logits / T) - logZ_T)``), so it is exact even when the k log-probs travel in
bf16; when it is not given it is taken as ``clamp(1 - sum(exp(topk_logprobs)), 0, 1)``. The
``temperature`` argument of the top-k ops therefore tempers the STUDENT only; the teacher's values
are used as given (renormalised over the k + 1 buckets, which is the identity for exact values).

Both sides are bucketed identically into k + 1 outcomes, the k ids and one tail bucket:
``p_top = p[ids]``, ``p_tail`` = the teacher's mass outside the ids, and ``q_top = q[ids]``,
``q_tail = 1 - sum(q_top)`` computed as the student's exact mass outside the ids, with
``q = softmax(student_logits / T)``. Why this definition: the k + 1 buckets are a coarsening of the
same T-tempered vocabulary distribution on both sides, so a student equal to its teacher has
``q_b = p_b`` for every bucket and every divergence is exactly 0 at every T, k and kind (the
earlier convention tempered the teacher's T = 1 buckets as a whole, ``[p_top, p_tail] ** (1/T)``,
which is not the bucketing of the tempered vocabulary distribution: copying the teacher was not the
optimum at T != 1). A teacher's top-k is only valid at the temperature it was computed at; callers
(distill.losses) refuse a mismatch.

Every divergence, forward KL included, is taken over the k + 1 outcomes, the tail being one bucket
on both sides: each is then a true divergence between the two coarsened distributions (>= 0, and 0
with a zero gradient when the student equals the teacher). Forward KL over the k ids alone (no tail
term, as before) is not: it is negative for a student that moves its tail mass onto the k ids
(``q_top = p_top / M`` gives ``M log M < 0``, ``M = sum p_top``), and its gradient at equality is
``(M - 1) p`` on the ids, so copying the teacher was not its optimum. With the tail bucket, forward
KL's gradient w.r.t. the tempered student logits is exactly ``q - p~``, where ``p~`` is the teacher
on its k ids and its tail mass spread over the other tokens in proportion to ``q``.
With ``k`` equal to the vocabulary the tail is empty on both sides and every top-k divergence equals
its full-vocabulary form.
"""

from __future__ import annotations

import torch

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")

# Floor for log() of a probability that may be exactly 0 (an empty tail bucket). A term whose
# leading probability is 0 contributes 0 regardless (0 * log 0 = 0).
_TINY = 1e-30


def _xlogy_ratio(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a * (log a - log b), with the convention 0 * anything = 0.

    The logs are zeroed where ``a == 0`` before the product so that autograd never forms
    ``0 * (-inf - -inf)`` (an empty tail bucket would otherwise give NaN gradients).
    """
    pos = a > 0
    zero = torch.zeros_like(a)
    diff = torch.where(pos, log_a, zero) - torch.where(pos, log_b, zero)
    return torch.where(pos, a * diff, zero)


def _kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Elementwise a * (log a - log b) from log-probabilities."""
    return _xlogy_ratio(log_a.exp(), log_a, log_b)


def _divergence_from_logprobs(
    log_q: torch.Tensor, log_p: torch.Tensor, kind: str, beta: float, alpha: float
) -> torch.Tensor:
    """Per-row divergence between two distributions given by log-probs over the last dim."""
    q, p = log_q.exp(), log_p.exp()
    if kind == "jsd":
        if beta == 0.0:
            kind = "forward_kl"
        elif beta == 1.0:
            kind = "reverse_kl"
    if kind == "forward_kl":
        terms = _kl_terms(log_p, log_q)
    elif kind == "reverse_kl":
        terms = _kl_terms(log_q, log_p)
    elif kind == "jsd":
        m = (1.0 - beta) * q + beta * p
        log_m = m.clamp_min(_TINY).log()
        terms = beta * _kl_terms(log_p, log_m) + (1.0 - beta) * _kl_terms(log_q, log_m)
    elif kind == "skew_kl":
        m = alpha * p + (1.0 - alpha) * q
        terms = _kl_terms(log_p, m.clamp_min(_TINY).log())
    elif kind == "skew_reverse_kl":
        m = alpha * q + (1.0 - alpha) * p
        terms = _kl_terms(log_q, m.clamp_min(_TINY).log())
    elif kind == "tvd":
        terms = 0.5 * (p - q).abs()
    else:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")
    return terms.sum(-1)


def _reduce(per_row: torch.Tensor, labels, ignore_index: int, reduction: str) -> torch.Tensor:
    if labels is None:
        mask = torch.ones_like(per_row, dtype=torch.bool)
    else:
        mask = labels.reshape(per_row.shape) != ignore_index
    per_row = torch.where(mask, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum().clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}; expected mean, sum or none")


def kd_div_ref(
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
) -> torch.Tensor:
    """Divergence between student and a full-vocabulary teacher. Shapes [..., V]; fp32 math."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    vocab = student_logits.shape[-1]
    log_q = torch.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    per_row = _divergence_from_logprobs(log_q, log_p, kind, beta, alpha)
    return _reduce(per_row, labels, ignore_index, reduction)


def topk_bucket_logprobs(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_mass: torch.Tensor | None,
    temperature: float,
):
    """(log q over k+1 buckets, log p over k+1 buckets), rows flattened.

    The teacher's values are at the temperature of use already; only the student is tempered.
    """
    vocab = student_logits.shape[-1]
    k = topk_ids.shape[-1]
    s = student_logits.float().reshape(-1, vocab) / temperature
    ids = topk_ids.reshape(-1, k).long()
    lp = topk_logprobs.float().reshape(-1, k)
    if tail_mass is None:
        tail = (1.0 - lp.exp().sum(-1)).clamp(0.0, 1.0)
    else:
        tail = tail_mass.float().reshape(-1).clamp(0.0, 1.0)
    # Teacher: its k + 1 buckets as given (renormalised: the identity for exact values).
    log_tail = torch.where(tail > 0, tail.clamp_min(_TINY).log(), torch.full_like(tail, -float("inf")))
    log_p = torch.log_softmax(torch.cat([lp, log_tail[:, None]], dim=-1), dim=-1)
    # Student: exact tempered mass on the k ids and outside them.
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    log_q_top = s.gather(-1, ids) - lse
    in_top = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, ids, True)
    # The k ids are filled with the most negative finite float, not -inf: when k == V the tail is
    # empty, its mass is exactly 0 either way, and logsumexp's gradient stays finite.
    log_q_tail = torch.logsumexp(s.masked_fill(in_top, torch.finfo(s.dtype).min), dim=-1, keepdim=True) - lse
    log_q = torch.cat([log_q_top, log_q_tail], dim=-1)
    return log_q, log_p


def topk_of_logits_ref(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0,
                       vocab_size: int | None = None):
    """(ids, logprobs, tail_mass) of ``softmax(teacher_logits[..., :vocab_size] / T)``: the teacher
    side of the convention above, written from the definition (fp32)."""
    vocab = teacher_logits.shape[-1] if vocab_size is None else vocab_size
    logp = torch.log_softmax(teacher_logits[..., :vocab].float() / temperature, dim=-1)
    lp, ids = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, ids, -float("inf")).logsumexp(-1).exp()  # the mass outside the ids
    return ids, lp, tail


def topk_kd_ref(
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
) -> torch.Tensor:
    """Divergence between the student and a top-k teacher (see the module docstring for the tail)."""
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"top-k ids {tuple(topk_ids.shape)} / log-probs {tuple(topk_logprobs.shape)} do not "
            f"match student logits {tuple(student_logits.shape)}"
        )
    log_q, log_p = topk_bucket_logprobs(student_logits, topk_ids, topk_logprobs, tail_mass, temperature)
    per_row = _divergence_from_logprobs(log_q, log_p, kind, beta, alpha)
    return _reduce(per_row, labels, ignore_index, reduction)


def fused_linear_kd_ref(
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
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    vocab_size: int | None = None,
    return_parts: bool = False,
):
    """``ce_weight * CE + kd_weight * KD`` of the student logits ``hidden @ lm_head[:V].T``.

    ``V = vocab_size`` (default: the student head's rows): the first ``V`` rows of the student
    head and of a full teacher's head are used (the heads may have more rows, padded embedding
    rows that are not tokens, and need not have the same number). ``teacher`` is either a tuple
    ``(teacher_hidden, teacher_lm_head)`` (full logits), an object with ``.ids``, ``.logprobs``
    and ``.tail_mass`` (a top-k teacher, ids in ``[0, V)``), or None (no KD term; only with
    ``kd_weight == 0``). KD is the divergence of ``kd_div_ref`` / ``topk_kd_ref`` at
    ``temperature`` (no ``T^2``); CE is the student's token cross-entropy at T = 1 (not
    tempered), ``-log_softmax(s)[label]``, on ``labels`` (required when ``ce_weight != 0``).
    Rows whose label is ``ignore_index`` contribute nothing to either term; ``"mean"`` divides the
    weighted sum by the number of counted rows (``max(1, .)``), ``"sum"`` does not, ``"none"``
    gives the weighted per-row values. With ``return_parts`` returns ``(loss, kd_sum, ce_sum)``:
    the detached sums over counted rows before weights (0 for a term not computed).
    """
    vocab = student_lm_head.shape[0] if vocab_size is None else vocab_size
    if vocab > student_lm_head.shape[0]:
        raise ValueError(f"vocab_size={vocab} exceeds the student lm_head's "
                         f"{student_lm_head.shape[0]} rows")
    hidden = student_hidden.float().reshape(-1, student_hidden.shape[-1])
    s = hidden @ student_lm_head[:vocab].float().t()
    lab = None if labels is None else labels.reshape(-1)
    zero_rows = torch.zeros(s.shape[0], dtype=torch.float32, device=s.device)
    kw = dict(kind=kind, beta=beta, alpha=alpha, temperature=temperature,
              ignore_index=ignore_index, reduction="none")
    if teacher is None:
        if kd_weight != 0:
            raise ValueError("teacher=None needs kd_weight=0")
        kd_rows = zero_rows
    elif isinstance(teacher, tuple):
        t_hidden, t_head = teacher
        if t_head.shape[0] < vocab:
            raise ValueError(f"teacher lm_head has {t_head.shape[0]} rows < vocab_size={vocab}")
        t = t_hidden.float().reshape(-1, t_hidden.shape[-1]) @ t_head[:vocab].float().t()
        kd_rows = kd_div_ref(s, t, lab, **kw)
    else:
        k = teacher.ids.shape[-1]
        tail = None if teacher.tail_mass is None else teacher.tail_mass.reshape(-1)
        kd_rows = topk_kd_ref(s, teacher.ids.reshape(-1, k), teacher.logprobs.reshape(-1, k),
                              tail, lab, **kw)
    if ce_weight != 0:
        if lab is None:
            raise ValueError("ce_weight != 0 needs labels (the CE targets)")
        counted = lab != ignore_index
        target = torch.where(counted, lab, torch.zeros_like(lab)).long()
        log_q1 = torch.log_softmax(s, dim=-1)  # T = 1
        ce_rows = -log_q1.gather(-1, target[:, None])[:, 0]
        ce_rows = torch.where(counted, ce_rows, zero_rows)
    else:
        ce_rows = zero_rows
    per_row = kd_weight * kd_rows + ce_weight * ce_rows
    loss = _reduce(per_row, lab, ignore_index, reduction)
    if return_parts:
        return loss, kd_rows.sum().detach(), ce_rows.sum().detach()
    return loss


def assert_close_to_ref(out, ref_in_dtype, ref_fp32, *, atol: float | None = None, name: str = "output"):
    """Flash-attention's tolerance rule, the one helper every test uses:
    ``|out - ref_fp32| <= 2 * |ref_in_dtype - ref_fp32| + atol``.

    ``ref_in_dtype`` is the reference run on inputs in the dtype under test (its own rounding error
    sets the bar); ``atol`` defaults to 1e-4 of the largest reference element.
    """
    out = out.float()
    ref_fp32 = ref_fp32.float()
    ref_in_dtype = ref_in_dtype.float()
    if atol is None:
        # Relative to the largest reference element: gradients of a mean over rows x vocab are
        # ~1/(rows*vocab) each, and a fixed absolute floor would let any error through.
        scale = float(ref_fp32.abs().max()) if ref_fp32.numel() else 0.0
        atol = 1e-4 * scale if scale > 0 else 1e-12
    err = (out - ref_fp32).abs()
    bound = 2 * (ref_in_dtype - ref_fp32).abs() + atol
    bad = err > bound
    if bool(bad.any()):
        idx = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements out of tolerance; first at flat index "
            f"{idx}: got {float(out.flatten()[idx])}, ref_fp32 {float(ref_fp32.flatten()[idx])}, "
            f"bound {float(bound.flatten()[idx])}; max err {float(err.max())}"
        )
