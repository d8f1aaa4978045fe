"""What the local and the Ray teacher share: request types, validation, batching, decode loop.

Both backends run the same code here against a ``run(payload) -> result`` coroutine that pushes one
payload through all stages of one replica (in-process for :class:`LocalTeacher`, as a chain of actor
calls for the Ray service). No ray import here.

Conventions
- ``topk(sequences, positions, k)``: row ``j`` of sequence ``i``'s result is the teacher's
  distribution at index ``positions[i][j]``, i.e. over the token that FOLLOWS
  ``sequences[i][:positions[i][j] + 1]`` (HF logits convention: logits[:, p] predict token p+1).
  Sequences are right-padded inside the service; padding never changes a real position's result.
- ``generate``: prompts are left-padded, decoded with a per-stage KV cache; ``finish_reason`` is
  ``"stop"`` (an end-of-sequence / stop token was produced; it is not part of the text) or
  ``"length"`` (``max_new_tokens`` or the teacher's context reached).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import torch

from distill.errors import UserError
from distill.losses.teacher_output import TopKTeacher

_session_ids = itertools.count()

# How often a dead teacher actor is restarted, and how often a request is re-sent after the actor
# serving it died (the settings teacher.max_restarts / teacher.max_retries of every stage using the service).
DEFAULT_MAX_RESTARTS = 3
DEFAULT_MAX_RETRIES = 3


class TeacherUnavailable(UserError, RuntimeError):
    """A teacher actor died and the service could not bring it back within its budget
    (``teacher.max_restarts`` restarts, ``teacher.max_retries`` re-sends of one request), or its node is
    gone. One line naming the actor, the cause Ray gave and the budget; a launcher ends with it like
    with a user error (exit 2, no traceback): it is not a bug of ours, and what to do is in the line."""


@dataclass
class SamplingParams:
    """How to decode. temperature 0 = greedy."""

    max_new_tokens: int = 256  # new tokens per prompt, at most
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus sampling mass (1 = off)
    top_k: int = 0  # keep the k most likely tokens before sampling (0 = off)
    seed: int = 0  # sampling seed; prompt i of a request uses seed + i unless seeds= are given
    stop_token_ids: list[int] = field(default_factory=list)  # extra ids that end a sequence (eos always does)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature={self.temperature} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k={self.top_k} must be >= 0")

    def to_dict(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "seed": self.seed, "stop_token_ids": list(self.stop_token_ids)}


@dataclass
class Generation:
    """One decoded continuation."""

    text: str  # decoded new tokens (special tokens skipped)
    token_ids: list[int]  # new token ids, without the stop token
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int = 0  # prompt length in tokens


@dataclass
class TeacherInfo:
    """What callers need to validate requests without loading weights."""

    name: str
    vocab_size: int  # rows of the lm_head (may exceed the tokenizer's vocabulary)
    real_vocab: int  # the tokenizer's real vocabulary (lm_head rows when there is no tokenizer)
    max_context: int  # max_position_embeddings
    num_layers: int
    eos_token_ids: list[int]
    pad_token_id: int


def teacher_info(name: str, config, tokenizer=None) -> TeacherInfo:
    eos = config.eos_token_id if config.eos_token_id is not None else []
    eos = [eos] if isinstance(eos, int) else list(eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    pad = config.pad_token_id
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    return TeacherInfo(
        name=str(name),
        vocab_size=int(config.vocab_size),
        real_vocab=min(int(config.vocab_size), len(tokenizer)) if tokenizer is not None else int(config.vocab_size),
        max_context=int(getattr(config, "max_position_embeddings", 1 << 30)),
        num_layers=int(config.num_hidden_layers),
        eos_token_ids=eos,
        pad_token_id=int(pad),
    )


def topk_vocab(info: TeacherInfo, vocab_size: int | None) -> int:
    """The columns a top-k is taken over: the tokenizer's real vocabulary unless the caller names one."""
    v = info.real_vocab if vocab_size is None else int(vocab_size)
    if not 1 <= v <= info.vocab_size:
        raise ValueError(f"top-k vocab_size={v} must be in [1, {info.vocab_size}] (the lm_head rows of {info.name})")
    return v


def validate_topk(info: TeacherInfo, sequences, positions, k, *, temperature: float = 1.0,
                  vocab_size: int | None = None) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"top-k k={k!r} must be a positive integer")
    vocab = topk_vocab(info, vocab_size)
    if k > vocab:
        raise ValueError(f"top-k k={k} > the teacher's vocabulary size {vocab} ({info.name})")
    if not float(temperature) > 0:
        raise ValueError(f"top-k temperature={temperature!r} must be > 0")
    if len(sequences) != len(positions):
        raise ValueError(f"topk: {len(sequences)} sequences but {len(positions)} position lists")
    for i, (seq, pos) in enumerate(zip(sequences, positions)):
        n = len(seq)
        if n == 0:
            raise ValueError(f"topk: sequence {i} is empty")
        if n > info.max_context:
            raise ValueError(
                f"topk: sequence {i} has {n} tokens, longer than the teacher's context of {info.max_context} "
                f"tokens (max_position_embeddings of {info.name})"
            )
        bad = [p for p in pos if not 0 <= int(p) < n]
        if bad:
            raise ValueError(f"topk: sequence {i} ({n} tokens) asks for positions {bad[:5]} outside [0, {n})")
        hi = [t for t in seq if not 0 <= int(t) < info.vocab_size]
        if hi:
            raise ValueError(f"topk: sequence {i} holds token ids {hi[:5]} outside the teacher's vocabulary [0, {info.vocab_size})")


