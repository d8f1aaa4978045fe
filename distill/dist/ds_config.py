"""DeepSpeed config = a JSON with ZeRO settings only + values injected from the run config.

The JSON under ``ds_configs/`` holds ZeRO settings (stage, offload, buckets, persistence). Batch
sizes, gradient accumulation, clipping and precision come from the run config and are injected
here; a JSON that sets one of them to a different value is an error (never a silent override).
Optimizer and scheduler are built by the trainer (AdamW + warmup/cosine), so a JSON ``optimizer``
or ``scheduler`` block is refused too.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

from distill.config import ConfigError

if TYPE_CHECKING:  # annotations only: this module is imported before torch is needed
    import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

# Keys the run config owns.
_OWNED_BLOCKS = ("optimizer", "scheduler")


def resolve_path(path: str) -> Path:
    """A ds_config path as given, else relative to the repository root."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    cand = REPO_ROOT / path
    return cand if cand.is_file() else p


def load_json(path: str) -> tuple[dict, Path]:
    p = resolve_path(path)
    if not p.is_file():
        shipped = ", ".join(sorted(f"ds_configs/{x.name}" for x in (REPO_ROOT / "ds_configs").glob("*.json")))
        raise ConfigError(f"deepspeed.config: {path} does not exist (also looked in {REPO_ROOT}); "
                          f"give a DeepSpeed JSON file, e.g. one of {shipped or 'ds_configs/*.json'}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: {p} is not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"deepspeed.config: {p} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config: {p}: top level must be an object {{...}}, got a {type(data).__name__}")
    check_json(data, p)
    check_known_keys(data, p)
    return data, p


# Modules whose upper-case string constants name DeepSpeed config keys (a generous list: a key read
# by the installed DeepSpeed must never be refused; the probe in _deepspeed_top_keys adds the rest).
_KEY_MODULES = ("deepspeed.runtime.constants", "deepspeed.runtime.zero.config",
                "deepspeed.runtime.activation_checkpointing.config", "deepspeed.profiling.constants",
                "deepspeed.autotuning.constants", "deepspeed.runtime.swap_tensor.constants",
                "deepspeed.runtime.data_pipeline.constants", "deepspeed.checkpoint.constants",
                "deepspeed.comm.constants", "deepspeed.monitor.config", "deepspeed.runtime.config")


def _deepspeed_top_keys() -> set[str]:
    """The top-level keys the installed DeepSpeed knows: every key its config parser looks up (a
    recording dict handed to ``DeepSpeedConfig``) plus the key constants of its config modules."""
    import importlib

    seen: set[str] = set()

    class _Recorder(dict):
        def get(self, k, default=None):
            seen.add(k)
            return super().get(k, default)

        def __getitem__(self, k):
            seen.add(k)
            return super().__getitem__(k)

        def __contains__(self, k):
            seen.add(k)
            return super().__contains__(k)

    try:
        from deepspeed.runtime.config import DeepSpeedConfig

        DeepSpeedConfig(_Recorder(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=1))
    except Exception:  # noqa: BLE001 - a partial probe only narrows nothing: the constants below still count
        pass
    for name in _KEY_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        seen |= {v for k, v in vars(mod).items() if k.isupper() and isinstance(v, str) and v.isidentifier()}
    return seen


def _model_keys(model) -> dict[str, object]:
    """{accepted key: its pydantic field} of a DeepSpeed config model (field names and their aliases)."""
    out = {}
    for name, f in model.model_fields.items():
        out[name] = f
        if f.alias:
            out[f.alias] = f
    return out


def _sub_model(field):
    """The DeepSpeed config model a field holds (also inside Optional[...]), or None."""
    import typing

    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    for t in (field.annotation, *typing.get_args(field.annotation)):
        if isinstance(t, type) and issubclass(t, DeepSpeedConfigModel):
            return t
    return None


def _unknown(key: str, known, where: str, src: Path) -> ConfigError:
    import difflib

    near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"{src}: '{where}{key}' is not a DeepSpeed setting{hint} (DeepSpeed would ignore it "
                       f"or stop with a traceback)")


