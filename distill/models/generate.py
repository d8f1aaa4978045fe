"""Sampling responses from a causal LM with its KV cache, each row from its own seeded generator.

:func:`sample_responses` is what on-policy distillation runs on the live student: a batch of prompts
(token ids), left-padded, prefilled once (the head applied to the last position only), then one token
per forward through the model's cache. Each row draws from its own ``torch.Generator``, so a row's
tokens depend on its seed and its prompt, not on the other rows of the batch or on how examples are
spread over ranks. A row stops at an end-of-sequence token (kept as its last token) or at its own
token limit.
"""

from __future__ import annotations

import functools
import inspect
from typing import Sequence

import torch


@functools.lru_cache(maxsize=None)
def _cache_kwarg(forward) -> str:
    """The KV-cache keyword of a model's forward: ``cache`` in newer transformers releases (which
    deprecate ``past_key_values``), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of ``logits [B, V]`` (fp32): greedy at temperature 0, else a draw from the
    tempered distribution cut to its top-p nucleus, row i with ``generators[i]``."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the most likely one always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


@torch.no_grad()
def sample_responses(model, prompts: Sequence[Sequence[int]], *, limits: Sequence[int], temperature: float, top_p: float,
                     eos_ids: Sequence[int], pad_id: int, generators: Sequence[torch.Generator]) -> list[list[int]]:
    """The response tokens of each prompt: at most ``limits[i]`` tokens, ending at the first token in
    ``eos_ids`` (included). ``model``: a Hugging Face causal LM in eval mode (its weights whole: under
    ZeRO-3, inside the engine's ``generation()`` block); ``generators``: one per prompt, on the model's
    device."""
    n = len(prompts)
    out: list[list[int]] = [[] for _ in range(n)]
    if n == 0 or max(limits, default=0) <= 0:
        return out
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    limit = torch.tensor(list(limits), dtype=torch.long, device=device)
    done = limit <= 0
    fwd = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache, logits, last = _returned_cache(fwd), fwd.logits[:, -1].float(), pos[:, -1]
    steps, tokens = 0, []
    while steps < int(limit.max()):
        nxt = _pick(logits, temperature, top_p, generators)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        steps += 1
        done = done | torch.isin(nxt, eos) | (limit <= steps)
        if bool(done.all()):  # one host sync per token: the loop's own stop test
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last = last + 1
        fwd = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], use_cache=True,
                    **{_cache_kwarg(type(model).forward): cache})
        cache, logits = _returned_cache(fwd), fwd.logits[:, -1].float()
    grid = torch.stack(tokens, dim=1).tolist()
    eos_set = set(int(e) for e in eos_ids)
    for i, row in enumerate(grid):
        for t in row[:int(limits[i])]:
            out[i].append(t)
            if t in eos_set:
                break
    return out


def _returned_cache(out):
    """The KV cache a forward returned (``cache`` or ``past_key_values``, by transformers release)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
