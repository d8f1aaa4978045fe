"""The ``vllm`` teacher backend (``teacher.placement=vllm``): the frozen teacher in a vLLM engine on
each rank, scoring the supervised positions of every micro-batch through ``prompt_logprobs``.

It is the Ray backend (:class:`distill.teacher.ray_backend.RayTeacher`: the top-k check, the tokenizer
check, the split of a micro-batch into sequences and supervised positions, the prefetch queue, the
reply as a :class:`~distill.losses.teacher_output.TopKTeacher` ``[N, k]``) with another client: this
rank's :class:`distill.teacher.vllm_engine.VLLMEngine` (settings ``teacher.vllm``; on GPUs
``teacher.vllm.gpu_memory_utilization`` is the share of the rank's GPU it takes beside the student),
in ``model.teacher_dtype`` (fp32 on a CPU). The engine answers when asked (at ``prefetch``), at
``kd.temperature`` over the student tokenizer's real vocabulary, log-probs in fp32, the tail
``1 - sum(top-k)``: the conventions of the co-located and Ray top-k teachers.
"""

from __future__ import annotations

import dataclasses

from distill.config import RunConfig
from distill.teacher.base import BackendContext
from distill.teacher.ray_backend import RayTeacher


class VLLMTeacher(RayTeacher):
    """See the module docstring."""

    placement = "vllm"

    def open_client(self, cfg: RunConfig, ctx: BackendContext):
        from distill.teacher.vllm_engine import VLLMEngine

        settings = cfg.teacher.vllm
        if not settings.max_model_len:
            settings = dataclasses.replace(settings, max_model_len=cfg.data.max_len)
        return VLLMEngine(ctx.teacher_path, settings, dtype=cfg.model.teacher_dtype, seed=cfg.train.seed,
                          max_logprobs=cfg.kd.topk, key="teacher.placement")
