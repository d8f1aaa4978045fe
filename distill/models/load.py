"""Load students and teachers (hub names or folders), check they share a tokenizer, pick dtype/attention.

``"builtin"`` names the tiny models built here (:mod:`distill.models.builtin`); anything else goes
to ``transformers`` ``from_pretrained`` (hub name or local folder), exactly as on a cluster.
Under ZeRO-3 the caller passes the DeepSpeed config so that ``from_pretrained`` builds the model
already partitioned (``HfDeepSpeedConfig`` -> ``deepspeed.zero.Init``): a 70B teacher never exists
whole on one rank.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from distill.errors import UserError
from distill.models.fingerprint import tokenizer_fingerprint


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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_WHERE = "model.student / model.teacher / model.tokenizer"


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _looks_local(name: str) -> bool:
    """A path, not a hub name ``org/name``: starts with / . ~, has more than one '/', or its first part exists."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def local_folder(name: str, what: str = "model folder") -> Path | None:
    """The folder of a local model/tokenizer name; None for a hub name. A missing local path is a UserError."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise UserError(f"{what} {name} is a file, not a folder: give the folder that holds config.json, the "
                        f"weights and the tokenizer files ({_WHERE})")
    if _looks_local(name):
        parent = p.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        raise UserError(f"{what} {name} does not exist (the nearest existing folder is {parent}); check the path "
                        f"({_WHERE})")
    return None


def _hub_error(name: str, what: str, e: BaseException) -> UserError:
    return UserError(f"{what} {name} is not a local folder and could not be found or downloaded from the Hugging "
                     f"Face hub ({_first_line(e)}); give a local folder, or download it first where there is a "
                     f"network (huggingface-cli download {name})")


def load_tokenizer(name: str, *, trust_remote_code: bool = False, what: str = "tokenizer folder"):
    from transformers import AutoTokenizer

    folder = local_folder(name, what)
    if folder is not None and not has_tokenizer(str(folder)):
        raise UserError(f"{what} {folder} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the "
                        f"tokenizer there (tokenizer.save_pretrained) or set model.tokenizer to a tokenizer folder")
    for f in ("config.json", "tokenizer_config.json"):
        if folder is not None and (folder / f).is_file():
            _read_json(folder / f, what)  # read first by AutoTokenizer: a broken one is named here
    try:
        tok = AutoTokenizer.from_pretrained(str(folder or name), trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except Exception as e:  # tokenizers raises plain Exception on a corrupt tokenizer.json
        if folder is None:
            if isinstance(e, (OSError, ValueError)):
                raise _hub_error(name, what, e) from e
            raise
        raise UserError(f"{what} {folder}: the tokenizer could not be loaded ({_first_line(e)}); its files may be "
                        f"truncated or corrupt: re-save or re-download them") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # decoder-only models often ship without a pad token
    return tok


def has_tokenizer(name: str) -> bool:
    p = Path(name).expanduser()
    if not p.is_dir():
        return True  # hub names: assume the repo has one (from_pretrained says otherwise)
    return any((p / f).is_file() for f in _TOKENIZER_FILES)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{what}: {path} is not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}; re-save or "
                        f"re-download the folder") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what}: {path} cannot be read ({_first_line(e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what}: {path} must hold a JSON object, got a {type(data).__name__}")
    return data


def not_a_causal_lm(config: dict) -> str | None:
    """What a model config describes when ``AutoModelForCausalLM`` would not load it as a causal LM
    (e.g. ``"a bert (BertForMaskedLM)"``), else None.

    transformers maps some encoders to a causal class (a BERT loads as ``BertLMHeadModel``, with a
    warning) and a headless ``*Model`` gets a random ``lm_head``: neither is a language model to
    distil into or evaluate. The test: a class in ``architectures`` that transformers' causal-LM
    mapping lists (or, for remote code, a ``*ForCausalLM`` / ``*LMHeadModel`` name or an ``auto_map``
    entry for ``AutoModelForCausalLM``); without ``architectures``, the ``model_type``'s.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if "AutoModelForCausalLM" in (config.get("auto_map") or {}):
        return None
    mtype = str(config.get("model_type") or "model")
    archs = [a for a in config.get("architectures") or () if isinstance(a, str)]
    if archs:
        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        if any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            return None
        return f"a {mtype} ({', '.join(archs)})"
    if mtype not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        # a model type transformers does not know (remote code without auto_map): nothing to go by
        return f"a {mtype} model" if mtype in CONFIG_MAPPING_NAMES else None
    if mtype in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.get("is_decoder"):
        return f"a {mtype} whose config lists no architectures and does not set is_decoder (an encoder)"
    return None


