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
