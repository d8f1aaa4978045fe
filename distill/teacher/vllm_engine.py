"""vLLM as an engine: the harvest's generation, a teacher's top-k scores, the student's rollouts.

:class:`VLLMEngine` holds one ``vllm.LLM`` in this process and answers with the calls and conventions
of :class:`distill.teacher.local.LocalTeacher`, so the harvest, the teacher backends and the rollouts
use it in its place (docs/teacher.md, "Which engine"):

* ``generate(prompts, sampling, seeds=)``: one :class:`~distill.teacher.pipeline.Generation` per
  prompt. The prompts are encoded exactly as the HF engine encodes them (no special tokens added) and
  handed to vLLM as token ids; every prompt has its own sampling seed. ``finish_reason`` is ``stop``
  (an end-of-sequence or stop token, not part of the text) or ``length``.
* ``topk(sequences, positions, k, temperature=, vocab_size=)``: the top-k of
  ``softmax(logits[:vocab_size] / temperature)`` at each requested position (HF convention: position
  ``p`` predicts token ``p + 1``), from vLLM's ``prompt_logprobs``, as a
  :class:`~distill.losses.teacher_output.TopKTeacher` per sequence with fp32 log-probs and the tail
  mass ``1 - sum(exp(top-k))``. vLLM's prompt log-probs are raw (no sampling temperature): the
  temperature and the vocabulary cut are applied inside the engine's logits layer for the call (its
  ``scale`` and ``org_vocab_size``); in fp32 the result equals the HF teacher's top-k (same ids,
  log-probs and tail within 2e-5: tests/vllm/test_teacher_engine.py).
* ``sample(prompt_ids, limits=, ...)``: responses as token ids, the end-of-sequence token kept as the
  last one (the rollout convention of :func:`distill.models.generate.sample_responses`).
* ``load_weights(named_tensors)``: new weights in place (the on-policy student's weight sync), then
  the prefix cache is dropped so no stale key/value is reused.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): weight updates hand over
tensors without pickling, and the logits-layer settings above reach the model directly. Inside a
multi-rank run (a process group of several ranks exists) every rank builds its own engine at the same time, over the
run's process group (vLLM's ``external_launcher``), with ``tensor_parallel_size`` 1. vLLM lowers
torch's thread count to 1 when it starts; the count is restored, since a trainer shares the process.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
import torch

from distill.config import ConfigError, VLLMSection
from distill.losses.teacher_output import TopKTeacher
from distill.teacher import pipeline as P
from distill.teacher.local import completed_future
from distill.teacher.pipeline import Generation, SamplingParams

CPU_MIN_HEAD_DIM = 32  # vLLM 0.32's CPU attention refuses smaller heads (measured: 16 fails, 32 runs)
INSTALL_HINT = ("install it with pip install -e '.[vllm]' on a GPU machine; on a CPU-only machine vLLM's CPU build "
                "goes in an environment of its own (docs/teacher.md, 'vLLM on a CPU')")


def require_vllm(key: str):
    """The ``vllm`` module, or a ConfigError naming ``key`` and how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"{key}=vllm but vLLM is not importable here ({e}); {INSTALL_HINT}") from None
    return vllm


def _dtype_name(dtype: str) -> str:
    names = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
             "fp32": "float32", "float32": "float32"}
    if dtype not in names:
        raise ConfigError(f"vLLM engine dtype={dtype!r}: auto | bfloat16 | float16 | float32")
    return names[dtype]