def check_model_folder(folder: Path, what: str = "model folder") -> None:
    """config.json readable and describing a causal LM, and a weights file (or every shard of an index)
    present with a readable header."""
    if not (folder / "config.json").is_file():
        raise UserError(f"{what} {folder} has no config.json: not a Hugging Face model folder (save one with "
                        f"save_pretrained, or point {_WHERE} at the folder that holds config.json)")
    kind = not_a_causal_lm(_read_json(folder / "config.json", what))
    if kind:
        where = f" ({_WHERE})" if what.startswith(("student", "teacher", "tokenizer", "model folder")) else ""
        raise UserError(f"{what} {folder} is {kind}, not a causal language model (its config.json names no "
                        f"*ForCausalLM class): distillation, prediction and SentiBench need a decoder-only LM "
                        f"(Llama, Qwen2, ...); give the folder of one{where}")
    present = [f for f in _WEIGHT_FILES if (folder / f).is_file()]
    if not present:
        raise UserError(f"{what} {folder} has no weights file ({', '.join(_WEIGHT_FILES)}); copy the weights in or "
                        f"re-save the model (model.save_pretrained)")
    files = [folder / present[0]]
    if present[0].endswith(".index.json"):
        wmap = _read_json(folder / present[0], what).get("weight_map") or {}
        files = [folder / f for f in sorted(set(wmap.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{what} {folder}: {len(missing)} weight shard(s) listed in {present[0]} are missing "
                            f"({', '.join(missing[:3])}); re-download the folder")
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="pt"):
                    pass
            except Exception as e:
                raise UserError(f"{what}: weights file {f} is truncated or corrupt ({_first_line(e)}); re-save or "
                                f"re-download it") from e


def check_hub_config(name: str, what: str = "model", *, trust_remote_code: bool = False) -> None:
    """A hub name's config.json (no weights) describes a causal LM; a config that cannot be fetched
    is left to ``from_pretrained``, which says why."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code).to_dict()
    except Exception:
        return
    kind = not_a_causal_lm(cfg)
    if kind:
        raise UserError(f"{what} {name} (Hugging Face hub) is {kind}, not a causal language model: distillation, "
                        f"prediction and SentiBench need a decoder-only LM (Llama, Qwen2, ...)")


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


def check_teacher_without_tokenizer(teacher_path: str, student_tok, *, student_name: str,
                                    trust_remote_code: bool = False) -> None:
    """A teacher folder without tokenizer files is assumed to share the student's tokenizer: say so, and
    refuse it when its embedding has fewer rows than that tokenizer has tokens."""
    from transformers import AutoConfig

    folder = local_folder(teacher_path, "teacher folder")
    if folder is None:
        return
    check_model_folder(folder, "teacher folder")
    mcfg = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    if hasattr(mcfg, "get_text_config"):
        mcfg = mcfg.get_text_config()
    rows, n = int(getattr(mcfg, "vocab_size", 0) or 0), len(student_tok)
    if rows and rows < n:
        raise TokenizerMismatch(
            f"teacher {folder} has no tokenizer files and {rows} embedding rows, fewer than the {n} tokens of the "
            f"student's tokenizer ({student_name}): it cannot share that tokenizer; save the teacher's tokenizer in "
            f"its folder (tokenizer.save_pretrained) or use a teacher of the student's family")
    from distill.dist.env import print0

    print0(f"[trainer] warning: teacher {folder} has no tokenizer files; assuming it shares the student's tokenizer "
           f"of {n} tokens ({student_name}; the teacher has {rows or 'an unknown number of'} embedding rows)")


def check_teacher_tokenizer(teacher_path: str, student_tok, *, student_name: str, trust_remote_code: bool = False,
                            what: str = "teacher folder (model.teacher)") -> None:
    """Token-level KD needs one vocabulary: the teacher's tokenizer (or, without one, its config's
    vocabulary) must be the student's; every teacher backend calls this before loading weights."""
    if has_tokenizer(teacher_path):
        ttok = load_tokenizer(teacher_path, trust_remote_code=trust_remote_code, what=what)
        check_shared_tokenizer(student_tok, ttok, student_name=student_name, teacher_name=teacher_path)
    else:
        check_teacher_without_tokenizer(teacher_path, student_tok, student_name=student_name,
                                        trust_remote_code=trust_remote_code)


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


def load_causal_lm(name: str, *, dtype: torch.dtype, attn: str | None, device: str = "cpu",
                   trust_remote_code: bool = False, zero3_config: dict | None = None,
                   grad_checkpointing: bool = False, quantization: str = "", what: str = "model folder"):
    """``AutoModelForCausalLM.from_pretrained`` with dtype / attention (None: transformers' default);
    partitioned at load under ZeRO-3;
    ``quantization`` 8bit (LLM.int8) | 4bit (NF4, compute in ``dtype``): bitsandbytes linear layers
    placed on ``device`` at load (transformers keeps lm_head and the embeddings in ``dtype``)."""
    from transformers import AutoModelForCausalLM

    folder = local_folder(name, what)
    if folder is not None:
        check_model_folder(folder, what)
    else:
        check_hub_config(name, what, trust_remote_code=trust_remote_code)
    keep = None
    if zero3_config is not None:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(zero3_config)  # must stay alive during from_pretrained
    extra = {}
    if quantization:
        if zero3_config is not None:
            raise UserError(f"{what} {name}: quantization={quantization} cannot be ZeRO-3 partitioned")
        from transformers import BitsAndBytesConfig

        q = (BitsAndBytesConfig(load_in_8bit=True) if quantization == "8bit" else
             BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype))
        extra = {"quantization_config": q, "device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder or name), dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code, **extra)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        if folder is None:
            if isinstance(e, OSError):
                raise _hub_error(name, what, e) from e
            raise
        raise UserError(f"{what} {folder}: the weights could not be loaded ({_first_line(e)}); they may be truncated, "
                        f"corrupt or not match config.json: re-save or re-download the folder") from e
    finally:
        if keep is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            del keep
    if zero3_config is None and not quantization:  # quantized weights were placed at load
        model.to(device)
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model
