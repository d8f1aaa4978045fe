"""One pipeline stage of a causal-LM teacher: a contiguous range of decoder layers, loaded alone.

A teacher of ``L`` decoder layers split into ``S`` shards gives stage ``s`` the layers
``[s*L/S, (s+1)*L/S)`` (balanced, earlier stages get the extra layer); the first stage also holds the
token embeddings, the last the final norm and the ``lm_head``. Between stages travel only
``hidden [B, T, H]`` and the small ``attention_mask``/``position_ids``: each stage builds its own
rotary embedding and masks. A stage reads exactly its tensors from the checkpoint (skeleton on the
``meta`` device; untouched safetensors files are never opened or downloaded). Generation keeps a KV
cache per session on every stage, for its own layers only. Llama-style decoders of transformers 5.x
(Llama, Qwen2/2.5, Qwen3, Mistral); the layer call and the rest: docs/teacher.md, "How it is built".
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@functools.lru_cache(maxsize=None)
def _cache_kwarg(fn) -> str:
    """The KV-cache keyword of a transformers mask function or decoder layer: ``cache`` in the
    releases that renamed it (``past_key_values`` then warns it is deprecated), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def split_layers(num_layers: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous, balanced ``[start, end)`` layer ranges, one per shard."""
    if shards < 1:
        raise ValueError(f"shards={shards} must be >= 1")
    if shards > num_layers:
        raise ValueError(f"shards={shards} > the teacher's {num_layers} decoder layers: each shard needs >= 1 layer")
    base, extra = divmod(num_layers, shards)
    out, start = [], 0
    for s in range(shards):
        n = base + (1 if s < extra else 0)
        out.append((start, start + n))
        start += n
    return out


def resolve_dtype(dtype: str | torch.dtype, config, device: torch.device) -> torch.dtype:
    """``"auto"``: the checkpoint's dtype on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and inexact)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(d, str):
            d = _DTYPES.get(d, None)
        return d if isinstance(d, torch.dtype) else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of auto, {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def attn_implementation(device: torch.device) -> str:
    """flash-attention 2 when installed and on CUDA, else PyTorch SDPA."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


# ----------------------------------------------------------------------------------------------
# Checkpoint files


def _is_local(model: str | os.PathLike) -> bool:
    return Path(model).is_dir()


def load_config(model: str | os.PathLike):
    """The teacher's ``PretrainedConfig`` (local folder or hub name)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model))
    except OSError as e:
        raise OSError(f"teacher {model!s}: cannot read config.json ({e})") from e


def _fetch(model: str, filename: str) -> Path:
    """Path of one file of the teacher, downloading only that file for a hub name."""
    if _is_local(model):
        return Path(model) / filename
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=str(model), filename=filename))


