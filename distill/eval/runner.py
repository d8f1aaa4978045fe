"""Model-side SentiBench evaluation: batched, left-padded inference and the rank split.

Classification: one ``generate`` step per batch; the prediction is the argmax of its scores (the
logits after the model's generation-config processors) over the verbalizer's first sub-tokens, as the
authors read ``generate(...).scores[0]``.
Fine-grained: greedy ``model.generate`` (150 new tokens), the prompt and generation decoded together
and the answer taken by the authors' regex. A sequence stops early once its first non-blank line is
complete: nothing after it can change the answer, so the score is the same as running all 150 tokens.

Under ``torchrun``/``deepspeed`` (``torch.distributed`` initialised) each rank takes every
world-size-th prompt (sorted by length, so the work is balanced), the predictions are gathered with
``all_gather_object``, and every rank returns the full result. All ranks run the same number of model
calls (short ranks repeat a batch whose outputs they drop) so ZeRO-3's collective forward never hangs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from distill.data.batching import plan_batches
from distill.eval.parse import extract_answer
from distill.eval.protocol import LABEL_WORDS, MAX_NEW_TOKENS
from distill.errors import UserError


class VerbalizerCollisionError(UserError, ValueError):
    """Two label words of a task start with the same sub-token under this tokenizer."""


def verbalizer_ids(tokenizer, task: str) -> list[int]:
    """First sub-token id of each label word (leading space included), in the authors' order."""
    words = LABEL_WORDS[task]
    ids = []
    for w in words:
        toks = tokenizer(w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise VerbalizerCollisionError(f"{task}: label word {w!r} tokenizes to nothing")
        ids.append(int(toks[0]))
    groups: dict[int, list[str]] = {}
    for w, i in zip(words, ids):
        groups.setdefault(i, []).append(w)
    clashes = {i: ws for i, ws in groups.items() if len(ws) > 1}
    if clashes:
        desc = "; ".join(
            f"{', '.join(repr(w) for w in ws)} all start with token {i} ({tokenizer.convert_ids_to_tokens(i)!r})"
            for i, ws in clashes.items()
        )
        raise VerbalizerCollisionError(
            f"{task}: label words collide under this tokenizer: {desc}. The protocol scores only the first "
            "sub-token of each label word, so these classes cannot be told apart."
        )
    return ids


def best_labels(scores: Sequence[Sequence[float]]) -> list[int]:
    """Each row's argmax (the first on ties): :meth:`Runner.classify` of :meth:`Runner.label_scores`."""
    return torch.tensor(scores).argmax(-1).tolist() if len(scores) else []


def dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:  # the authors set pad = eos
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return int(pad)


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[row, width - len(s):] = 1
    return ids.to(device), mask.to(device)


left_pad = _left_pad  # public name: distill.predict pads its batches the same way


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _zero3() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled

        return bool(is_deepspeed_zero3_enabled())
    except Exception:
        return False


_SPACE_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def decode_like_reference(tokenizer, seqs) -> list[str]:
    """Decode as transformers 4.44 did for the authors: special tokens skipped, and the tokenizer's own
    ``clean_up_tokenization_spaces`` applied whatever the tokenizer type (true for Llama-3, whose
    answers then read "do n't" as "don't"). transformers 5 skips it for BPE tokenizers, so we do it."""
    texts = tokenizer.batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        for old, new in _SPACE_CLEANUP:
            texts = [t.replace(old, new) for t in texts]
    return texts


class _FirstLineDone:
    """Stopping criterion: the generated text has a complete first non-blank line."""

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip() for t in texts], dtype=torch.bool, device=input_ids.device)


