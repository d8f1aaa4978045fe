"""Several vLLM engines behind Ray (the harvest's ``teacher.engine=vllm`` with ``teacher.backend=ray``).

:class:`VLLMReplicas` starts ``teacher.replicas`` Ray actors, each holding one
:class:`~distill.teacher.vllm_engine.VLLMEngine` (``teacher.vllm.tensor_parallel_size`` GPUs each on a
GPU cluster, one CPU each on a CPU), and hands the harvest's shards to them in turn: ``async_generate``
returns the ObjectRef of one actor's reply, ``get`` resolves it. The calls, the prompts' encoding,
the seeds and the finish reasons are the engine's, so a shard gets the same generations whichever
replica writes it.

Ray is joined as for the HF service (``teacher.ray_address``: a running cluster, or "" for a private
single-node Ray on loopback, stopped again at :meth:`shutdown`). A replica actor that dies is restarted
by Ray up to ``teacher.max_restarts`` times and the shard it held re-sent up to ``teacher.max_retries``
times; past that the harvest stops with one line (:class:`~distill.teacher.pipeline.TeacherUnavailable`)
and resumes from its manifest.
"""

from __future__ import annotations

import os

import ray
import torch

from distill.config import VLLMSection
from distill.teacher.pipeline import SamplingParams, TeacherUnavailable


class _EngineActor:
    """One replica: a vLLM engine in a Ray actor."""

    def __init__(self, model: str, settings: VLLMSection, dtype: str, seed: int):
        from distill.teacher.vllm_engine import VLLMEngine

        self.engine = VLLMEngine(model, settings, dtype=dtype, seed=seed, key="teacher.engine")

    def ready(self) -> bool:
        return True

    def generate(self, prompts: list[str], sampling: SamplingParams, seeds: list[int]):
        return self.engine.generate(prompts, sampling, seeds=seeds)


class VLLMReplicas:
    """See the module docstring."""

    def __init__(self, model: str | os.PathLike, settings: VLLMSection, *, replicas: int, dtype: str = "auto",
                 seed: int = 0, ray_address: str | None = None, max_restarts: int = 3, max_retries: int = 3,
                 start_timeout_s: float = 1800.0, temp_dir: str | None = None):
        from transformers import AutoTokenizer

        from distill.teacher.ray_service import join_ray

        if replicas < 1:
            raise ValueError(f"replicas={replicas} must be >= 1")
        self.model, self.replicas = str(model), replicas
        self.max_restarts, self.max_retries = max_restarts, max_retries
        self.tokenizer = AutoTokenizer.from_pretrained(self.model)  # the harvest's chat templates
        self._owns_ray = join_ray(ray_address or None, temp_dir, replicas)
        gpus = settings.tensor_parallel_size if torch.cuda.is_available() else 0
        actor = ray.remote(_EngineActor).options(num_cpus=1, num_gpus=gpus, max_restarts=max_restarts,
                                                 max_task_retries=max_retries)
        self._actors = [actor.remote(self.model, settings, dtype, seed + i) for i in range(replicas)]
        self._next = 0
        try:
            ray.get([a.ready.remote() for a in self._actors], timeout=start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise TeacherUnavailable(f"the {replicas} vLLM replica(s) ({gpus or 1} {'GPU' if gpus else 'CPU'}(s) each) did "
                                     f"not all start within {start_timeout_s:g} s; free or add those resources, or lower "
                                     f"teacher.replicas") from None
        except BaseException:
            self.shutdown()
            raise

    def async_generate(self, prompts: list[str], sampling: SamplingParams | None = None, *,
                       seeds: list[int] | None = None):
        """The ObjectRef of the next replica's generations of ``prompts`` (replicas take turns)."""
        if not self._actors:
            raise RuntimeError(f"VLLMReplicas({self.model}) was shut down; create a new one")
        actor = self._actors[self._next % len(self._actors)]
        self._next += 1
        return actor.generate.remote(list(prompts), sampling or SamplingParams(), seeds)

    def get(self, handle, timeout: float | None = None):
        """``ray.get`` of a reply; a replica that died past its budget ends in one TeacherUnavailable line."""
        from distill.teacher.ray_service import get_reply

        return get_reply(handle, timeout, max_restarts=self.max_restarts, max_retries=self.max_retries)

    def shutdown(self) -> None:
        """Stop the replicas (and the private Ray started here, if any). Idempotent."""
        from distill.teacher.ray_service import stop_ray

        actors, self._actors = getattr(self, "_actors", []), []
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        if self._owns_ray and ray.is_initialized():
            stop_ray()
            self._owns_ray = False