class VLLMEngine:
    """One in-process vLLM engine over ``model`` (see the module docstring). ``dtype``: the weights'
    dtype (``auto`` = the checkpoint's on a GPU, float32 on a CPU, where bf16 top-k sets differ from
    HF's); ``seed``: the engine's own seed (every request also carries one)."""

    def __init__(self, model: str | os.PathLike, settings: VLLMSection | None = None, *, dtype: str = "auto",
                 seed: int = 0, max_logprobs: int = 20, key: str = "engine"):
        s = settings or VLLMSection()
        s.validate(key)
        require_vllm(key)
        on_gpu = torch.cuda.is_available()
        dtype = _dtype_name(dtype)
        if dtype == "auto" and not on_gpu:
            dtype = "float32"
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{s.kv_cache_gb:g}")
        from transformers import AutoConfig
        from vllm import LLM

        self.model = str(model)
        self.config = AutoConfig.from_pretrained(self.model)
        text = getattr(self.config, "text_config", None) or self.config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if not on_gpu and head_dim < CPU_MIN_HEAD_DIM:
            # vLLM's CPU attention fails at the first forward ("Unsupported CPU attention configuration").
            raise ConfigError(f"{key}=vllm on a CPU: {self.model} has head dimension {head_dim}, and vLLM's CPU "
                              f"attention needs at least {CPU_MIN_HEAD_DIM}; use engine hf for this model here")
        kwargs = dict(model=self.model, dtype=dtype, seed=seed, enforce_eager=s.enforce_eager,
                      tensor_parallel_size=s.tensor_parallel_size, max_logprobs=max(20, int(max_logprobs)))
        if s.max_model_len:
            kwargs["max_model_len"] = s.max_model_len
        if on_gpu:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            # Inside a multi-rank run every rank holds its own engine over the run's process group
            # (vLLM's external launcher: its groups are built from the ranks already there). A group of
            # one (a 1-process DeepSpeed run, or vLLM's own from an earlier engine) is vLLM's usual case.
            if s.tensor_parallel_size != 1:
                raise ConfigError(f"{key}=vllm inside a run of {torch.distributed.get_world_size()} rank(s): every rank "
                                  f"holds its own engine, so tensor_parallel_size must be 1 (got "
                                  f"{s.tensor_parallel_size}); spread a larger model over more ranks instead")
            kwargs["distributed_executor_backend"] = "external_launcher"
        threads = torch.get_num_threads()
        self.llm = LLM(**kwargs)
        torch.set_num_threads(threads)
        self.tokenizer = self.llm.get_tokenizer()
        self.info = P.teacher_info(self.model, self.config, self.tokenizer)
        self.info.max_context = min(self.info.max_context, int(self.llm.llm_engine.model_config.max_model_len))
        self._closed = False

    # -- the logits layer -----------------------------------------------------------------------------
    def _set_head(self, scale_div: float, vocab: int | None) -> list:
        """Divide the logits layer's scale by ``scale_div`` and cut its vocabulary to ``vocab``; returns
        what :meth:`_restore_head` puts back."""

        def apply(model):
            lp = model.logits_processor
            old = (lp.scale, lp.org_vocab_size)
            lp.scale = lp.scale / scale_div
            if vocab is not None:
                lp.org_vocab_size = vocab
            return old

        return self.llm.apply_model(apply)

    def _restore_head(self, old: list) -> None:
        def apply(model):
            lp = model.logits_processor
            lp.scale, lp.org_vocab_size = old[0]

        self.llm.apply_model(apply)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"VLLMEngine({self.model}) was shut down; create a new one")

    # -- top-k ----------------------------------------------------------------------------------------
    def topk(self, sequences: list[list[int]], positions: list[list[int]], k: int, *, temperature: float = 1.0,
             vocab_size: int | None = None) -> list[TopKTeacher]:
        """One TopKTeacher ``[len(positions[i]), k]`` per sequence (see the module docstring)."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        self._check_open()
        P.validate_topk(self.info, sequences, positions, k, temperature=temperature, vocab_size=vocab_size)
        vocab = P.topk_vocab(self.info, vocab_size)
        # The last position of a sequence predicts a token after it: vLLM gives that one as the log-probs
        # of its single sampled token; every other position comes from the prompt log-probs.
        sp = VSP(max_tokens=1, temperature=0.0, prompt_logprobs=k, logprobs=k, detokenize=False)
        old = self._set_head(float(temperature), vocab if vocab < self.info.vocab_size else None)
        try:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, s))) for s in sequences], sp,
                                     use_tqdm=False)
        finally:
            self._restore_head(old)
        result = []
        for seq, pos, o in zip(sequences, positions, outs):
            id_rows, lp_rows = [], []
            for p in map(int, pos):
                entry = o.prompt_logprobs[p + 1] if p + 1 < len(seq) else o.outputs[0].logprobs[0]
                top = sorted((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank <= k)[:k]
                if len(top) != k:
                    raise RuntimeError(f"vLLM returned {len(top)} of the top {k} log-probs at position {p}")
                id_rows.append([t for _, t, _ in top])
                lp_rows.append([v for _, _, v in top])
            ids = torch.tensor(id_rows, dtype=torch.int32).reshape(len(pos), k)
            lps = torch.tensor(lp_rows, dtype=torch.float32).reshape(len(pos), k)
            tail = (1.0 - lps.double().exp().sum(-1)).clamp(min=0.0).float()
            result.append(TopKTeacher(ids=ids, logprobs=lps, tail_mass=tail, temperature=float(temperature)))
        return result

    def async_topk(self, sequences, positions, k, *, temperature: float = 1.0, vocab_size: int | None = None) -> Future:
        return completed_future(self.topk, sequences, positions, k, temperature=temperature, vocab_size=vocab_size)

    # -- generation -----------------------------------------------------------------------------------
    def _sampling(self, max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int, stop: list[int],
                  detokenize: bool):
        from vllm import SamplingParams as VSP

        # ignore_eos: our stop list (the end-of-sequence ids included) is the only thing that ends a
        # sequence, as in the HF engine, not vLLM's own reading of the tokenizer's end token.
        return VSP(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else 0,
                   seed=int(seed), stop_token_ids=stop, ignore_eos=True, detokenize=detokenize, skip_special_tokens=True)

    def generate(self, prompts: list[str], sampling: SamplingParams | None = None, *,
                 seeds: list[int] | None = None) -> list[Generation]:
        """One Generation per prompt (the HF engine's encoding, seeds and finish reasons)."""
        from vllm.inputs import TokensPrompt

        self._check_open()
        sampling, ids, seeds = P.prepare_generation(self.info, self.tokenizer, prompts, sampling, seeds)
        stop = sorted(set(self.info.eos_token_ids) | set(sampling.stop_token_ids))
        params = [self._sampling(min(sampling.max_new_tokens, self.info.max_context - len(x)), sampling.temperature,
                                 sampling.top_p, sampling.top_k, seed, stop, False) for x, seed in zip(ids, seeds)]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], params, use_tqdm=False)
        gens = []
        for x, o in zip(ids, outs):
            c = o.outputs[0]
            toks = list(c.token_ids)
            reason = "stop" if c.finish_reason == "stop" else "length"
            if reason == "stop" and toks and toks[-1] in stop:
                toks = toks[:-1]
            gens.append(Generation(self.tokenizer.decode(toks, skip_special_tokens=True), toks, reason, len(x)))
        return gens

    def async_generate(self, prompts, sampling=None, *, seeds=None) -> Future:
        return completed_future(self.generate, prompts, sampling, seeds=seeds)

    def sample(self, prompt_ids: list[list[int]], *, limits: list[int], temperature: float, top_p: float,
               eos_ids, seeds: list[int]) -> list[list[int]]:
        """Rollout responses (token ids; an end-of-sequence token that ended one is kept as its last)."""
        from vllm.inputs import TokensPrompt

        self._check_open()
        stop = sorted(set(int(e) for e in eos_ids))
        todo = [i for i, lim in enumerate(limits) if lim >= 1]  # no room left after the prompt: an empty response
        params = [self._sampling(int(limits[i]), temperature, top_p, 0, seeds[i], stop, False) for i in todo]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, prompt_ids[i]))) for i in todo], params,
                                 use_tqdm=False) if todo else []
        result: list[list[int]] = [[] for _ in prompt_ids]
        for i, o in zip(todo, outs):
            result[i] = list(o.outputs[0].token_ids)
        return result

    # -- weights --------------------------------------------------------------------------------------
    def load_weights(self, named_tensors) -> int:
        """Load ``(name, tensor)`` pairs (HF parameter names) into the engine's model; returns how many
        tensors were handed over. The prefix cache is reset afterwards."""
        items = [(n, t.detach()) for n, t in named_tensors]
        # vLLM's in-place reload: the checkpoint-format tensors go through the loaders and the kernels'
        # weight processing again (on a CPU the linear layers repack what they load).
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(items), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        return len(items)

    # -- the service calls ----------------------------------------------------------------------------
    @staticmethod
    def get(handle: Future, timeout: float | None = None):
        return handle.result(timeout)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        llm, self.llm = self.llm, None
        del llm
        import gc

        gc.collect()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

