"""Load students and teachers (hub names or folders), check they share a tokenizer, pick dtype/attention.

``"builtin"`` names the tiny models built here (:mod:`distill.models.builtin`); anything else goes
to ``transformers`` ``from_pretrained`` (hub name or local folder), exactly as on a cluster.
Under ZeRO-3 the caller passes the DeepSpeed config so that ``from_pretrained`` builds the model
already partitioned (``HfDeepSpeedConfig`` -> ``deepspeed.zero.Init``): a 70B teacher never exists
whole on one rank.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from distill.errors import UserError


class TokenizerMismatch(UserError, ValueError):
    """Teacher and student do not share a tokenizer (logit-level KD is impossible)."""


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def resolve_dtype(name: str, on_gpu: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return _DTYPES[name]


def resolve_attn(name: str, on_gpu: bool) -> str:
    """auto -> flash_attention_2 when flash-attn is installed and a GPU is used, else sdpa."""
    if name != "auto":
        return name
    if on_gpu:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def resolve_builtin(model_cfg, out_dir: str | Path) -> tuple[str, str]:
    """(student path, teacher path) with ``builtin`` replaced by the cached built-in folders."""
    student, teacher = model_cfg.student, model_cfg.teacher
    if "builtin" in (student, teacher):
        from distill.models.builtin import ensure_builtin_student, ensure_builtin_teacher

        work = Path(model_cfg.builtin_dir or Path(out_dir) / "builtin")
        if teacher == "builtin":
            teacher = str(ensure_builtin_teacher(work))
        if student == "builtin":
            student = str(ensure_builtin_student(work))
    return student, teacher


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # decoder-only models often ship without a pad token
    return tok


def has_tokenizer(name: str) -> bool:
    p = Path(name)
    if not p.is_dir():
        return True  # hub names: assume the repo has one (from_pretrained says otherwise)
    return any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))


def tokenizer_fingerprint(tok) -> str:
    """Hash of the token -> id map (special tokens included)."""
    items = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


def check_shared_tokenizer(student_tok, teacher_tok, *, student_name: str, teacher_name: str) -> None:
    """Refuse logit KD between different tokenizers (sizes and names in the message)."""
    ns, nt = len(student_tok), len(teacher_tok)
    if ns != nt or tokenizer_fingerprint(student_tok) != tokenizer_fingerprint(teacher_tok):
        raise TokenizerMismatch(
            f"teacher and student do not share a tokenizer: teacher {teacher_name} has {nt} tokens, "
            f"student {student_name} has {ns} tokens"
            + ("" if ns != nt else " (same size, different token -> id maps)")
            + ". Logit-level KD needs one vocabulary; use a student of the teacher's family, or label-level "
            "distillation (ICLDist, loss.classification=label)."
        )


def check_embedding_rows(model_config, real_vocab: int, name: str) -> int:
    """The model's logit width; it may exceed the tokenizer (padding rows) but never fall short."""
    rows = int(getattr(model_config, "vocab_size", 0) or 0)
    if rows and rows < real_vocab:
        raise TokenizerMismatch(
            f"{name}: {rows} embedding rows but the tokenizer has {real_vocab} tokens: the model does not "
            f"belong to this tokenizer"
        )
    return rows


def final_logit_softcap(model_config) -> float | None:
    """Gemma-2 style final-logit softcap from the config (None when the model has none)."""
    cap = getattr(model_config, "final_logit_softcapping", None)
    if cap is None and hasattr(model_config, "get_text_config"):
        cap = getattr(model_config.get_text_config(), "final_logit_softcapping", None)
    return float(cap) if cap else None


def logit_transform(model) -> tuple[float, float | None]:
    """``(scale, softcap)`` such that ``logits = softcap(scale * lm_head(final_hidden))`` as the
    model's own forward computes them: Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``,
    Gemma's final-logit softcap (None: no cap)."""
    scale = 1.0
    if getattr(model, "logit_scale", None) is not None and not isinstance(model.logit_scale, torch.nn.Module):
        scale *= float(model.logit_scale)  # Cohere: a float attribute of the CausalLM
    div = getattr(model.config, "logits_scaling", None)
    if div:
        scale /= float(div)  # Granite
    return scale, final_logit_softcap(model.config)


def load_causal_lm(name: str, *, dtype: torch.dtype, attn: str, device: str = "cpu",
                   trust_remote_code: bool = False, zero3_config: dict | None = None,
                   grad_checkpointing: bool = False):
    """``AutoModelForCausalLM.from_pretrained`` with dtype / attention; partitioned at load under ZeRO-3."""
    from transformers import AutoModelForCausalLM

    keep = None
    if zero3_config is not None:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(zero3_config)  # must stay alive during from_pretrained
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code)
    finally:
        if keep is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            del keep
    if zero3_config is None:
        model.to(device)
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model
