"""What a teacher hands the student: full logits, or its top-k at each position.

A top-k teacher is ``k`` token ids and log-probabilities per position plus ONE fp32 scalar, the
probability mass outside the top-k, all AT THE TEMPERATURE OF USE ``T`` and over the tokenizer's
real vocabulary ``[0, V)`` (padded embedding rows never enter the top-k, the log-partition or the
tail). The teacher computes the tail from its fp32 log-partition
(``tail = exp(logsumexp(tail logits / T) - logZ_T)``), so it is exact even when the log-probs travel
in bf16. With the student bucketed the same way (its exact tempered mass on the k ids and outside
them), a student equal to its teacher has zero divergence at every T, k and kind; the definition
lives in ``distill_kernels.ref`` (module docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.errors import UserError


class TopKIdError(UserError, ValueError):
    """Top-k ids outside the vocabulary or repeated within a position (names where they came from)."""


@dataclass
class TopKTeacher:
    """Teacher top-k at N positions (any leading shape ``[...]``).

    ids:         int32/int64 ``[..., k]`` token ids in ``[0, V)``, distinct per position, sorted by
                 descending probability
    logprobs:    float ``[..., k]`` log-probabilities at ``temperature`` over the real vocabulary
    tail_mass:   fp32 ``[...]`` probability mass outside the k ids at ``temperature``, or None to
                 derive it as ``clamp(1 - sum(exp(logprobs)), 0, 1)`` (less exact in bf16)
    temperature: the temperature the distribution was computed at; the losses refuse a teacher
                 whose temperature is not the one they use
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_mass: torch.Tensor | None = None
    temperature: float = 1.0

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
        self.temperature = float(self.temperature)
        if not self.temperature > 0:
            raise ValueError(f"TopKTeacher: temperature must be > 0, got {self.temperature}")

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    @classmethod
    @torch.no_grad()
    def from_logits(
        cls, logits: torch.Tensor, k: int, *, temperature: float = 1.0, vocab_size: int | None = None,
        values_dtype: torch.dtype = torch.float32,
    ) -> "TopKTeacher":
        """Top-k of ``softmax(logits[..., :vocab_size] / temperature)`` with the exact fp32 tail.

        ``vocab_size``: the tokenizer's real vocabulary; columns past it (padded embedding rows) are
        not tokens and are left out of the top-k, the log-partition and the tail (default: all).
        Works on ``[rows, V]`` chunks: the fp32 working set is one chunk, never the whole input.
        """
        vocab = logits.shape[-1] if vocab_size is None else int(vocab_size)
        if vocab > logits.shape[-1]:
            raise ValueError(f"top-k vocab_size={vocab} exceeds the teacher's {logits.shape[-1]} logit columns")
        if not 1 <= k <= vocab:
            raise ValueError(f"top-k k={k} must be in [1, vocab={vocab}]")
        if not temperature > 0:
            raise ValueError(f"top-k temperature must be > 0, got {temperature}")
        x = logits[..., :vocab].to(torch.float32, copy=True)  # owned: scattered in place below
        if temperature != 1.0:
            x.div_(temperature)
        logz = torch.logsumexp(x, dim=-1, keepdim=True)
        vals, ids = torch.topk(x, k, dim=-1)
        logprobs = vals - logz
        if k == vocab:
            tail = torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
        else:
            # Tail from the log-partition directly: exact, no 1 - sum(...) cancellation.
            tail_lse = torch.logsumexp(x.scatter_(-1, ids, -float("inf")), dim=-1)
            tail = (tail_lse - logz.squeeze(-1)).exp()
        return cls(ids=ids.to(torch.int32), logprobs=logprobs.to(values_dtype), tail_mass=tail,
                   temperature=temperature)

    def to(self, device=None, dtype=None) -> "TopKTeacher":
        """Move to ``device``; ``dtype`` (if given) applies to the log-probs only."""
        return TopKTeacher(
            ids=self.ids.to(device),
            logprobs=self.logprobs.to(device=device, dtype=dtype or self.logprobs.dtype),
            tail_mass=None if self.tail_mass is None else self.tail_mass.to(device),
            temperature=self.temperature,
        )

    def reshape(self, *shape: int) -> "TopKTeacher":
        """Reshape the leading (position) dims; k stays last."""
        return TopKTeacher(
            ids=self.ids.reshape(*shape, self.k),
            logprobs=self.logprobs.reshape(*shape, self.k),
            tail_mass=None if self.tail_mass is None else self.tail_mass.reshape(*shape),
            temperature=self.temperature,
        )

    def __getitem__(self, index) -> "TopKTeacher":
        """Select positions (index over the leading dims)."""
        return TopKTeacher(
            ids=self.ids[index],
            logprobs=self.logprobs[index],
            tail_mass=None if self.tail_mass is None else self.tail_mass[index],
            temperature=self.temperature,
        )

    def nbytes(self) -> int:
        n = self.ids.numel() * self.ids.element_size() + self.logprobs.numel() * self.logprobs.element_size()
        if self.tail_mass is not None:
            n += self.tail_mass.numel() * self.tail_mass.element_size()
        return n

    def check(self, vocab_size: int, source: str) -> "TopKTeacher":
        """Refuse ids outside ``[0, vocab_size)`` or repeated within a position, naming ``source``.

        Called where top-k enters the student's process (cache shards, teacher-service replies,
        teacher backends), before any kernel indexes the student's logits with the ids. Costs one
        host sync on device tensors, none on CPU ones. Returns ``self``.
        """
        ids = self.ids
        if ids.dtype not in (torch.int32, torch.int64):
            raise TopKIdError(f"{source}: top-k ids must be int32 or int64, got {ids.dtype}")
        if ids.numel() == 0:
            return self
        flat = ids.reshape(-1, self.k)
        out_of_range = ((flat < 0) | (flat >= vocab_size)).any(-1)
        srt = flat.sort(-1).values
        repeated = (srt[:, 1:] == srt[:, :-1]).any(-1)
        any_oor, any_rep = torch.stack([out_of_range.any(), repeated.any()]).tolist()  # the one sync
        if any_oor:
            row = int(out_of_range.nonzero()[0])
            bad = [int(v) for v in flat[row].tolist() if not 0 <= v < vocab_size]
            raise TopKIdError(
                f"{source}: top-k id {bad[0]} at position {row} is outside the vocabulary [0, {vocab_size}); "
                f"the teacher must take its top-k over the tokenizer's {vocab_size} real tokens")
        if any_rep:
            row = int(repeated.nonzero()[0])
            raise TopKIdError(f"{source}: position {row} repeats top-k ids ({flat[row].tolist()[:16]}); "
                              f"a top-k needs k distinct ids")
        return self
