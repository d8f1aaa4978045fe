"""Helpers of the multi-teacher study and tests: tiny teachers of chosen strengths, held-out loss.

``train_teacher`` fits a tiny causal LM (CE on the responses) to a list of (prompt, response) pairs,
from scratch or from an existing folder, and saves an HF folder with the tokenizer;
``noise_teacher`` saves a random-init model of the same tokenizer (a teacher that knows nothing; with a
large ``initializer_range`` its distributions are still diffuse, about 4 nats of entropy);
``mismatched_pairs`` gives every prompt another example's response, on which ``train_teacher`` makes a
confidently wrong teacher (fluent, low entropy, wrong about the text in front of it);
``heldout_loss`` is a model's mean response-token CE on a (prompt, response) set and
``response_entropy`` a model's mean next-token entropy over the responses (how confident it is).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def _encode(tok, pairs, max_len: int):
    out = []
    for prompt, response in pairs:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (p + r)[-max_len:]
        n_prompt = max(0, len(ids) - len(r))
        out.append((ids, n_prompt))
    return out


def _batch(seqs, pad: int):
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, (s, n_p) in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        att[b, :len(s)] = 1
        labels[b, n_p:len(s)] = torch.tensor(s[n_p:])
    return ids, att, labels


def train_teacher(tok, pairs, out: str | Path, *, size="student", init: str | Path | None = None, steps: int = 150,
                  batch_size: int = 16, lr: float = 3e-3, seed: int = 0, max_len: int = 96, **overrides) -> Path:
    """An HF folder of a tiny LM trained ``steps`` AdamW steps on ``pairs`` [(prompt, response)] (from
    ``init`` when given, else a fresh ``size`` model); cosine schedule to 10%."""
    from transformers import AutoModelForCausalLM

    from distill.models.tiny import build_tiny_causal_lm

    out = Path(out)
    if init is not None:
        model = AutoModelForCausalLM.from_pretrained(str(init), dtype=torch.float32)
    else:
        model = build_tiny_causal_lm(len(tok), size, seed=seed, **overrides)
    model.train()
    seqs = _encode(tok, pairs, max_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(seqs), (batch_size,), generator=g).tolist()
        ids, att, labels = _batch([seqs[i] for i in idx], tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def noise_teacher(tok, out: str | Path, *, size="student", seed: int = 99, **overrides) -> Path:
    """A random-init model of ``tok``'s vocabulary (``initializer_range`` e.g. 0.3 makes it confident)."""
    from distill.models.tiny import build_tiny_causal_lm

    out = Path(out)
    model = build_tiny_causal_lm(len(tok), size, seed=seed, **overrides)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@torch.no_grad()
def _response_mean(model_dir: str | Path, pairs, per_batch, *, max_len: int, batch_size: int) -> float:
    """``per_batch(logits [n, V] fp32, targets [n])`` summed over the response tokens of ``pairs`` (the
    model in ``model_dir``, batches of ``batch_size``), divided by their number."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    seqs = _encode(tok, pairs, max_len)
    total, n = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        ids, att, labels = _batch(seqs[i:i + batch_size], tok.pad_token_id)
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        tgt = labels[:, 1:]
        mask = tgt != -100
        total += float(per_batch(logits[mask], tgt[mask]))
        n += int(mask.sum())
    return total / max(n, 1)


def heldout_loss(model_dir: str | Path, pairs, *, max_len: int = 96, batch_size: int = 32) -> float:
    """Mean response-token CE (nats) of the model in ``model_dir`` on ``pairs``."""

    def ce_sum(logits, targets):
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")

    return _response_mean(model_dir, pairs, ce_sum, max_len=max_len, batch_size=batch_size)


def mismatched_pairs(pairs, seed: int = 0) -> list[tuple[str, str]]:
    """Each prompt with the response of another pair whose response differs (a shuffled assignment,
    repaired so no pair keeps a response equal to its own): the data of a confidently wrong teacher."""
    import random

    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    out = []
    for i, (prompt, response) in enumerate(pairs):
        j = order[i]
        tries = 0
        while pairs[j][1] == response and tries < len(pairs):
            j, tries = (j + 1) % len(pairs), tries + 1
        out.append((prompt, pairs[j][1]))
    return out


def response_entropy(model_dir: str | Path, pairs, *, max_len: int = 96, batch_size: int = 32) -> float:
    """Mean entropy (nats) of the model's next-token distribution over the response tokens of ``pairs``."""

    def entropy_sum(logits, targets):
        logp = logits.log_softmax(-1)
        return -(logp.exp() * logp).sum()

    return _response_mean(model_dir, pairs, entropy_sum, max_len=max_len, batch_size=batch_size)
