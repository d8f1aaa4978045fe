"""Sequence packing: a micro-batch's examples laid end to end in as few rows as possible.

``pack_collate(items, pad_id, max_len)`` takes the same items as :func:`distill.data.sft.collate`
and returns a batch whose forward gives every example exactly its unpacked logits, and whose
labels give the objective exactly the unpacked targets (same ``count_targets``, same CE/KD sums).
Rows hold at most ``max(max_len, longest item)`` tokens (first-fit decreasing). Per row::

    input_ids     a0 a1 a2 b0 b1 | pad pad          (pad tail: pad_id)
    position_ids   0  1  2  0  1 |   0   1          (restart at 0 at each example AND at the pad tail)
    labels       -100 .. ..-100 .. | -100 -100      (each example's first label masked)

Contract for the forward (student and teacher): pass ``position_ids`` and ``use_cache=False`` and NO
attention mask (any 2-D mask switches off transformers' packed-sequence detection and lets a row's
examples attend to each other); with flash attention and more than one row, also pass
:func:`flash_attn_kwargs`. ``pack_index[i] = (row, offset, length)`` locates item i in the layout.
Why each rule holds (transformers 5.x internals, pad positions, labels): see docs/packing.md.
"""

from __future__ import annotations

from distill.data.sft import IGNORE_INDEX


def plan_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: item indices per row, each row's total length <= ``capacity``.

    Ties keep item order (stable sort), so the plan depends only on the lengths; within a row,
    items are listed in their original order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for r, left in enumerate(free):
            if n <= left:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return [sorted(r) for r in rows]


def pack_collate(items: list[dict], pad_id: int, max_len: int) -> dict:
    """Pack ``items`` (dicts with ``input_ids`` and ``labels`` lists) into rows of at most
    ``max(max_len, longest item)`` tokens (see the module docstring).

    Returns ``input_ids``, ``labels``, ``position_ids`` LongTensors [R, W] (W: the fullest row),
    ``n_tokens`` (int, real tokens), ``pack_index`` (per item: (row, offset, length)) and every
    other key of the items as a list in item order. There is deliberately no ``attention_mask``.
    """
    import torch

    if not items:
        raise ValueError("pack_collate: the micro-batch is empty")
    if max_len < 1:
        raise ValueError(f"pack_collate: max_len must be >= 1, got {max_len}")
    lengths = []
    for i, it in enumerate(items):
        n, m = len(it["input_ids"]), len(it["labels"])
        if n == 0 or n != m:
            raise ValueError(f"pack_collate: item {i} has {n} input_ids and {m} labels "
                             "(expected the same, non-zero, number)")
        lengths.append(n)
    capacity = max(max_len, max(lengths))
    plan = plan_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in plan)

    ids = torch.full((len(plan), width), pad_id, dtype=torch.long)
    labels = torch.full((len(plan), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.empty((len(plan), width), dtype=torch.long)
    index: list[tuple[int, int, int] | None] = [None] * len(items)
    for r, row in enumerate(plan):
        off = 0
        for i in row:
            n = lengths[i]
            ids[r, off:off + n] = torch.as_tensor(items[i]["input_ids"], dtype=torch.long)
            labels[r, off:off + n] = torch.as_tensor(items[i]["labels"], dtype=torch.long)
            # Nothing predicts an example's first token unpacked; packed, the previous example would.
            labels[r, off] = IGNORE_INDEX
            pos[r, off:off + n] = torch.arange(n)
            index[i] = (r, off, n)
            off += n
        pos[r, off:] = torch.arange(width - off)  # the pad tail: a sequence of its own (>= 0)

    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "n_tokens": sum(lengths),
             "pack_index": index}
    for k in items[0]:
        if k not in batch and k != "attention_mask":  # a mask would switch packing detection off
            batch[k] = [it.get(k) for it in items]
    return batch


def flash_attn_kwargs(batch: dict) -> dict:
    """``cu_seq_lens_q/k`` (int32, over the flattened [R * W] tokens; the pad tail of a row is a
    sequence of its own) and ``max_length_q/k`` (ints) for transformers' flash-attention varlen
    path; needed there when the batch has more than one row (module docstring)."""
    import torch

    rows, width = batch["input_ids"].shape
    starts: list[list[int]] = [[] for _ in range(rows)]
    for r, off, _ in batch["pack_index"]:
        starts[r].append(off)
    cu, longest = [], 0
    for r in range(rows):
        used = sum(n for rr, _, n in batch["pack_index"] if rr == r)
        bounds = sorted(starts[r]) + ([used] if used < width else [])
        for a, b in zip(bounds, bounds[1:] + [width]):
            cu.append(r * width + a)
            longest = max(longest, b - a)
    cu.append(rows * width)
    t = torch.tensor(cu, dtype=torch.int32, device=batch["input_ids"].device)
    return {"cu_seq_lens_q": t, "cu_seq_lens_k": t, "max_length_q": longest, "max_length_k": longest}


def packing_stats(batch: dict) -> dict:
    """rows, width, tokens (real) and fill (real tokens / (rows * width)) of a packed batch."""
    rows, width = batch["input_ids"].shape
    return {"rows": rows, "width": width, "tokens": batch["n_tokens"],
            "fill": batch["n_tokens"] / (rows * width)}