def check_known_keys(data: dict, src: Path) -> None:
    """Every top-level key is one the installed DeepSpeed reads, and every key under
    ``zero_optimization`` (offload blocks included) is a field of its ZeRO config model: a misspelt
    key (``zero_optimisation``) would otherwise run another algorithm (ZeRO stage 0) without a word."""
    top = _deepspeed_top_keys()
    for key in data:
        if key not in top:
            raise _unknown(key, top, "", src)
    z = data.get("zero_optimization")
    if isinstance(z, dict):
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        def walk(node: dict, model, where: str) -> None:
            fields = _model_keys(model)
            for key, v in node.items():
                if key not in fields:
                    raise _unknown(key, fields, where, src)
                sub = _sub_model(fields[key])
                if sub is not None and isinstance(v, dict):
                    walk(v, sub, f"{where}{key}.")

        walk(z, DeepSpeedZeroConfig, "zero_optimization.")


# Keys the project reads or injects, with the JSON types they must have (DeepSpeed checks the rest).
_INT = "an integer"
_NUM = "a number"
_BOOL = "true or false"
_OBJ = "an object {...}"
_KEY_TYPES = {
    "train_micro_batch_size_per_gpu": _INT, "gradient_accumulation_steps": _INT, "train_batch_size": _INT,
    "gradient_clipping": _NUM, "steps_per_print": _INT, "wall_clock_breakdown": _BOOL,
    "bf16": _OBJ, "fp16": _OBJ, "bf16.enabled": _BOOL, "fp16.enabled": _BOOL, "zero_optimization": _OBJ,
    "zero_optimization.offload_optimizer": _OBJ, "zero_optimization.offload_param": _OBJ,
    "zero_optimization.overlap_comm": _BOOL, "zero_optimization.contiguous_gradients": _BOOL,
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": _BOOL,
    **{f"zero_optimization.{k}": _NUM for k in (
        "reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size", "sub_group_size",
        "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance")},
}


def _has_type(v, kind: str) -> bool:
    if kind == _OBJ:
        return isinstance(v, dict)
    if kind == _BOOL:
        return isinstance(v, bool)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return kind == _NUM or float(v).is_integer()


def check_json(data: dict, src: Path) -> None:
    """The keys the project reads/injects have the right JSON types and the ZeRO stage is 0..3."""
    for dotted, kind in _KEY_TYPES.items():
        node, parts = data, dotted.split(".")
        for p in parts[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or parts[-1] not in node:
            continue
        v = node[parts[-1]]
        if (v == "auto" and kind != _OBJ) or (v is None and "offload" in dotted):
            continue  # "auto": filled from the run config; offload null = none
        if not _has_type(v, kind):
            raise ConfigError(f"{src}: '{dotted}' = {v!r} must be {kind}")
        if kind in (_INT, _NUM) and v < 0:
            raise ConfigError(f"{src}: '{dotted}' = {v!r} must be >= 0")
    z = data.get("zero_optimization") or {}
    if "stage" in z and (isinstance(z["stage"], bool) or z["stage"] not in (0, 1, 2, 3)):
        raise ConfigError(f"{src}: 'zero_optimization.stage' = {z['stage']!r} must be 0, 1, 2 or 3 "
                          f"(or drop it and set deepspeed.zero_stage)")
    for off in ("offload_optimizer", "offload_param"):
        dev = (z.get(off) or {}).get("device", "none")
        if dev not in ("none", "cpu", "nvme", None):
            raise ConfigError(f"{src}: 'zero_optimization.{off}.device' = {dev!r} must be none, cpu or nvme")


def resolve_precision(dtype: str, on_gpu: bool) -> str:
    """'bf16' | 'fp16' | 'fp32' for a model.dtype value (auto = bf16 on GPU, fp32 on CPU)."""
    d = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "float32": "fp32", "fp32": "fp32"}
    if dtype == "auto":
        return "bf16" if on_gpu else "fp32"
    return d[dtype]


