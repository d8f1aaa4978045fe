"""In-process teacher with the service's calls (no Ray): single-process runs, tests, debugging.

``LocalTeacher(model, shards=2)`` runs the same stage modules as the Ray service one after another in
this process, so sharded and unsharded results can be compared without Ray. ``async_*`` calls
compute eagerly and return a resolved :class:`concurrent.futures.Future` (``.result()``), the
in-process stand-in for an ObjectRef; ``topk``/``generate`` return the values directly.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import Future

import torch

from distill.data.batching import plan_batches
from distill.teacher import pipeline as P
from distill.teacher.pipeline import Generation, SamplingParams


class LocalTeacher:
    """A causal-LM teacher held in this process as ``shards`` pipeline stages."""

    def __init__(self, model: str | os.PathLike, *, shards: int = 1, dtype: str = "auto", quantization: str | None = None,
                 device: str | None = None, max_batch_tokens: int = 16384, max_batch_size: int = 64,
                 values_dtype: torch.dtype = torch.bfloat16):
        from transformers import AutoTokenizer

        from distill.teacher.shard import StageSpec, build_stage, load_config, split_layers

        self.model = str(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.config = load_config(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model)
        except Exception:  # top-k scoring works on ids alone
            self.tokenizer = None
        self.info = P.teacher_info(self.model, self.config, self.tokenizer)
        ranges = split_layers(self.info.num_layers, shards)
        self.stages = [
            build_stage(model, StageSpec(i, shards, s, e), device=self.device, dtype=dtype,
                        quantization=quantization, config=self.config)
            for i, (s, e) in enumerate(ranges)
        ]
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.values_dtype = values_dtype
        self._closed = False

    async def _run(self, payload):
        for st in self.stages:
            payload = st(payload)
        return payload

    def _check_open(self):
        if self._closed:
            raise RuntimeError(f"LocalTeacher({self.model}) was shut down; create a new one")

    # -- top-k --------------------------------------------------------------------------------
    def topk(self, sequences: list[list[int]], positions: list[list[int]], k: int, *, temperature: float = 1.0,
             vocab_size: int | None = None):
        """One TopKTeacher [len(positions[i]), k] per sequence at ``temperature`` over the first
        ``vocab_size`` tokens (default: the tokenizer's real vocabulary; see distill.teacher.pipeline)."""
        self._check_open()
        P.validate_topk(self.info, sequences, positions, k, temperature=temperature, vocab_size=vocab_size)
        out = [None] * len(sequences)
        for batch in plan_batches([len(s) for s in sequences], self.max_batch_size, self.max_batch_tokens):
            res = asyncio.run(P.topk_batch(self._run, self.info, [sequences[i] for i in batch],
                                           [positions[i] for i in batch], k, self.values_dtype, temperature,
                                           vocab_size))
            for i, r in zip(batch, res):
                out[i] = r
        return out

    def async_topk(self, sequences, positions, k, *, temperature: float = 1.0, vocab_size: int | None = None) -> Future:
        return completed_future(self.topk, sequences, positions, k, temperature=temperature, vocab_size=vocab_size)

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompts: list[str], sampling: SamplingParams | None = None, *, seeds: list[int] | None = None):
        """One Generation per prompt."""
        self._check_open()
        sampling, ids, seeds = P.prepare_generation(self.info, self.tokenizer, prompts, sampling, seeds)
        vocab_limit = len(self.tokenizer) if self.tokenizer is not None else None
        out: list = [None] * len(prompts)
        for batch in plan_batches([len(x) + sampling.max_new_tokens for x in ids], self.max_batch_size,
                                    self.max_batch_tokens):
            res = asyncio.run(P.generate_batch(self._run, self.info, [ids[i] for i in batch], sampling,
                                               [seeds[i] for i in batch], vocab_limit))
            for i, (toks, reason) in zip(batch, res):
                out[i] = Generation(self.tokenizer.decode(toks, skip_special_tokens=True), toks, reason, len(ids[i]))
        return out

    def async_generate(self, prompts, sampling=None, *, seeds=None) -> Future:
        return completed_future(self.generate, prompts, sampling, seeds=seeds)

    @staticmethod
    def get(handle: Future, timeout: float | None = None):
        """Resolve an ``async_*`` result (same call as TeacherService.get)."""
        return handle.result(timeout)

    def shutdown(self) -> None:
        self.stages = []
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def completed_future(fn, *args, **kwargs) -> Future:
    """``fn(*args, **kwargs)`` computed now, as a resolved Future: the in-process stand-in for a Ray
    ObjectRef of the ``async_*`` calls (an error raises here, at the call, as the service's does)."""
    f: Future = Future()
    f.set_result(fn(*args, **kwargs))
    return f
