"""Length-bucketed batch plans shared by the evaluator and the teachers (no torch needed)."""

from __future__ import annotations

from typing import Sequence


def plan_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None, extra: int = 0) -> list[list[int]]:
    """Indices grouped into batches, longest first; a batch holds at most ``batch_size`` prompts and
    (padded length + ``extra``) x rows <= ``max_batch_tokens`` (a single over-long prompt runs alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = (lengths[cur[0]] if cur else lengths[i]) + extra
        if cur and (len(cur) >= batch_size or (max_batch_tokens and (len(cur) + 1) * width > max_batch_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


# The forward's input keys of a training batch (packed batches add flash-attention's varlen bounds).
FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                "max_length_k")


def model_inputs(batch: dict) -> dict:
    """The forward's inputs of a training batch: ``input_ids`` and, when the batch has them,
    ``attention_mask`` (absent in packed batches: transformers then keeps packed examples apart from
    the ``position_ids``, distill.data.packing) and flash-attention's varlen bounds of packed batches."""
    return {k: batch[k] for k in FORWARD_KEYS if batch.get(k) is not None}


def batch_tokens(batch: dict):
    """Real (non-pad) tokens of a batch: ``n_tokens`` of a packed batch, else the attention mask's sum."""
    return batch["n_tokens"] if "n_tokens" in batch else batch["attention_mask"].sum()
