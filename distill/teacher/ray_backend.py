"""The ``ray`` teacher backend (``teacher.placement=ray``): the frozen teacher served by Ray actors
on their own GPUs (:class:`distill.teacher.ray_service.TeacherService`), one service shared by all
training ranks; each rank sends its supervised positions and gets their top-k back.

* Rank 0 starts the service (``teacher.replicas`` copies of ``teacher.shards`` pipeline stages, in
  ``model.teacher_dtype`` or ``teacher.quantization``) on the cluster at ``teacher.ray_address``,
  or on a private Ray bound to ``teacher.ray_node_ip``; the other ranks attach to it
  (:func:`distill.teacher.connect.open_teacher`).
* ``prefetch(batch)`` (the trainer calls it ahead of use) sends the micro-batch's sequences and
  their supervised positions: the rows of a right-padded batch, or, packed (``data.packing``), each
  example of a row as its own sequence (split where the position ids restart), so the teacher sees
  exactly what the co-located one sees. ``rows(batch, index)`` waits for that reply: a
  :class:`~distill.losses.teacher_output.TopKTeacher` ``[N, k]`` in the order of the flat supervised rows.
* The top-k is computed at ``kd.temperature`` over the student tokenizer's real vocabulary, and
  the log-probs come back in fp32 (the same numbers the co-located teacher's top-k gives).
* The teacher's tokenizer must equal the student's (token-level KD): checked before the service
  starts, as for the co-located teacher.
* A teacher actor that dies is restarted within ``teacher.max_restarts`` / ``teacher.max_retries``
  (a warning line at most every 30 s); past them the run stops with one line naming the actor
  (:class:`distill.teacher.TeacherUnavailable`, exit 2); ``--resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import collections
import os
import time

import torch

from distill.config import ConfigError, RunConfig
from distill.losses.teacher_output import TopKTeacher
from distill.teacher.base import BackendContext, TeacherBackend

RAY_TEMP_DIR = "/tmp/ray_distill"  # the private Ray's temp dir (records of our sessions live there too)
NAMESPACE = "distill-teacher"


def segments(batch: dict, index: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """``(sequences, positions)`` for the flat supervised rows ``index`` (CPU, sorted) of ``batch``:
    one sequence per row, or per packed example (``position_ids`` restarting at 0), with the
    positions of its supervised rows counted from the sequence's start; sequences without a
    supervised row are left out. Concatenating the replies in order gives the rows of ``index``."""
    ids = batch["input_ids"]
    B, L = ids.shape
    pos = batch.get("position_ids")
    mask = batch.get("attention_mask")
    want: dict[int, list[int]] = collections.defaultdict(list)
    for flat in index.tolist():
        want[flat // L].append(flat % L)
    seqs, poss = [], []
    for b in sorted(want):
        row = ids[b]
        if pos is not None:
            starts = (pos[b] == 0).nonzero().squeeze(1).tolist() + [L]
            bounds = list(zip(starts[:-1], starts[1:]))
        elif mask is not None:
            real = mask[b].nonzero().squeeze(1)
            lo, hi = int(real[0]), int(real[-1]) + 1
            if hi - lo != real.numel():
                raise ValueError("teacher.placement=ray: attention_mask rows must be contiguous (left or right padding)")
            bounds = [(lo, hi)]
        else:
            bounds = [(0, L)]
        ts = want[b]
        j = 0
        for lo, hi in bounds:
            mine = []
            while j < len(ts) and ts[j] < hi:
                if ts[j] < lo:
                    raise ValueError(f"teacher.placement=ray: supervised position {ts[j]} of row {b} lies in padding")
                mine.append(ts[j] - lo)
                j += 1
            if mine:
                seqs.append(row[lo:hi].tolist())
                poss.append(mine)
    return seqs, poss


def _cat(parts: list[TopKTeacher], k: int, temperature: float) -> TopKTeacher:
    if not parts:
        return TopKTeacher(ids=torch.zeros((0, k), dtype=torch.int32), logprobs=torch.zeros((0, k)),
                           tail_mass=torch.zeros(0), temperature=temperature)
    return TopKTeacher(ids=torch.cat([p.ids.to(torch.int32) for p in parts]),
                       logprobs=torch.cat([p.logprobs.float() for p in parts]),
                       tail_mass=torch.cat([p.tail_mass.float() for p in parts]), temperature=temperature)


class RayTeacher(TeacherBackend):
    """See the module docstring. ``wait_s``: seconds ``rows`` spent waiting for replies (logged).
    A subclass serving the top-k some other way overrides :meth:`open_client` (the vLLM backend does)."""

    topk_ids_checked = False  # replies cross a process boundary: the trainer checks every one
    placement = "ray"  # teacher.placement, named in this backend's errors

    def __init__(self, cfg: RunConfig, ctx: BackendContext):
        from distill.models import load as ml

        if cfg.kd.topk < 1:
            raise ConfigError(f"teacher.placement={self.placement} serves top-k only: set kd.topk (e.g. 64)")
        ml.check_teacher_tokenizer(ctx.teacher_path, ctx.tokenizer, student_name=ctx.student_path,
                                   trust_remote_code=cfg.model.trust_remote_code)
        self.client = self.open_client(cfg, ctx)
        self.k, self.temperature, self.vocab_size = cfg.kd.topk, cfg.kd.temperature, ctx.vocab_size
        self.device = ctx.device
        self._pending: collections.deque = collections.deque()  # (rows, handle) in prefetch order
        self.wait_s = 0.0

    def open_client(self, cfg: RunConfig, ctx: BackendContext):
        """The teacher client (``async_topk``, ``shutdown``): the Ray service, started on rank 0."""
        from distill.dist.env import broadcast_object0
        from distill.teacher.connect import open_teacher

        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(cfg.model.teacher_dtype,
                                                                                 cfg.model.teacher_dtype)
        run_id = broadcast_object0(f"{os.getpid()}-{int(time.time() * 1000)}")
        return open_teacher(cfg.teacher, ctx.teacher_path, dtype=dtype, rank=ctx.env.rank, world=ctx.env.world_size,
                            broadcast=broadcast_object0, run_id=run_id, temp_dir=RAY_TEMP_DIR, namespace=NAMESPACE,
                            values_dtype="float32")

    def _request(self, batch: dict):
        from distill.losses.lean import supervised_rows

        index, _ = supervised_rows(batch["labels"])
        seqs, poss = segments(batch, index)
        if not seqs:
            return index.numel(), None
        return index.numel(), self.client.async_topk(seqs, poss, self.k, temperature=self.temperature,
                                                     vocab_size=self.vocab_size)

    def prefetch(self, batch: dict) -> None:
        self._pending.append(self._request(batch))

    def rows(self, batch: dict, index: torch.Tensor) -> TopKTeacher:
        from distill.teacher.connect import resolve, warn_faults

        if self._pending:
            n, handle = self._pending.popleft()
            if n != index.numel():
                raise RuntimeError(f"ray teacher: the prefetched micro-batch has {n} supervised rows, this one "
                                   f"{index.numel()}: prefetch and use are out of order")
        else:  # not prefetched: ask now (its CPU copy)
            n, handle = self._request({k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()})
        t0 = time.perf_counter()
        parts = resolve(handle) if handle is not None else []
        self.wait_s += time.perf_counter() - t0
        warn_faults(self.client, "trainer", every_s=30.0)
        out = _cat(parts, self.k, self.temperature)
        return TopKTeacher(ids=out.ids.to(self.device), logprobs=out.logprobs.to(self.device),
                           tail_mass=out.tail_mass.to(self.device), temperature=self.temperature)

    def __call__(self, batch: dict) -> TopKTeacher:
        """``kd.path=logits``: ``[B, L, k]``, the top-k at the supervised positions and a filler (ids
        0..k-1, uniform) that the objective masks out elsewhere."""
        import math

        from distill.losses.lean import supervised_rows

        labels = batch["labels"]
        index, _ = supervised_rows(labels.cpu())
        t = self.rows(batch, index.to(labels.device))
        B, L = labels.shape
        k, dev = self.k, labels.device
        ids = torch.arange(k, dtype=torch.int32, device=dev).expand(B * L, k).clone()
        lp = torch.full((B * L, k), -math.log(k), dtype=torch.float32, device=dev)
        tail = torch.zeros(B * L, dtype=torch.float32, device=dev)
        idx = index.to(dev)
        ids[idx], lp[idx], tail[idx] = t.ids, t.logprobs, t.tail_mass
        return TopKTeacher(ids=ids.view(B, L, k), logprobs=lp.view(B, L, k), tail_mass=tail.view(B, L),
                           temperature=self.temperature)

    def close(self) -> None:
        from distill.teacher.connect import close_teacher

        client, self.client = self.client, None
        close_teacher(client)