class Runner:
    """Runs prompts through a model on this rank's share and gathers the predictions."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_batch_tokens: int | None = None,
                 max_new_tokens: int = MAX_NEW_TOKENS, early_stop: bool = True,
                 on_batch: Callable[[int], None] | None = None, local: bool = False):
        """``local``: this process scores every prompt itself and calls no collective, even under
        torch.distributed (a rank-0-only evaluation while the other ranks wait)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_new_tokens = max_new_tokens
        self.early_stop = early_stop
        self.on_batch = on_batch or (lambda n: None)
        self.pad_id = _pad_id(tokenizer)
        self.device = _model_device(model)
        self.rank, self.world = (0, 1) if local else dist_info()

    # ------------------------------------------------------------------ sharding and synchronisation

    def _shard(self, lengths: Sequence[int]) -> list[int]:
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        return order[self.rank :: self.world]

    def _synced_batches(self, local: list[list[int]]) -> list[list[int] | None]:
        """Pad this rank's batch list to the longest rank's count with ``None`` (a dummy call)."""
        if self.world == 1:
            return list(local)
        n = torch.tensor([len(local)], dtype=torch.long, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        return list(local) + [None] * (int(n.item()) - len(local))

    def _gather(self, local: dict[int, object], n: int) -> list:
        if self.world > 1:
            parts: list = [None] * self.world
            torch.distributed.all_gather_object(parts, local)
            merged: dict[int, object] = {}
            for p in parts:
                merged.update(p)
        else:
            merged = local
        missing = [i for i in range(n) if i not in merged]
        if missing:  # pragma: no cover - a bug, not bad input
            raise RuntimeError(f"predictions missing for {len(missing)} prompts (first {missing[:5]})")
        return [merged[i] for i in range(n)]

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        # add_special_tokens=True as in the authors' collator (a BOS where the tokenizer adds one).
        return list(self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"])

    def count_batches(self, prompts_lengths: Sequence[int], generate: bool) -> int:
        mine = [prompts_lengths[i] for i in self._shard(prompts_lengths)]
        extra = self.max_new_tokens if generate else 0
        return len(plan_batches(mine, self.batch_size, self.max_batch_tokens, extra))

    # ----------------------------------------------------------------------------- classification

    @torch.inference_mode()
    def classify(self, encoded: Sequence[Sequence[int]], label_ids: Sequence[int]) -> list[int]:
        """Index (into ``label_ids``) of the best label for each prompt."""
        return best_labels(self.label_scores(encoded, label_ids))

    @torch.inference_mode()
    def label_scores(self, encoded: Sequence[Sequence[int]], label_ids: Sequence[int]) -> list[list[float]]:
        """Each prompt's first-answer-token scores (fp32 logits after the generation config's processors)
        at ``label_ids``, in that order; :meth:`classify` is their argmax."""
        mine = self._shard([len(e) for e in encoded])
        batches = plan_batches([len(encoded[i]) for i in mine], self.batch_size, self.max_batch_tokens)
        batches = [[mine[j] for j in b] for b in batches]
        cols = torch.as_tensor(list(label_ids), dtype=torch.long, device=self.device)
        synced = self.world > 1 and _zero3()
        out: dict[int, list[float]] = {}
        last = batches[-1] if batches else None
        for b in self._synced_batches(batches):
            rows = b if b is not None else (last or [0])
            ids, mask = _left_pad([encoded[i] for i in rows], self.pad_id, self.device)
            # One generate() step, not a bare forward: its scores pass through the model's generation
            # config processors (e.g. Qwen2.5's repetition_penalty=1.05 over the prompt, which holds the
            # demonstrations' label words), exactly as the authors read generate(...).scores[0].
            gen = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=1,
                do_sample=False,
                num_beams=1,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=self.pad_id,
                synced_gpus=synced,
            )
            scores = gen.scores[0].index_select(-1, cols).float().tolist()
            if b is not None:
                out.update(zip(b, scores))
                self.on_batch(1)
        return self._gather(out, len(encoded))

    # ---------------------------------------------------------------------------------- generation

    @torch.inference_mode()
    def generate(self, encoded: Sequence[Sequence[int]], shots: int) -> list[str | None]:
        """The extracted answer of each prompt (None when the decoded text has no k-th ``Label:``)."""
        from transformers import StoppingCriteriaList

        mine = self._shard([len(e) for e in encoded])
        batches = plan_batches([len(encoded[i]) for i in mine], self.batch_size, self.max_batch_tokens,
                               extra=self.max_new_tokens)
        batches = [[mine[j] for j in b] for b in batches]
        out: dict[int, str | None] = {}
        synced = self.world > 1 and _zero3()
        last = batches[-1] if batches else None
        for b in self._synced_batches(batches):
            rows = b if b is not None else (last or [0])
            ids, mask = _left_pad([encoded[i] for i in rows], self.pad_id, self.device)
            kwargs = {}
            if self.early_stop:
                kwargs["stopping_criteria"] = StoppingCriteriaList([_FirstLineDone(self.tokenizer, ids.shape[1])])
            seqs = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                num_return_sequences=1,
                pad_token_id=self.pad_id,
                synced_gpus=synced,
                **kwargs,
            )
            if b is not None:
                texts = decode_like_reference(self.tokenizer, seqs)
                out.update((i, extract_answer(t, shots)) for i, t in zip(b, texts))
                self.on_batch(1)
        return self._gather(out, len(encoded))
