"""The run's data order: each optimizer step's micro-batches on each rank, from the step number alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Schedule:
    """``global_batch`` examples per optimizer step (micro_batch x grad_accum x world size),
    ``steps_per_epoch`` and ``total_steps`` (distill.config.TrainSection.schedule_for)."""

    global_batch: int
    steps_per_epoch: int
    total_steps: int


class StepBatches:
    """This rank's micro-batches (CPU) of optimizer step ``step`` (0-based), deterministic: epoch
    ``e`` is a permutation seeded by ``seed * 1_000_003 + e``, cut into global batches; micro-batch
    ``m`` of rank ``r`` takes the global batch's slice ``(m * world + r) * micro_batch``. The order
    depends only on the global batch and the step, so a run resumed at another world size with the
    same global batch continues it exactly. With a ``rollout`` (on-policy distillation) the student
    rewrites a share of the step's examples before they are collated. The last step built is cached
    (prefetching the next step's first micro-batch builds that step)."""

    def __init__(self, dataset, collate: Callable[[list[dict]], dict], schedule: Schedule, *, seed: int,
                 micro_batch: int, grad_accum: int, rank: int, world_size: int, rollout=None):
        self.dataset, self.collate, self.schedule = dataset, collate, schedule
        self.seed, self.micro_batch, self.grad_accum = seed, micro_batch, grad_accum
        self.rank, self.world_size = rank, world_size
        self.rollout = rollout  # on-policy: (step, items, positions, indices) -> items (distill.train.rollout)
        self._cache: tuple[int, list[dict]] | None = None

    def __call__(self, step: int) -> list[dict]:
        if self._cache is not None and self._cache[0] == step:
            return self._cache[1]
        out = self.build(step)
        self._cache = (step, out)
        return out

    def build(self, step: int) -> list[dict]:
        """Step ``step``'s micro-batches, built (collated) afresh."""
        s = self.schedule
        epoch, within = divmod(step, s.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.dataset), generator=g)
        idx = perm[within * s.global_batch:(within + 1) * s.global_batch].tolist()
        positions = []
        for m in range(self.grad_accum):
            lo = (m * self.world_size + self.rank) * self.micro_batch
            positions.append(list(range(lo, lo + self.micro_batch)))
        indices = [[idx[p] for p in row] for row in positions]
        items = [[self.dataset[i] for i in row] for row in indices]
        if self.rollout is not None:
            items = self.rollout(step, items, positions, indices)
        return [self.collate(mb) for mb in items]


def to_device(batch: dict, device: Any) -> dict:
    """The batch's tensors on ``device`` (non-blocking); other values as they are."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
