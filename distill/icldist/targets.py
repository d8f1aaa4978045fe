"""What the student learns from the teacher on an ICLDist prompt, and the label-level loss.

Classification (label level). The target is the teacher's distribution over the task's label words,
read at the answer position (the last prompt token) through the TEACHER tokenizer's verbalizer
(first sub-token of each ``" " + label word``, :func:`label_token_ids`). The teacher signal is its
top-k there, taken AT THE TEMPERATURE OF USE T over the teacher tokenizer's real vocabulary of V
tokens (distill.losses.teacher_output); a label token outside the top-k gets the uniform-tail estimate
``tail_mass / (V - k)`` (the mass outside the top-k spread evenly: the only unbiased guess the
top-k carries; use a k that covers the label words, the default 64 does for instruction-tuned
teachers). The label log-probs are then renormalised over the label words; for label tokens in the
top-k that is exactly the teacher's softmax at T restricted to the labels. The student's side is
its softmax at T over the same label words through the STUDENT tokenizer's verbalizer, so teacher
and student may use different tokenizers (a Llama teacher, a Qwen student); the teacher's side is
NOT tempered again. The loss is ``KL(teacher_labels || student_labels)`` (times T^2), plus a
gold-label CE on the student's full vocabulary (the answer tokens), weighted separately.

Fine-grained (token level). The target is the teacher's generated answer, with its top-k at every
answer token; the student's loss is the core top-k divergence (:mod:`distill.losses`). That needs
one vocabulary: :func:`check_token_level` refuses different tokenizers with a message that says so.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from distill.errors import UserError
from distill.losses.teacher_output import TopKTeacher
from distill.models.fingerprint import tokenizer_hash


class VocabularyMismatch(UserError, ValueError):
    """Token-level KD asked for with teacher and student tokenizers that differ."""


def tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def same_vocabulary(teacher_tok, student_tok) -> bool:
    return tokenizer_hash(teacher_tok) == tokenizer_hash(student_tok)


def check_token_level(teacher_tok, student_tok, what: str = "fine-grained tasks") -> None:
    """Raise :class:`VocabularyMismatch` unless both tokenizers map text to the same ids."""
    if same_vocabulary(teacher_tok, student_tok):
        return
    raise VocabularyMismatch(
        f"token-level KD needs teacher and student to share one vocabulary, but the teacher tokenizer "
        f"{tokenizer_name(teacher_tok)!r} ({len(teacher_tok)} tokens) differs from the student tokenizer "
        f"{tokenizer_name(student_tok)!r} ({len(student_tok)} tokens). Token-level KD with different "
        f"vocabularies is not supported ({what}). Classification tasks are distilled at label level and "
        f"work across tokenizers: set prompts.fine_grained=false (and loss.classification=label)."
    )


def label_token_ids(tokenizer, task: str, label_words: Sequence[str]) -> list[int]:
    """The evaluation's verbalizer: first sub-token of each ``" " + word``; collisions are errors."""
    from distill.icldist.tasks import verbalizer_ids

    return list(verbalizer_ids(tokenizer, task, list(label_words)))


def label_logprobs_from_topk(topk: TopKTeacher, label_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Teacher log-probs over label tokens from its top-k, renormalised over the labels.

    ``topk``: ``[N, k]`` at the answer position of N prompts, at the temperature of use (the result
    is at ``topk.temperature``, nothing is tempered here); ``label_ids``: ``[N, L]`` token ids with
    -1 padding (tasks have 2..4 labels); ``vocab_size``: the real vocabulary the top-k was taken over
    (the tail is spread over its ``V - k`` other tokens). Returns fp32 ``[N, L]``, ``-inf`` on padding.
    """
    ids = topk.ids.long()
    lp = topk.logprobs.float()
    if topk.tail_mass is not None:
        tail = topk.tail_mass.float()
    else:
        tail = (1 - lp.exp().sum(-1)).clamp(0, 1)
    k = ids.shape[-1]
    n_tail = max(vocab_size - k, 1)
    # uniform-tail estimate for label tokens outside the top-k (see module docstring)
    tail_lp = torch.log(tail.clamp_min(1e-30) / n_tail)  # [N]
    match = ids.unsqueeze(1) == label_ids.clamp_min(0).unsqueeze(-1)  # [N, L, k]
    found = match.any(-1)
    picked = torch.where(match, lp.unsqueeze(1), torch.full_like(lp.unsqueeze(1), -math.inf)).amax(-1)
    out = torch.where(found, picked, tail_lp.unsqueeze(1).expand_as(picked))
    out = out.masked_fill(label_ids < 0, -math.inf)
    return torch.log_softmax(out, dim=-1)


def label_kl(
    student_logits: torch.Tensor,
    student_label_ids: torch.Tensor,
    teacher_label_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """KL(teacher || student) over label words, at temperature T, one row per prompt.

    ``student_logits`` ``[N, V]`` (answer positions), ``student_label_ids`` ``[N, L]`` (-1 padding),
    ``teacher_label_logprobs`` ``[N, L]`` (:func:`label_logprobs_from_topk`: AT temperature T already,
    renormalised over the labels, -inf on padding). Only the student is tempered
    (``softmax(student_logits[labels] / T)``); the teacher's values are used as given (renormalised:
    the identity for exact values). No T^2 factor here (the caller applies it).
    """
    pad = student_label_ids < 0
    s = student_logits.float().gather(-1, student_label_ids.clamp_min(0)) / temperature
    s = s.masked_fill(pad, -math.inf)
    log_q = torch.log_softmax(s, dim=-1)
    log_p = torch.log_softmax(teacher_label_logprobs.float().masked_fill(pad, -math.inf), dim=-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q.masked_fill(pad, 0.0)), torch.zeros_like(p))
    per_row = terms.sum(-1)
    if reduction == "none":
        return per_row
    if reduction == "mean":
        return per_row.mean() if per_row.numel() else per_row.sum()
    return per_row.sum()


def pad_label_ids(rows: Sequence[Sequence[int]], width: int | None = None) -> torch.Tensor:
    """``[N, L]`` int64 with -1 padding."""
    width = width or max((len(r) for r in rows), default=1)
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out
