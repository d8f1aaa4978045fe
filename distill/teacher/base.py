"""The teacher-backend protocol: what the training loop asks of a teacher, and the registry of backends.

A backend turns a training micro-batch into the teacher's targets: ``__call__(batch)`` gives logits
``[B, L, V]`` or a :class:`~distill.losses.teacher_output.TopKTeacher` ``[B, L, k]`` aligned with the batch's
``input_ids`` positions (``kd.path=logits``); ``rows(batch, index)`` gives the teacher at the flat
supervised positions only (``kd.path=lean``). ``prefetch(batch)`` is called exactly once per
micro-batch, ahead of its use (an asynchronous backend starts its request there); ``close()`` at the
end of training.

Backends are registered by name (``kd.teacher_backend``) as ``factory(cfg, ctx) -> TeacherBackend``,
``ctx`` being a :class:`BackendContext`. Built in: ``colocated`` (distill.teacher.colocated), ``ray``
(distill.teacher.ray_backend), ``cache`` (distill.teacher.topk_cache) and ``multiteacher``
(distill.multiteacher.stage); docs/architecture.md shows how to add one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from distill.losses.teacher_output import TopKTeacher

@dataclasses.dataclass
class BackendContext:
    """What a teacher backend or a dataset factory may need from the run being built."""

    env: Any  # distill.dist.env.DistEnv
    device: torch.device  # this rank's device
    tokenizer: Any  # the shared tokenizer
    vocab_size: int  # the tokenizer's real vocabulary
    student_path: str  # resolved student folder/name
    teacher_path: str  # resolved teacher folder/name ("" for SFT)
    ds_config: dict | None  # the student's resolved DeepSpeed config (None on the torch engine)
    out_dir: Path  # run folder
    teacher_placement: str = "replicated"  # resolved teacher.placement (never auto): partitioned | replicated | ray
    dataset: Any = None  # the run's training dataset, once built (teacher backends are built after it)


class TeacherBackend:
    """Base class. ``softcap``: final-logit softcap the objective must still apply to what
    ``__call__`` returns (None when the logits are already capped, as HF Gemma-2 forwards are)."""

    softcap: float | None = None
    # True when the backend's top-k ids are valid by construction (or checked where they enter);
    # otherwise the loop checks every TopKTeacher it returns (TopKTeacher.check) before the loss.
    topk_ids_checked: bool = False

    def prefetch(self, batch: dict) -> None:  # noqa: D401 - optional hook
        """Start work for ``batch`` (CPU tensors + pass-through keys); called once, ahead of use."""

    @property
    def prefetches(self) -> bool:
        """Whether this backend does anything in :meth:`prefetch` (the loop then calls it ahead)."""
        return type(self).prefetch is not TeacherBackend.prefetch

    def __call__(self, batch: dict):
        raise NotImplementedError

    def rows(self, batch: dict, index: torch.Tensor):
        """The teacher at the flat positions ``index`` [N] of the batch only (``kd.path=lean``): a
        TopKTeacher ``[N, k]``, a :class:`~distill.losses.lean.HiddenTeacher` or logits ``[N, V]``.
        This default indexes what ``__call__`` returns; backends that can skip the other positions
        override it (``colocated`` does)."""
        from distill.losses.lean import topk_rows

        out = self(batch)
        if isinstance(out, TopKTeacher):
            return topk_rows(out, index)
        return out.reshape(-1, out.shape[-1]).index_select(0, index)

    def close(self) -> None:
        pass
