"""The ICLDist objective on a batch: gold CE + token-level top-k KD + label-level KL.

    loss = (ce_weight * CE_sum + kd_weight * T^2 * KD_sum + label_kd_weight * T^2 * LKD_sum) / normalizer

* ``CE_sum``: the student's token CE on the answer tokens (classification: the gold answer;
  fine-grained: the teacher's answer), through the core :class:`DistillObjective` (teacher None).
* ``KD_sum``: the core top-k divergence (``loss.kind``) at the fine-grained answer positions (and
  the classification answer position when ``loss.classification="token"``), teacher = the
  :class:`TopKTeacher` rows placed at the student's logit positions.
* ``LKD_sum``: :func:`distill.icldist.targets.label_kl`, one term per classification prompt.
* ``normalizer``: answer tokens of the whole optimiser step (all micro-batches, all ranks), the core
  convention, so micro-batch losses add up.

The teacher's top-k, and so its label log-probs, are at the temperature of use T already (taken at
``kd.temperature`` by the teacher, distill.losses.teacher_output); only the student is tempered here. A
batch whose teacher temperature is not the loss's is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from distill.icldist.data import StudentExample
from distill.icldist.targets import label_kl, label_logprobs_from_topk, pad_label_ids
from distill.losses.teacher_output import TopKTeacher


@dataclass
class BatchTargets:
    """Teacher targets of one batch, on the student's positions."""

    topk: TopKTeacher | None  # [B, L, k] at token-level rows (filler elsewhere)
    kd_rows: torch.Tensor | None  # [B, L] 1 where token-level KD applies, -100 elsewhere (a row mask)
    label_rows: torch.Tensor  # [N, 2] (batch row, position) of label-level terms
    student_label_ids: torch.Tensor  # [N, Lmax] (-1 padded)
    teacher_label_logprobs: torch.Tensor  # [N, Lmax] fp32 at `temperature`, -inf padded
    temperature: float | None = None  # the teacher's (topk and label log-probs); None when no rows
    batch_shape: tuple[int, int] = (0, 0)  # (B, L) of the batch: flat position = row * L + position

    def to(self, device) -> "BatchTargets":
        return BatchTargets(
            None if self.topk is None else self.topk.to(device),
            None if self.kd_rows is None else self.kd_rows.to(device),
            self.label_rows.to(device), self.student_label_ids.to(device), self.teacher_label_logprobs.to(device),
            self.temperature, self.batch_shape,
        )


def assemble(
    examples: Sequence[StudentExample],
    kinds: Sequence[str],
    topks: Sequence[TopKTeacher],
    seq_len: int,
    *,
    teacher_label_ids: Sequence[Sequence[int]],
    teacher_vocab: int,
    classification: str = "label",
) -> BatchTargets:
    """Place each example's teacher rows (``topks[i]`` ``[P_i, k]``) on its student positions.

    Every ``topks[i]`` must be at the same temperature, which the result keeps (its filler rows too).
    """
    n = len(examples)
    temps = sorted({t.temperature for t in topks})
    if len(temps) > 1:
        raise ValueError(f"the teacher's top-k of one batch mixes temperatures {temps} (one run, one kd.temperature)")
    temperature = temps[0] if temps else None
    token_level = [kind == "fine-grained" or classification == "token" for kind in kinds]
    topk = kd_rows = None
    if any(token_level):
        k = next(t.k for t, tl in zip(topks, token_level) if tl)
        ids = torch.arange(k, dtype=torch.int32).expand(n, seq_len, k).clone()
        lp = torch.full((n, seq_len, k), -float(torch.log(torch.tensor(float(k)))), dtype=torch.float32)
        tail = torch.zeros((n, seq_len), dtype=torch.float32)
        kd_rows = torch.full((n, seq_len), -100, dtype=torch.long)
        for b, (ex, t, tl) in enumerate(zip(examples, topks, token_level)):
            if not tl:
                continue
            if t.ids.shape[0] != len(ex.kd_pos):
                raise ValueError(
                    f"prompt {ex.index}: teacher gave {t.ids.shape[0]} top-k rows for {len(ex.kd_pos)} answer positions"
                )
            pos = torch.tensor(ex.kd_pos)
            ids[b, pos] = t.ids.to(torch.int32)
            lp[b, pos] = t.logprobs.float()
            tail[b, pos] = t.tail_mass.float() if t.tail_mass is not None else (1 - t.logprobs.float().exp().sum(-1)).clamp(0, 1)
            kd_rows[b, pos] = 1
        topk = TopKTeacher(ids=ids, logprobs=lp, tail_mass=tail, temperature=temperature)
    rows, s_ids, t_lp = [], [], []
    for b, (ex, kind, t, tl) in enumerate(zip(examples, kinds, topks, token_level)):
        if kind != "classification" or tl:
            continue
        rows.append((b, ex.kd_pos[0]))
        s_ids.append(ex.label_ids)
        t_ids = pad_label_ids([teacher_label_ids[b]])
        t_lp.append(label_logprobs_from_topk(t[:1], t_ids, teacher_vocab)[0])
    width = max([len(x) for x in s_ids], default=1)
    t_mat = torch.full((len(rows), width), -float("inf"))
    for i, row in enumerate(t_lp):
        t_mat[i, : row.numel()] = row
    return BatchTargets(
        topk, kd_rows,
        torch.tensor(rows, dtype=torch.long).reshape(-1, 2),
        pad_label_ids(s_ids, width) if s_ids else torch.empty((0, width), dtype=torch.long),
        t_mat, temperature, (n, seq_len),
    )