def _inject(cfg: dict, dotted: str, value, src: Path) -> None:
    node = cfg
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    key = parts[-1]
    if key in node and node[key] != "auto" and node[key] != value:
        raise ConfigError(
            f"{src}: '{dotted}' = {node[key]!r} conflicts with the run config's value {value!r}; "
            f"remove it from the JSON (batch sizes, accumulation, clipping and precision come from the run config)"
        )
    node[key] = value


def build_ds_config(run_cfg, world_size: int, *, on_gpu: bool) -> dict:
    """The resolved DeepSpeed config of the student engine."""
    base, src = load_json(run_cfg.deepspeed.config)
    for block in _OWNED_BLOCKS:
        if block in base:
            raise ConfigError(
                f"{src}: a '{block}' block is not allowed: the trainer builds AdamW and the warmup/cosine "
                f"schedule from the run config (train.lr, train.warmup_steps, ...)"
            )
    cfg = copy.deepcopy(base)
    t = run_cfg.train
    prec = resolve_precision(run_cfg.model.dtype, on_gpu)
    _inject(cfg, "train_micro_batch_size_per_gpu", t.micro_batch, src)
    _inject(cfg, "gradient_accumulation_steps", t.grad_accum, src)
    _inject(cfg, "train_batch_size", t.micro_batch * t.grad_accum * world_size, src)
    _inject(cfg, "gradient_clipping", float(t.grad_clip), src)
    _inject(cfg, "bf16.enabled", prec == "bf16", src)
    _inject(cfg, "fp16.enabled", prec == "fp16", src)
    stage = run_cfg.deepspeed.zero_stage
    if stage >= 0:
        _inject(cfg, "zero_optimization.stage", stage, src)
    cfg.setdefault("zero_optimization", {}).setdefault("stage", 0)
    cfg.setdefault("steps_per_print", 10**9)  # the trainer logs; keep DeepSpeed's own step prints off
    cfg.setdefault("wall_clock_breakdown", False)
    # Gathered 16-bit weights on save let export and eval read a full state dict under ZeRO-3.
    if cfg["zero_optimization"]["stage"] == 3:
        cfg["zero_optimization"].setdefault("stage3_gather_16bit_weights_on_model_save", True)
    return cfg


def zero_stage(ds_cfg: dict) -> int:
    return int(ds_cfg.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_cfg: dict) -> bool:
    off = ds_cfg.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device", "none") not in ("none", None)


def teacher_ds_config(student_cfg: dict, dtype: torch.dtype) -> dict:
    """Inference-only ZeRO-3 config for the frozen teacher: the student's partitioning, the teacher's
    own precision (``dtype``: its resolved torch dtype, ``model.teacher_dtype``), no optimizer, no
    optimizer offload, no gradient settings that need an optimizer.

    The precision flags decide the teacher's dtype: ``deepspeed.zero.Init`` (entered by
    ``from_pretrained`` under this config) casts every floating parameter it creates to bf16 / fp16 /
    fp32 from ``bf16.enabled`` / ``fp16.enabled``, whatever dtype ``from_pretrained`` was given, and
    the engine does not cast ZeRO-Init parameters again. Copying the student's flags ran the teacher
    in the student's dtype."""
    import torch

    prec = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype)
    if prec is None:
        raise ConfigError(f"teacher dtype {dtype}: bfloat16 | float16 | float32")
    z = dict(student_cfg.get("zero_optimization", {}))
    z.pop("offload_optimizer", None)
    z["stage"] = 3
    return {
        "train_micro_batch_size_per_gpu": student_cfg["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": 1,
        "bf16": {**student_cfg.get("bf16", {}), "enabled": prec == "bf16"},
        "fp16": {**student_cfg.get("fp16", {}), "enabled": prec == "fp16"},
        "zero_optimization": z,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
