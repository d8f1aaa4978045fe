"""Distillation losses: chunked torch divergences and the CE + KD objective.

``from distill.losses import forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd, divergence``;
``from distill.losses.objective import DistillObjective, LossOutput, count_targets``.
Definitions: kernels/distill_kernels/ref.py. User guide: docs/losses.md. Imports torch only (no triton until an
``impl="triton"`` call).
"""

from distill.losses.divergences import (
    KINDS,
    divergence,
    forward_kl,
    jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    tvd,
)
from distill.losses.objective import DistillObjective, LossOutput, count_targets

__all__ = [
    "KINDS",
    "divergence",
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_kl",
    "skew_reverse_kl",
    "tvd",
    "DistillObjective",
    "LossOutput",
    "count_targets",
]