def weight_files(model: str | os.PathLike, needed: set[str]) -> dict[Path, list[str]]:
    """Map safetensors file -> the needed tensor names it holds (only files that hold any)."""
    model = str(model)
    index_name = "model.safetensors.index.json"
    index_path = None
    if _is_local(model):
        if (Path(model) / index_name).is_file():
            index_path = Path(model) / index_name
        elif not (Path(model) / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"teacher {model}: neither model.safetensors nor {index_name} found (only safetensors checkpoints are supported)"
            )
    else:
        try:
            index_path = _fetch(model, index_name)
        except Exception:  # single-file checkpoint on the hub
            index_path = None
    if index_path is None:
        return {_fetch(model, "model.safetensors"): sorted(needed)}
    weight_map = json.loads(Path(index_path).read_text())["weight_map"]
    missing = sorted(n for n in needed if n not in weight_map)
    if missing:
        raise KeyError(f"teacher {model}: {index_path} has no entry for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    by_file: dict[str, list[str]] = {}
    for n in sorted(needed):
        by_file.setdefault(weight_map[n], []).append(n)
    return {_fetch(model, f): names for f, names in by_file.items()}


def read_tensors(model: str | os.PathLike, needed: set[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for path, names in weight_files(model, needed).items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            absent = [n for n in names if n not in keys]
            if absent:
                raise KeyError(f"teacher checkpoint file {path}: tensors {absent[:5]} are missing")
            for n in names:
                out[n] = f.get_tensor(n)
    return out


# ----------------------------------------------------------------------------------------------
# The stage module


@dataclass
class StageSpec:
    """Which part of the teacher a stage holds."""

    index: int  # stage number, 0-based
    num_stages: int  # stages per replica
    start: int  # first decoder layer (inclusive)
    end: int  # last decoder layer (exclusive)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


class TeacherStage(nn.Module):
    """Layers ``[start, end)`` of a causal LM, plus embeddings (first) / norm + lm_head (last)."""

    def __init__(self, config, spec: StageSpec, modules: dict[str, nn.Module], rotary: nn.Module):
        super().__init__()
        self.config = config
        self.spec = spec
        self.embed_tokens = modules.get("embed_tokens")
        self.layers = nn.ModuleList(modules["layers"])
        self.norm = modules.get("norm")
        self.lm_head = modules.get("lm_head")
        self.rotary_emb = rotary
        self.layer_types = [
            (config.layer_types[i] if getattr(config, "layer_types", None) else "full_attention")
            for i in range(spec.start, spec.end)
        ]
        self._caches: dict[Any, Any] = {}
        self._generators: dict[Any, list[torch.Generator]] = {}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- masks -----------------------------------------------------------------------------
    def _masks(self, hidden, attention_mask, position_ids, cache) -> dict[str, Any]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        masks = {}
        for t in dict.fromkeys(self.layer_types):
            # Size the mask against a layer of THIS stage: the cache holds only our layers.
            layer_idx = self.spec.start + self.layer_types.index(t)
            fn = create_sliding_window_causal_mask if t == "sliding_attention" else create_causal_mask
            masks[t] = fn(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                position_ids=position_ids,
                layer_idx=layer_idx if cache is not None else None,
                **{_cache_kwarg(fn): cache},
            )
        return masks

    @torch.no_grad()
    def run_layers(self, payload: dict) -> torch.Tensor:
        """Embeddings (first stage) and this stage's decoder layers; returns hidden states."""
        dev = self.device
        sid = payload.get("sid")
        attention_mask = payload["attention_mask"].to(dev)
        position_ids = payload["position_ids"].to(dev)
        if self.spec.is_first:
            hidden = self.embed_tokens(payload["input_ids"].to(dev))
        else:
            hidden = payload["hidden"].to(dev)
        cache = None
        if sid is not None:
            cache = self._caches.get(sid)
            if cache is None:
                from transformers import DynamicCache

                cache = self._caches[sid] = DynamicCache(config=self.config)
        masks = self._masks(hidden, attention_mask, position_ids, cache)
        cos_sin = self.rotary_emb(hidden, position_ids=position_ids)
        for layer, t in zip(self.layers, self.layer_types):
            hidden = layer(
                hidden,
                attention_mask=masks[t],
                position_ids=position_ids,
                use_cache=cache is not None,
                position_embeddings=cos_sin,
                **{_cache_kwarg(type(layer).forward): cache},
            )
        return hidden

    @torch.no_grad()
    def forward(self, payload: dict) -> Any:
        """Run this stage on ``payload``; a non-last stage returns the payload for the next stage.

        payload: ``input_ids`` (first) or ``hidden``; ``attention_mask [B, T_past+T]``,
        ``position_ids [B, T]``; optional ``sid`` (generation session: keep a KV cache);
        ``task``: what the last stage computes (``topk`` or ``sample``).
        """
        task = payload["task"]
        if task["kind"] == "release":
            self.release(payload["sid"])
            return payload if not self.spec.is_last else None
        hidden = self.run_layers(payload)
        if not self.spec.is_last:
            out = {k: v for k, v in payload.items() if k not in ("input_ids", "hidden")}
            out["hidden"] = hidden
            return out
        hidden = self.norm(hidden)
        if task["kind"] == "topk":
            return self._topk(hidden, task)
        if task["kind"] == "sample":
            return self._sample(hidden, payload.get("sid"), task)
        if task["kind"] == "logits":
            return self.lm_head(hidden).float()
        raise ValueError(f"unknown stage task {task['kind']!r}")

    def release(self, sid) -> None:
        self._caches.pop(sid, None)
        self._generators.pop(sid, None)

    # -- last-stage tasks --------------------------------------------------------------------
    def _topk(self, hidden: torch.Tensor, task: dict):
        """Top-k at the requested (row, position) pairs only; lm_head runs on those rows alone, a chunk
        at a time, over the first ``vocab_size`` rows (the tokenizer's tokens) at ``temperature``."""
        from distill.losses.teacher_output import TopKTeacher

        rows = task["rows"].to(hidden.device)  # [N] batch row of each requested position
        cols = task["cols"].to(hidden.device)  # [N] position in that row
        k = task["k"]
        values_dtype = task.get("values_dtype", torch.bfloat16)
        chunk = task.get("chunk_rows", 1024)
        temperature = float(task.get("temperature", 1.0))
        vocab = task.get("vocab_size")
        picked = hidden[rows, cols]  # [N, H]
        ids, lps, tails = [], [], []
        for i in range(0, picked.shape[0], chunk):
            logits = self.lm_head(picked[i : i + chunk]).float()
            t = TopKTeacher.from_logits(logits, k, temperature=temperature, vocab_size=vocab,
                                        values_dtype=values_dtype)
            ids.append(t.ids.cpu())
            lps.append(t.logprobs.cpu())
            tails.append(t.tail_mass.cpu())
        if not ids:
            return TopKTeacher(
                ids=torch.zeros(0, k, dtype=torch.int32),
                logprobs=torch.zeros(0, k, dtype=values_dtype),
                tail_mass=torch.zeros(0, dtype=torch.float32),
                temperature=temperature,
            )
        return TopKTeacher(ids=torch.cat(ids), logprobs=torch.cat(lps), tail_mass=torch.cat(tails),
                           temperature=temperature)

    def _sample(self, hidden: torch.Tensor, sid, task: dict) -> torch.Tensor:
        """Next token of every row from the logits at the last position (greedy / temperature / top-p)."""
        logits = self.lm_head(hidden[:, -1]).float()  # [B, V]
        vocab_limit = task.get("vocab_limit")
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = -float("inf")  # padded embedding rows are not tokens
        temperature = float(task.get("temperature", 0.0))
        if temperature <= 0.0:
            return logits.argmax(-1).cpu()
        if task.get("seeds") is not None:
            self._generators[sid] = [torch.Generator().manual_seed(int(s)) for s in task["seeds"]]
        gens = self._generators.get(sid)
        probs = torch.softmax(logits / temperature, dim=-1).cpu()
        top_p = float(task.get("top_p", 1.0))
        top_k = int(task.get("top_k", 0) or 0)
        if top_k > 0 and top_k < probs.shape[-1]:
            kth = probs.topk(top_k, dim=-1).values[:, -1:]
            probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        if top_p < 1.0:
            sp, si = probs.sort(dim=-1, descending=True)
            cum = sp.cumsum(-1)
            # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
            drop = (cum - sp) >= top_p * cum[:, -1:]
            sp = sp.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, si, sp)
        out = torch.empty(probs.shape[0], dtype=torch.long)
        for b in range(probs.shape[0]):
            g = gens[b] if gens is not None else None
            out[b] = torch.multinomial(probs[b], 1, generator=g)[0]
        return out


def build_stage(
    model: str | os.PathLike,
    spec: StageSpec,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "auto",
    quantization: str | None = None,
    config=None,
) -> TeacherStage:
    """Build stage ``spec`` of teacher ``model`` (folder or hub name), reading only its tensors."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    config = config or load_config(model)
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"teacher {model!s}: model_type={getattr(config, 'model_type', None)!r} is not supported by the "
            f"sharded teacher (supported: {SUPPORTED_MODEL_TYPES}; Llama-style decoders)"
        )
    if quantization not in (None, "8bit", "4bit"):
        raise ValueError(f"quantization={quantization!r} must be None, '8bit' or '4bit'")
    if quantization is not None and device.type != "cuda":
        raise RuntimeError(
            f"quantization={quantization!r} needs CUDA (bitsandbytes kernels); this stage is on {device}. "
            "Use quantization=None on CPU."
        )
    torch_dtype = resolve_dtype(dtype, config, device)
    config._attn_implementation = attn_implementation(device)
    n_layers = config.num_hidden_layers
    if not (0 <= spec.start < spec.end <= n_layers):
        raise ValueError(f"stage layers [{spec.start}, {spec.end}) outside the teacher's {n_layers} layers")

    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    base = full.model
    modules: dict[str, Any] = {"layers": [base.layers[i] for i in range(spec.start, spec.end)]}
    names: dict[str, str] = {}  # stage param name -> checkpoint name
    if spec.is_first:
        modules["embed_tokens"] = base.embed_tokens
    if spec.is_last:
        modules["norm"] = base.norm
        modules["lm_head"] = full.lm_head
    rotary = type(base.rotary_emb)(config=config)
    stage = TeacherStage(config, spec, modules, rotary)
    del full, base

    tied = bool(getattr(config, "tie_word_embeddings", False))
    for pname, _ in stage.named_parameters():
        if pname.startswith("layers."):
            _, j, rest = pname.split(".", 2)
            names[pname] = f"model.layers.{spec.start + int(j)}.{rest}"
        elif pname.startswith("embed_tokens.") or pname.startswith("norm."):
            names[pname] = f"model.{pname}"
        elif pname.startswith("lm_head."):
            names[pname] = "model.embed_tokens.weight" if tied else pname
        elif pname.startswith("rotary_emb."):
            continue
        else:
            raise RuntimeError(f"unexpected parameter {pname} in teacher stage")
    tensors = read_tensors(model, set(names.values()))
    state = {p: tensors[c].to(torch_dtype) for p, c in names.items()}
    stage.load_state_dict(state, strict=False, assign=True)
    left_on_meta = [n for n, p in stage.named_parameters() if p.is_meta]
    if left_on_meta:
        raise RuntimeError(f"teacher {model!s}: no checkpoint tensors for {left_on_meta[:5]}")
    for n, b in stage.named_buffers():
        if b.is_meta:
            raise RuntimeError(f"teacher stage buffer {n} was not initialised")
    stage.to(device)
    if quantization is not None:
        _quantize_linears(stage.layers, quantization, torch_dtype)
    stage.eval()
    stage.requires_grad_(False)
    return stage


def _quantize_linears(module: nn.Module, quantization: str, compute_dtype: torch.dtype) -> None:
    """Swap every nn.Linear under ``module`` for a bitsandbytes 8-bit / 4-bit (NF4) layer, on CUDA."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - a hard dependency
        raise ImportError("quantization needs bitsandbytes (pip install bitsandbytes)") from e
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            dev = child.weight.device
            w = child.weight.data.to("cpu")
            if quantization == "8bit":
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False, threshold=6.0)
                q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            else:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.to("cpu"), requires_grad=False)
            setattr(module, name, q.to(dev))  # moving to CUDA quantizes
        else:
            _quantize_linears(child, quantization, compute_dtype)


def context_length(config) -> int:
    return int(getattr(config, "max_position_embeddings", None) or math.inf)
