"""The ``vllm`` teacher backend (``teacher.placement=vllm``): the frozen teacher in a vLLM engine on
each rank, scoring the supervised positions of every micro-batch through ``prompt_logprobs``.

* Each rank holds its own engine (:class:`distill.teacher.vllm_engine.VLLMEngine`, settings
  ``teacher.vllm``; on GPUs ``teacher.vllm.gpu_memory_utilization`` is the share of the rank's GPU it
  takes beside the student), in ``model.teacher_dtype`` (fp32 on a CPU).
* ``rows(batch, index)``: the micro-batch's sequences and supervised positions (split per packed
  example, as for the Ray teacher: :func:`distill.teacher.ray_backend.segments`) go to the engine; the
  reply is a :class:`~distill.losses.teacher_output.TopKTeacher` ``[N, k]`` in the order of the flat
  supervised rows, at ``kd.temperature`` over the student tokenizer's real vocabulary, log-probs in
  fp32, the tail ``1 - sum(top-k)``: the conventions of the co-located and Ray top-k teachers.
* The teacher's tokenizer must equal the student's (token-level KD): checked before the engine starts.
"""

from __future__ import annotations

import time

import torch

from distill.config import ConfigError, RunConfig
from distill.losses.teacher_output import TopKTeacher
from distill.teacher.base import BackendContext, TeacherBackend
from distill.teacher.ray_backend import cat_topk, segments


class VLLMTeacher(TeacherBackend):
    """See the module docstring. ``wait_s``: seconds spent in the engine (logged like the Ray wait)."""

    topk_ids_checked = False  # ids come from another library: the loop checks every reply

    def __init__(self, cfg: RunConfig, ctx: BackendContext):
        from distill.models import load as ml
        from distill.teacher.vllm_engine import VLLMEngine

        if cfg.kd.topk < 1:
            raise ConfigError("teacher.placement=vllm serves top-k only: set kd.topk (e.g. 64)")
        ml.check_teacher_tokenizer(ctx.teacher_path, ctx.tokenizer, student_name=ctx.student_path,
                                   trust_remote_code=cfg.model.trust_remote_code)
        settings = cfg.teacher.vllm
        if not settings.max_model_len:
            settings = type(settings)(**{**vars(settings), "max_model_len": cfg.data.max_len})
        self.engine = VLLMEngine(ctx.teacher_path, settings, dtype=cfg.model.teacher_dtype, seed=cfg.train.seed,
                                 max_logprobs=cfg.kd.topk, key="teacher.placement")
        self.k, self.temperature, self.vocab_size = cfg.kd.topk, cfg.kd.temperature, ctx.vocab_size
        self.device = ctx.device
        self.wait_s = 0.0

    def rows(self, batch: dict, index: torch.Tensor) -> TopKTeacher:
        cpu = index.cpu()
        ids = {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}
        seqs, poss = segments(ids, cpu)
        t0 = time.perf_counter()
        parts = self.engine.topk(seqs, poss, self.k, temperature=self.temperature, vocab_size=self.vocab_size) if seqs else []
        self.wait_s += time.perf_counter() - t0
        out = cat_topk(parts, self.k, self.temperature)
        return out.to(self.device)

    def __call__(self, batch: dict) -> TopKTeacher:
        raise ConfigError("teacher.placement=vllm scores the supervised positions only: use kd.path=lean")

    def close(self) -> None:
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()
