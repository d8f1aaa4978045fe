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
``kd.temperature`` by the teacher, distill.teacher.output); only the student is tempered here. A
batch whose teacher temperature is not the loss's is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from distill.icldist.data import StudentExample
from distill.icldist.targets import label_kl, label_logprobs_from_topk, pad_label_ids
from distill.teacher.output import TopKTeacher


@dataclass
class BatchTargets:
    """Teacher targets of one batch, on the student's positions."""

    topk: TopKTeacher | None  # [B, L, k] at token-level rows (filler elsewhere)
    kd_rows: torch.Tensor | None  # [B, L] 1 where token-level KD applies, -100 elsewhere (a row mask)
    label_rows: torch.Tensor  # [N, 2] (batch row, position) of label-level terms
    student_label_ids: torch.Tensor  # [N, Lmax] (-1 padded)
    teacher_label_logprobs: torch.Tensor  # [N, Lmax] fp32 at `temperature`, -inf padded
    temperature: float | None = None  # the teacher's (topk and label log-probs); None when no rows

    def to(self, device) -> "BatchTargets":
        return BatchTargets(
            None if self.topk is None else self.topk.to(device),
            None if self.kd_rows is None else self.kd_rows.to(device),
            self.label_rows.to(device), self.student_label_ids.to(device), self.teacher_label_logprobs.to(device),
            self.temperature,
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
        t_mat, temperature,
    )


@dataclass
class ICLDistLossOutput:
    loss: torch.Tensor
    ce_sum: torch.Tensor
    kd_sum: torch.Tensor
    label_kd_sum: torch.Tensor
    n_tokens: torch.Tensor


class ICLDistLoss:
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

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, targets: BatchTargets, normalizer) -> ICLDistLossOutput:
        from distill.losses import divergence

        if targets.temperature is not None and targets.temperature != float(self.T):
            raise ValueError(
                f"ICLDistLoss at temperature {float(self.T)} got teacher targets at temperature "
                f"{targets.temperature}: the teacher's top-k must be taken at the loss's temperature")
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