@dataclass
class ICLDistLossOutput:
    loss: torch.Tensor
    ce_sum: torch.Tensor
    kd_sum: torch.Tensor
    label_kd_sum: torch.Tensor
    n_tokens: torch.Tensor


class ICLDistLoss:
    """The ICLDist objective, handed to the training loop by the ICLDist stage.

    Both paths: ``kd.path=lean`` (:meth:`lean_request`: the loss inside the student's lm_head from
    the hidden states of the supervised rows; the label-level term needs only the head rows of the
    label words, the token-level KD only its rows) and ``kd.path=logits`` (:meth:`__call__` on the
    full logits). Each returns the optimised total with its parts (``token_kd``, ``label_kd``), which
    the loop sums over the step with its one all-reduce and logs per response token.
    """

    ignore_index = -100

    def __init__(self, kind="forward_kl", beta=0.5, alpha=0.1, temperature=1.0, kd_weight=1.0,
                 label_kd_weight=1.0, ce_weight=1.0, vocab_size=None, impl="auto"):
        from distill.losses.objective import DistillObjective

        self.kind, self.beta, self.alpha, self.T = kind, beta, alpha, temperature
        self.kd_weight, self.label_kd_weight, self.ce_weight = kd_weight, label_kd_weight, ce_weight
        self.vocab_size, self.impl = vocab_size, impl
        self.ce = DistillObjective(kind=kind, ce_weight=ce_weight, kd_weight=0.0, vocab_size=vocab_size, impl=impl)

    @classmethod
    def from_config(cls, loss_cfg, vocab_size=None) -> "ICLDistLoss":
        return cls(loss_cfg.kind, loss_cfg.beta, loss_cfg.alpha, loss_cfg.temperature, loss_cfg.kd_weight,
                   loss_cfg.label_kd_weight, loss_cfg.ce_weight, vocab_size)

    def _check_temperature(self, targets: BatchTargets) -> None:
        if targets.temperature is not None and targets.temperature != float(self.T):
            raise ValueError(
                f"ICLDistLoss at temperature {float(self.T)} got teacher targets at temperature "
                f"{targets.temperature}: the teacher's top-k must be taken at the loss's temperature")

    # -- the training loop's objective protocol ----------------------------------------------------------
    def _output(self, loss, ce_sum, kd_sum, lkd_sum, n_tokens):
        """The LossOutput of one micro-batch: the optimised total and its named parts (``kd``: both KD
        terms before their weights; ``token_kd`` and ``label_kd``: each term)."""
        from distill.losses.objective import LossOutput

        kd_sum, lkd_sum = kd_sum.detach(), lkd_sum.detach()
        t2 = self.T * self.T
        total = self.ce_weight * ce_sum.detach() + self.kd_weight * t2 * kd_sum + self.label_kd_weight * t2 * lkd_sum
        return LossOutput(loss, ce_sum, kd_sum + lkd_sum, n_tokens, total=total,
                          parts={"label_kd": lkd_sum, "token_kd": kd_sum})

    def __call__(self, logits, targets: BatchTargets, labels, normalizer):
        """``kd.path=logits``: the trainer's call on the full logits."""
        out = self.compute(logits, labels, targets, normalizer)
        return self._output(out.loss, out.ce_sum, out.kd_sum, out.label_kd_sum, out.n_tokens)

    def lean_request(self, index: torch.Tensor, targets_tok: torch.Tensor, targets: BatchTargets, normalizer,
                     ce_rows=None):
        """``kd.path=lean``: ``index`` [N] flat supervised positions, ``targets_tok`` [N] their tokens;
        ``targets`` the batch's teacher targets (the ICLDist backend's ``rows`` returns them whole).
        Inside the head, one pass over the N rows: CE on all, top-k KD on the token-level ones (a row
        mask); the label-level KL from the label words' head rows at the classification positions; no
        [rows x V] logits and no host sync. ``ce_rows`` (the objectives' on-policy row mask) must be None:
        ICLDist has no on-policy rows; the keyword lets the loop pass it to every objective alike."""
        from distill.losses.divergences import resolve_impl
        from distill.losses.lean import LossRequest, linear_distill, topk_rows

        if ce_rows is not None:
            raise ValueError("ICLDist trains on its prompt set only: no on-policy rows (ce_rows must be None)")
        self._check_temperature(targets)
        dev = index.device
        teacher = kd_rows = None
        if targets.topk is not None and self.kd_weight:
            # the teacher's rows at every supervised position (filler where KD does not apply) and the
            # mask of the token-level ones: one pass with CE, no device-side nonzero
            teacher = topk_rows(targets.topk.to(dev), index)
            kd_rows = targets.kd_rows.to(dev).reshape(-1).index_select(0, index) != -100
        lab_sel = None
        if targets.label_rows.numel() and self.label_kd_weight:
            # flat position -> its row among the supervised ones; every label position is a supervised
            # one by construction (distill.icldist.data.student_example)
            n_rows, seq_len = targets.batch_shape
            where = torch.full((n_rows * seq_len,), -1, dtype=torch.long, device=dev)
            where[index] = torch.arange(index.numel(), device=dev)
            r = targets.label_rows.to(dev)
            lab_sel = where[r[:, 0] * seq_len + r[:, 1]]
        t2 = self.T * self.T
        impl = "triton" if resolve_impl(self.impl, index) == "triton" else "torch"  # as DistillObjective.lean_request

        def compute(rows, weight, bias):
            total, kd_sum, ce_sum = linear_distill(
                rows, weight, bias, teacher, targets_tok, kind=self.kind, beta=self.beta, alpha=self.alpha,
                temperature=self.T, vocab_size=self.vocab_size, ce_weight=self.ce_weight,
                kd_weight=self.kd_weight * t2, kd_rows=kd_rows,
                impl=impl, requested=self.impl)
            lkd_sum = total.new_zeros(())
            if lab_sel is not None:
                ids = targets.student_label_ids.to(dev)
                w_lab = weight[ids.clamp_min(0)]  # [N, Lmax, H]: the label words' head rows only
                s_lab = torch.einsum("nh,nlh->nl", rows.index_select(0, lab_sel).to(w_lab.dtype), w_lab)
                if bias is not None:
                    s_lab = s_lab + bias[ids.clamp_min(0)]
                pos = torch.arange(ids.shape[1], device=dev).expand_as(ids)
                lkd_sum = label_kl(s_lab, torch.where(ids < 0, -1, pos), targets.teacher_label_logprobs.to(dev),
                                   temperature=self.T, reduction="sum")
                total = total + self.label_kd_weight * t2 * lkd_sum
            norm = torch.as_tensor(normalizer, dtype=torch.float32, device=dev).clamp_min(1)
            return total / norm, ce_sum, kd_sum, lkd_sum.detach()

        return LossRequest(index, compute)

    def lean_output(self, loss, request):
        ce_sum, kd_sum, lkd_sum = request.parts
        n = torch.tensor(request.index.numel(), device=loss.device)
        return self._output(loss.reshape(()), ce_sum, kd_sum, lkd_sum, n)

    # -- the loss on full logits ---------------------------------------------------------------------
    def compute(self, logits: torch.Tensor, labels: torch.Tensor, targets: BatchTargets, normalizer) -> ICLDistLossOutput:
        from distill.losses import divergence

        self._check_temperature(targets)
        ce = self.ce(logits, None, labels, normalizer)
        norm = torch.as_tensor(normalizer, dtype=torch.float32, device=logits.device).clamp_min(1)
        zero = logits.new_zeros((), dtype=torch.float32)
        kd_sum = zero
        if targets.topk is not None and self.kd_weight:
            kd_sum = divergence(
                self.kind, logits, targets.topk.to(logits.device), targets.kd_rows.to(logits.device),
                beta=self.beta, alpha=self.alpha, temperature=self.T, reduction="sum", impl=self.impl,
                vocab_size=self.vocab_size,
            )
        lkd_sum = zero
        if targets.label_rows.numel() and self.label_kd_weight:
            r = targets.label_rows.to(logits.device)
            rows = logits[r[:, 0], r[:, 1]]
            lkd_sum = label_kl(rows, targets.student_label_ids.to(logits.device),  # teacher side at T already
                               targets.teacher_label_logprobs.to(logits.device), temperature=self.T, reduction="sum")
        t2 = self.T * self.T
        loss = ce.loss + (self.kd_weight * t2 * kd_sum + self.label_kd_weight * t2 * lkd_sum) / norm
        return ICLDistLossOutput(loss, ce.ce_sum, kd_sum.detach(), lkd_sum.detach(), ce.n_tokens)

    def __repr__(self) -> str:
        return (f"ICLDistLoss(kind={self.kind}, T={self.T}, ce_weight={self.ce_weight}, kd_weight={self.kd_weight}, "
                f"label_kd_weight={self.label_kd_weight})")
