"""ICLDist prompts -> token sequences for the teacher and the student, and the collate function.

Per prompt ``i`` (index in the prompt set):

* teacher request: ``seq`` (teacher token ids) and ``pos`` (logit positions whose top-k is wanted):
  classification -> the prompt alone, ``pos = [len(prompt) - 1]`` (the answer's first token);
  fine-grained   -> prompt + the teacher's generated answer, one position per answer token.
* student sequence: prompt + answer (classification: the gold answer; fine-grained: the teacher's
  answer, the same ids since token-level KD needs one vocabulary) with HF-convention ``labels``
  (-100 on the prompt), and ``kd_pos``, the student logit positions matching the teacher's ``pos``.

Sequences longer than ``max_seq_len`` lose tokens from the LEFT (the oldest demonstrations go first;
the answer and the query are kept). Prompts are encoded as the evaluation encodes them
(:func:`encode_prompt`), so the student is trained on the inputs it is scored on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from distill.icldist.prompts import Prompt


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids as the SentiBench evaluator feeds them (the tokenizer's own special tokens)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_answer(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class TeacherRequest:
    seq: list[int]
    pos: list[int]


@dataclass
class StudentExample:
    index: int  # prompt index (``example_id`` in batches)
    input_ids: list[int]
    labels: list[int]  # -100 on the prompt
    kd_pos: list[int]  # logit positions aligned with the teacher's rows
    label_ids: list[int] = field(default_factory=list)  # classification: student verbalizer ids
    gold: int = -1


def _left_cut(prompt: list[int], answer: list[int], max_len: int, keep_first: bool) -> list[int]:
    """Drop prompt tokens from the left (after a leading BOS when ``keep_first``) to fit ``max_len``."""
    over = len(prompt) + len(answer) - max_len
    if over <= 0:
        return prompt
    head = prompt[:1] if keep_first else []
    body = prompt[len(head):]
    if over >= len(body):
        raise ValueError(f"answer of {len(answer)} tokens does not fit max_seq_len={max_len}")
    return head + body[over:]


def teacher_request(prompt: Prompt, tokenizer, answer_ids: Sequence[int] | None, max_len: int) -> TeacherRequest:
    p = encode_prompt(tokenizer, prompt.prompt)
    bos = tokenizer.bos_token_id
    if prompt.kind == "classification":
        p = _left_cut(p, [None], max_len, bool(p) and p[0] == bos)
        return TeacherRequest(p, [len(p) - 1])
    a = list(answer_ids or [])
    if not a:
        raise ValueError(f"prompt {prompt.id}: fine-grained prompt without a teacher answer")
    p = _left_cut(p, a, max_len, bool(p) and p[0] == bos)
    return TeacherRequest(p + a, list(range(len(p) - 1, len(p) - 1 + len(a))))


def student_example(
    index: int, prompt: Prompt, tokenizer, answer_ids: Sequence[int] | None, max_len: int, label_ids: Sequence[int] = ()
) -> StudentExample:
    p = encode_prompt(tokenizer, prompt.prompt)
    bos = tokenizer.bos_token_id
    if prompt.kind == "classification":
        a = encode_answer(tokenizer, prompt.answer)
        if label_ids and a[0] != label_ids[prompt.gold]:
            # A tokenizer that merges the label word with what follows (pstance's "against(...")
            # would make the CE target differ from what the evaluation scores: train the
            # verbalizer's token first, then the rest of the answer as the tokenizer writes it.
            a = [label_ids[prompt.gold]] + encode_answer(tokenizer, prompt.answer[len(" " + prompt.label_words[prompt.gold]):])
    else:
        a = list(answer_ids or [])
    p = _left_cut(p, a, max_len, bool(p) and p[0] == bos)
    ids = p + a
    labels = [-100] * len(p) + a
    if prompt.kind == "classification":
        kd_pos = [len(p) - 1]
    else:
        kd_pos = list(range(len(p) - 1, len(p) - 1 + len(a)))
    return StudentExample(index, ids, labels, kd_pos, list(label_ids), prompt.gold)


def collate(examples: Sequence[StudentExample], pad_id: int) -> dict:
    """Right-padded batch: input_ids, attention_mask, labels, example_id (prompt indices)."""
    width = max(len(e.input_ids) for e in examples)
    n = len(examples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        L = len(e.input_ids)
        ids[i, :L] = torch.tensor(e.input_ids)
        mask[i, :L] = 1
        labels[i, :L] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "example_id": torch.tensor([e.index for e in examples], dtype=torch.long)}