def validate_prompts(info: TeacherInfo, prompt_ids: list[list[int]]) -> None:
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"generate: prompt {i} encodes to no tokens")
        if len(ids) >= info.max_context:
            raise ValueError(
                f"generate: prompt {i} has {len(ids)} tokens; the teacher's context is {info.max_context} tokens "
                f"({info.name}), leaving no room to generate"
            )


def prepare_generation(info: TeacherInfo, tokenizer, prompts: list[str], sampling, seeds):
    """What every teacher does before generating: (sampling, prompt ids, one seed per prompt).

    Checks the sampling parameters, encodes the prompts (no special tokens added), checks them
    against the teacher's context, and gives prompt i the seed ``sampling.seed + i`` unless
    ``seeds`` are given.
    """
    sampling = sampling or SamplingParams()
    sampling.validate()
    if tokenizer is None:
        raise RuntimeError(f"teacher {info.name} has no tokenizer files: generate() needs one")
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    validate_prompts(info, ids)
    seeds = list(seeds) if seeds is not None else [sampling.seed + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
    return sampling, ids, seeds


Run = Callable[[dict], Awaitable]


async def topk_batch(run: Run, info: TeacherInfo, seqs: list[list[int]], poss: list[list[int]], k: int,
                     values_dtype: torch.dtype, temperature: float = 1.0, vocab_size: int | None = None):
    """Score one batch; returns one TopKTeacher [len(pos_i), k] per sequence, at ``temperature``
    over the first ``vocab_size`` (default: the tokenizer's real) tokens."""
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, T), info.pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    rows = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(poss)])
    cols = torch.cat([torch.as_tensor(list(p), dtype=torch.long).reshape(-1) for p in poss])
    payload = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": torch.arange(T).unsqueeze(0).expand(B, T).contiguous(),
        "task": {"kind": "topk", "rows": rows, "cols": cols, "k": k, "values_dtype": values_dtype,
                 "temperature": float(temperature), "vocab_size": topk_vocab(info, vocab_size)},
    }
    flat = await run(payload)
    out, start = [], 0
    for p in poss:
        # clone: a slice pickles its whole storage, i.e. every sequence would carry the batch's payload
        t = flat[start : start + len(p)]
        out.append(TopKTeacher(ids=t.ids.clone(), logprobs=t.logprobs.clone(), tail_mass=t.tail_mass.clone(),
                               temperature=t.temperature))
        start += len(p)
    return out


async def generate_batch(run: Run, info: TeacherInfo, prompt_ids: list[list[int]], sampling: SamplingParams,
                         seeds: list[int], vocab_limit: int | None):
    """Decode one batch with a KV cache on every stage; returns (token_ids, finish_reason) per prompt."""
    sid = f"g{next(_session_ids)}"
    B, T = len(prompt_ids), max(len(p) for p in prompt_ids)
    ids = torch.full((B, T), info.pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, p in enumerate(prompt_ids):
        ids[b, T - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    stop = set(info.eos_token_ids) | set(sampling.stop_token_ids)
    budget = [min(sampling.max_new_tokens, info.max_context - len(p)) for p in prompt_ids]
    out: list[list[int]] = [[] for _ in range(B)]
    reason: list[str | None] = [None] * B
    task = {"kind": "sample", "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k, "vocab_limit": vocab_limit}
    payload = {"sid": sid, "input_ids": ids, "attention_mask": mask, "position_ids": pos,
               "task": dict(task, seeds=seeds)}
    last_pos = pos[:, -1]
    try:
        while True:
            nxt = await run(payload)
            for b in range(B):
                if reason[b] is not None:
                    continue
                t = int(nxt[b])
                if t in stop:
                    reason[b] = "stop"
                    continue
                out[b].append(t)
                if len(out[b]) >= budget[b]:
                    reason[b] = "length"
            if all(r is not None for r in reason):
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], dim=1)
            last_pos = last_pos + 1
            payload = {"sid": sid, "input_ids": nxt.reshape(B, 1).long(), "attention_mask": mask,
                       "position_ids": last_pos.reshape(B, 1), "task": task}
    finally:
        try:
            await run({"sid": sid, "task": {"kind": "release"}})
        except Exception:  # the replica died: its caches died with it
            pass
    return list(zip(out, reason))
