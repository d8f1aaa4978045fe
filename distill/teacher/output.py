"""What a teacher hands the student: full logits, or its top-k at each position.

A top-k teacher is ``k`` token ids and log-probabilities per position plus ONE fp32 scalar, the
probability mass outside the top-k at temperature 1. The teacher computes that scalar from its fp32
log-partition (``tail = exp(logsumexp(tail logits) - logZ)``), so the tail is exact even when the
log-probs travel in bf16. How each divergence uses the tail is defined once in
``distill_kernels.ref`` (module docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TopKTeacher:
    """Teacher top-k at N positions (any leading shape ``[...]``).

    ids:       int32/int64 ``[..., k]`` token ids, sorted by descending probability
    logprobs:  float ``[..., k]`` log-probabilities at temperature 1 over the full vocabulary
    tail_mass: fp32 ``[...]`` probability mass outside the k ids at temperature 1, or None to
               derive it as ``clamp(1 - sum(exp(logprobs)), 0, 1)`` (less exact in bf16)
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_mass: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape:
            raise ValueError(
                f"TopKTeacher: ids shape {tuple(self.ids.shape)} != logprobs shape "
                f"{tuple(self.logprobs.shape)}"
            )
        if self.tail_mass is not None and self.tail_mass.shape != self.ids.shape[:-1]:
            raise ValueError(
                f"TopKTeacher: tail_mass shape {tuple(self.tail_mass.shape)} != "
                f"{tuple(self.ids.shape[:-1])} (one scalar per position)"
            )

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    @classmethod
    @torch.no_grad()
    def from_logits(
        cls, logits: torch.Tensor, k: int, *, values_dtype: torch.dtype = torch.float32
    ) -> "TopKTeacher":
        """Top-k of full teacher logits ``[..., V]`` with the exact fp32 tail mass."""
        vocab = logits.shape[-1]
        if not 1 <= k <= vocab:
            raise ValueError(f"top-k k={k} must be in [1, vocab={vocab}]")
        x = logits.float()
        logz = torch.logsumexp(x, dim=-1, keepdim=True)
        vals, ids = torch.topk(x, k, dim=-1)
        logprobs = vals - logz
        if k == vocab:
            tail = torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
        else:
            # Tail from the log-partition directly: exact, no 1 - sum(...) cancellation.
            tail_lse = torch.logsumexp(x.scatter(-1, ids, -float("inf")), dim=-1)
            tail = (tail_lse - logz.squeeze(-1)).exp()
        return cls(ids=ids.to(torch.int32), logprobs=logprobs.to(values_dtype), tail_mass=tail)

    def to(self, device=None, dtype=None) -> "TopKTeacher":
        """Move to ``device``; ``dtype`` (if given) applies to the log-probs only."""
        return TopKTeacher(
            ids=self.ids.to(device),
            logprobs=self.logprobs.to(device=device, dtype=dtype or self.logprobs.dtype),
            tail_mass=None if self.tail_mass is None else self.tail_mass.to(device),
        )

    def reshape(self, *shape: int) -> "TopKTeacher":
        """Reshape the leading (position) dims; k stays last."""
        return TopKTeacher(
            ids=self.ids.reshape(*shape, self.k),
            logprobs=self.logprobs.reshape(*shape, self.k),
            tail_mass=None if self.tail_mass is None else self.tail_mass.reshape(*shape),
        )

    def __getitem__(self, index) -> "TopKTeacher":
        """Select positions (index over the leading dims)."""
        return TopKTeacher(
            ids=self.ids[index],
            logprobs=self.logprobs[index],
            tail_mass=None if self.tail_mass is None else self.tail_mass[index],
        )

    def nbytes(self) -> int:
        n = self.ids.numel() * self.ids.element_size() + self.logprobs.numel() * self.logprobs.element_size()
        if self.tail_mass is not None:
            n += self.tail_mass.numel() * self.tail_mass.element_size()
        return n
