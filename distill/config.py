"""Typed run configuration: nested dataclasses, loaded as defaults <- --config YAML <- --a.b=value.

The loader is generic (``load_config(SchemaClass, argv)``); each stage defines its schema as nested
``@dataclass``es whose every field has a default and a one-line comment with units. Unknown keys, in
YAML or on the command line, are errors that name the key and the file. Cross-field checks live in
each schema's ``validate()`` and run before any process group exists.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import math
import os
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from distill.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key and where it came from."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _sub(where: str, name: str) -> str:
    """``where`` + key: ``config file x.yaml:`` + ``train`` -> ``config file x.yaml: train``; else dotted."""
    return f"{where} {name}" if where.endswith(":") else f"{where}.{name}"


def _json_value(value: str, where: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: {value!r} is not valid JSON ({e.msg} at column {e.colno})") from None


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, where)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        return _coerce_sequence(value, tp, where)
    if origin is dict:
        if isinstance(value, str):
            value = _json_value(value, where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        return _coerce_bool(value, where)
    if tp is int:
        return _coerce_int(value, where)
    if tp is float:
        return _coerce_float(value, where)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    """``X | None`` and other unions: None (or "none"/"null") where None is allowed, else the first member
    type that reads ``value``; the error lists why each member refused it."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
        return None
    errors = []
    for a in args:
        if a is type(None):
            continue
        try:
            return _coerce(value, a, where)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(f"{where}: cannot read {value!r} as {tp}: {'; '.join(errors)}")


def _coerce_sequence(value: Any, tp: Any, where: str) -> list | tuple:
    """``list[X]`` / ``tuple[X, ...]``: a YAML list, a JSON list string or a comma-separated string."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, str):
        value = [v for v in (x.strip() for x in value.split(",")) if v] if not value.startswith("[") else _json_value(value, where)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    inner = args[0] if args else Any
    out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    return out if origin is list else tuple(out)


def _coerce_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"{where}: expected true/false, got {value!r}")


def _coerce_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                f = float(value)  # "1e4" is a fine integer on a command line
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
    raise ConfigError(f"{where}: expected an integer, got {value!r}")


def _coerce_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected a number, got {value!r}")


# Keys that moved: (section class, key) -> what replaces it.
_MOVED = {("DeepSpeedSection", "teacher_zero3"): "teacher.placement (auto | partitioned | replicated | ray)"}


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from a (possibly partial) mapping; unknown keys are errors."""
    types_ = _field_types(cls)
    unknown = sorted(str(k) for k in set(data) - set(types_))
    for k in unknown:
        if (cls.__name__, k) in _MOVED:
            raise ConfigError(f"{where.rstrip(':')}: {k} was replaced by {_MOVED[cls.__name__, k]}")
    if unknown:
        raise ConfigError(f"{where.rstrip(':')}: unknown key(s) {unknown} for section {cls.__name__}; known: {sorted(types_)}")
    defaults = cls()
    kwargs = {}
    for name, tp in types_.items():
        if name in data:
            sub = _sub(where, name)
            if _is_dataclass_type(tp) and isinstance(data[name], dict):
                base = to_dict(getattr(defaults, name))
                kwargs[name] = from_dict(tp, _deep_merge(base, data[name]), sub)
            else:
                kwargs[name] = _coerce(data[name], tp, sub)
        else:
            kwargs[name] = getattr(defaults, name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (JSON/YAML serialisable) of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` of a nested dict (e.g. :func:`to_dict` of a config): one key per leaf."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _set_dotted(tree: dict, dotted: str, value: str) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(argv: list[str]) -> tuple[str | None, dict, list[str]]:
    """Split argv into (--config path, nested override dict, leftover args).

    Accepts ``--config file.yaml``, ``--config=file.yaml``, ``--a.b=value`` and ``--a.b value``.
    ``--local_rank``/``--local-rank`` (added by the deepspeed launcher) is returned in leftovers.
    """
    config_path = None
    overrides: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if arg == "--config":
                if i + 1 >= len(argv):
                    raise ConfigError("--config needs a file path")
                path, i = argv[i + 1], i + 2
            else:
                path, i = arg.split("=", 1)[1], i + 1
            if config_path is not None:
                raise ConfigError(f"--config given twice ({config_path}, {path}): give one file and put further "
                                  f"changes as --section.key=value")
            config_path = path
            continue
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            key = arg[2:]
            if "=" in key:
                key, value = key.split("=", 1)
                i += 1
            else:
                if i + 1 >= len(argv):
                    raise ConfigError(f"--{key} needs a value")
                value = argv[i + 1]
                i += 2
            _set_dotted(overrides, key, value)
            continue
        rest.append(arg)
        i += 1
    return config_path, overrides, rest


class _DuplicateKey(Exception):
    def __init__(self, key, first_line: int, line: int):
        super().__init__(key, first_line, line)
        self.key, self.first_line, self.line = key, first_line, line


def _strict_loader():
    """A yaml SafeLoader that refuses a key given twice in one mapping (plain PyYAML keeps the last)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # `<<: *anchor` merges; explicit keys may override merged ones
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            raise _DuplicateKey(key, seen[key], line)
                        seen[key] = line
                    except TypeError:
                        continue  # unhashable key: the base constructor reports it
            return super().construct_mapping(node, deep)

    return StrictLoader


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist (check the --config path)")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file (give --config a .yaml file)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot be read ({type(e).__name__}: {e})") from e
    try:
        data = yaml.load(text, Loader=_strict_loader())
    except _DuplicateKey as e:
        raise ConfigError(f"config file {path}: key {e.key!r} is given twice (lines {e.first_line} and {e.line}); "
                          f"keep one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if ctx and cmark is not None and cmark is not mark:
            problem += f" ({ctx} that starts at line {cmark.line + 1}, column {cmark.column + 1})"
        raise ConfigError(f"config file {path}: invalid YAML{at}: {problem} "
                          f"(check the indentation, the ':' after each key and the quotes)") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections (run:, model:, train:, ...), "
                          f"got a {type(data).__name__}")
    return data


def load_config(cls: type[T], argv: list[str] | None = None, *, config_path: str | None = None) -> tuple[T, list[str]]:
    """defaults <- YAML (``--config``) <- ``--section.key=value``. Returns (config, leftover args).

    Calls ``cfg.validate()`` when the schema defines it. ``--help`` / ``-h`` prints every key of the
    schema with its default and comment (:func:`config_help`) and ``--print-config`` the resolved
    config as YAML; both then exit 0 (``SystemExit(0)``), so every launcher has them.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cli_path, overrides, rest = parse_overrides(argv)  # values of --a.b VALUE are never taken as flags
    if "--help" in rest or "-h" in rest:
        print(config_help(cls, prog=Path(sys.argv[0]).name if sys.argv and sys.argv[0] else None), flush=True)
        raise SystemExit(0)
    for i, a in enumerate(rest):
        # a value after the flag was ignored (`--print-config yaml` printed and exited 0) or read as
        # an unknown argument (`--print-config=x`)
        given = a.split("=", 1)[1] if a.startswith("--print-config=") else (
            rest[i + 1] if a == "--print-config" and i + 1 < len(rest) and not rest[i + 1].startswith("-") else None)
        if given is not None:
            raise ConfigError(f"--print-config takes no value (got {given!r}): it prints the resolved config as YAML; "
                              f"give it alone, e.g. --config FILE.yaml --print-config")
    print_config = "--print-config" in rest
    rest = [a for a in rest if a != "--print-config"]
    path = cli_path or config_path
    data: dict = {}
    where = "defaults"
    if path:
        data = load_yaml(path)
        where = f"config file {path}:"
    cfg = from_dict(cls, data, where=where)
    if overrides:
        merged = _deep_merge(to_dict(cfg), overrides)
        cfg = from_dict(cls, merged, where="command line:")
    _apply_steps_rule(cfg, data, overrides)
    if hasattr(cfg, "validate"):
        cfg.validate()
    if print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="", flush=True)
        raise SystemExit(0)
    return cfg, rest


def _apply_steps_rule(cfg: Any, data: dict, overrides: dict) -> None:
    """One rule for every stage: ``train.epochs`` given (YAML or flag) without ``train.steps`` trains
    by epochs, whatever step count the stage's built-in default has; both given with steps > 0: steps
    wins, said in one line (rank 0)."""
    train = getattr(cfg, "train", None)
    if not isinstance(train, TrainSection):
        return
    given = set()
    for src in (data, overrides):
        sec = src.get("train") if isinstance(src, dict) else None
        if isinstance(sec, dict):
            given |= set(sec)
    if "epochs" in given and "steps" not in given:
        train.steps = 0
    elif "epochs" in given and train.steps > 0 and os.environ.get("RANK", "0") in ("", "0"):
        print(f"[config] train.steps={train.steps} and train.epochs={train.epochs:g} are both set: steps wins "
              f"(set train.steps=0 to train for {train.epochs:g} epochs)", file=sys.stderr, flush=True)


# -- help generated from the schema: a field's default and its trailing `# comment` -----------------


@functools.lru_cache(maxsize=None)
def _own_field_comments(klass: type) -> dict[str, str]:
    """Trailing comments of the fields ``klass`` itself declares (``name: type = default  # comment``).

    Read from the class source with ast (where each field's statement starts and ends) and tokenize
    (the comments), so a multi-line default or a ``#`` inside a string default cannot confuse it. The
    first comment on the statement's lines is the field's. {} when the source is not available.
    """
    try:
        src = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments.setdefault(tok.start[0], tok.string.lstrip("#").strip())
    tree = ast.parse(src)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    out: dict[str, str] = {}
    for stmt in node.body if node is not None else []:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            for line in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1):
                if line in comments:
                    out[stmt.target.id] = comments[line]
                    break
    return out


def field_comments(cls: type) -> dict[str, str]:
    """name -> one-line comment of every field of dataclass ``cls`` that has one, inherited ones included
    (a subclass that re-declares a field without a comment keeps its parent's)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_field_comments(klass))
    return out


def _default_text(value: Any) -> str:
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return repr(value)


def config_help(cls: type, prog: str | None = None) -> str:
    """The ``--help`` text of schema ``cls``: every key as ``--section.key=DEFAULT  comment``, by section.

    Defaults are those of ``cls()`` (a stage's own defaults, not the base schema's); comments come from
    the dataclass sources (:func:`field_comments`), so the text follows the schema.
    """
    defaults = cls()
    doc = (inspect.getdoc(cls) or "").split("\n\n")[0].strip()
    lines = [f"usage: {prog or 'launcher'} [--config FILE.yaml] [--section.key=VALUE ...] [--print-config] [--help]",
             "",
             "Settings: defaults <- --config FILE.yaml <- --section.key=VALUE (also --section.key VALUE;",
             "lists as a,b or JSON). --print-config prints the resolved config as YAML and exits.",
             "--local_rank / $LOCAL_RANK are accepted (set by the deepspeed launcher)."]
    if doc and not doc.startswith(f"{cls.__name__}("):  # dataclasses generate a signature docstring
        lines += ["", doc]
    top: list[str] = []

    def rows(klass: type, obj: Any, prefix: str) -> list[tuple[str, str]]:
        comments, types_, out = field_comments(klass), _field_types(klass), []
        for f in dataclasses.fields(klass):
            value = getattr(obj, f.name)
            if _is_dataclass_type(types_[f.name]):
                out += rows(types_[f.name], value, f"{prefix}{f.name}.")
            else:
                out.append((f"--{prefix}{f.name}={_default_text(value)}", comments.get(f.name, "")))
        return out

    comments, types_ = field_comments(cls), _field_types(cls)
    for f in dataclasses.fields(cls):
        tp, value = types_[f.name], getattr(defaults, f.name)
        if not _is_dataclass_type(tp):
            top.append(f"  --{f.name}={_default_text(value)}    {comments.get(f.name, '')}".rstrip())
            continue
        note = comments.get(f.name) or (inspect.getdoc(tp) or "").split("\n")[0]
        if note.startswith(f"{tp.__name__}("):
            note = ""
        lines += ["", f"{f.name}:" + (f"  {note}" if note else "")]
        body = rows(tp, value, f"{f.name}.")
        width = min(max((len(k) for k, _ in body), default=0), 56)
        for key, comment in body:
            pad = " " * max(width - len(key), 0)
            lines.append(f"  {key}{pad}  {comment}".rstrip())
    if top:
        lines += ["", "top level:"] + top
    return "\n".join(lines)


def dump_yaml(cfg: Any, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


# ================================================================================================
# The trainer's run schema (distill/train/build.py, launchers/knowdist.py). Every field has a default;
# the defaults are the built-in tiny CPU run. Units are in the comments.


def require(cond: bool, msg: str) -> None:
    """A :class:`ConfigError` with ``msg`` (one line naming the key, its value and what to do) unless ``cond``."""
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass
class RunSection:
    out_dir: str = "runs/knowdist"  # run folder: config, metrics.jsonl, checkpoints/, export/
    name: str = ""  # free-form run name (logged; "" = the out_dir's folder name)


@dataclasses.dataclass
class ModelSection:
    student: str = "builtin"  # student init: HF hub name or folder; "builtin" = the tiny student built here
    teacher: str = "builtin"  # teacher: HF hub name or folder; "builtin" = the tiny teacher trained here
    tokenizer: str = ""  # tokenizer name/folder ("" = the student's)
    dtype: str = "auto"  # student weights/compute: auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32
    teacher_dtype: str = "auto"  # teacher weights: auto (as dtype) | bfloat16 | float16 | float32
    attn: str = "auto"  # attention: auto (flash_attention_2 if installed and on GPU, else sdpa) | sdpa | eager | flash_attention_2
    grad_checkpointing: bool = False  # recompute student activations in backward (saves memory, ~30% slower)
    vocab_size: int = 0  # real vocabulary for the loss (0 = len(tokenizer)); logit columns beyond it are padding and masked
    trust_remote_code: bool = False  # passed to from_pretrained
    builtin_dir: str = ""  # cache of the built-in tokenizer/teacher/student ("" = <out_dir>/builtin)

    def teacher_dtype_name(self) -> str:
        """The teacher's dtype setting after ``auto`` (= the student's ``dtype``)."""
        return self.dtype if self.teacher_dtype == "auto" else self.teacher_dtype


@dataclasses.dataclass
class DataSection:
    name: str = "sft"  # dataset registry name (distill.data.registry.register_dataset)
    path: str = ""  # JSONL/JSON/Parquet file or folder, or a `datasets` name ("" = the launcher's default corpus)
    format: str = "auto"  # auto (by suffix; else datasets.load_dataset) | jsonl | json | parquet | datasets
    split: str = "train"  # split for `datasets` sources
    prompt_field: str = "prompt"  # record field holding the prompt (masked out of the loss)
    response_field: str = "response"  # record field holding the response (trained on)
    max_len: int = 512  # prompt + response, tokens; prompts are cut from the left, then responses from the right
    add_eos: bool = True  # append the tokenizer's eos token to every response
    limit: int = 0  # use only the first N records (0 = all)
    allow_partial: bool = False  # train on an unfinished KnowDist harvest folder (its finished shards), with a warning
    packing: bool = False  # pack several examples into one row of up to max_len tokens (per-example position ids; the loss is the unpacked batch's)


@dataclasses.dataclass
class TrainSection:
    steps: int = 0  # optimizer steps (0 = epochs x steps per epoch; a config giving epochs but not steps trains by epochs)
    epochs: float = 1.0  # passes over the data when steps is 0
    micro_batch: int = 8  # sequences per rank per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step (per rank)
    lr: float = 2e-5  # AdamW peak learning rate
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup_steps: int = 0  # linear warmup, optimizer steps
    schedule: str = "cosine"  # cosine | constant (after warmup)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    adam_betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])  # AdamW (beta1, beta2)
    adam_eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    seed: int = 0  # data order, dropout, RNG of every rank (rank r uses seed + r for its local RNG)

    def schedule_for(self, n_examples: int, world_size: int) -> tuple[int, int, int]:
        """(global batch, optimizer steps per epoch, total optimizer steps) for ``n_examples`` on
        ``world_size`` ranks: ``steps`` when > 0, else ``epochs`` x steps per epoch (at least 1)."""
        global_batch = self.micro_batch * self.grad_accum * world_size
        per_epoch = n_examples // global_batch
        return global_batch, per_epoch, self.steps or max(1, int(self.epochs * per_epoch))


@dataclasses.dataclass
class VLLMSection:
    """Settings of one vLLM engine (the harvest's ``teacher.vllm``, the trainer's ``teacher.vllm`` and
    ``kd.on_policy.vllm``)."""

    tensor_parallel_size: int = 1  # GPUs one engine spreads the model over (1 on a CPU)
    gpu_memory_utilization: float = 0.9  # share of each GPU's memory the engine may take (weights + KV cache)
    max_model_len: int = 0  # longest sequence (prompt + new tokens) the engine serves (0 = the model's context)
    enforce_eager: bool = False  # true = no CUDA graphs / torch.compile: a faster start, slower steps
    kv_cache_gb: float = 1.0  # CPU only: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE, unless already set)

    def validate(self, key: str) -> None:
        require(self.tensor_parallel_size >= 1, f"{key}.tensor_parallel_size={self.tensor_parallel_size} must be >= 1")
        require(0.0 < self.gpu_memory_utilization <= 1.0,
                f"{key}.gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        require(self.max_model_len >= 0, f"{key}.max_model_len={self.max_model_len} must be >= 0 (0 = the model's context)")
        require(self.kv_cache_gb > 0, f"{key}.kv_cache_gb={self.kv_cache_gb} must be > 0")


@dataclasses.dataclass
class OnPolicySection:
    """On-policy distillation (GKD): the student writes the response of a share of each step's examples,
    the teacher scores every token it wrote, and those rows train on the divergence alone
    (docs/on_policy.md)."""

    fraction: float = 0.0  # share of each optimizer step's examples whose response the student generates (0 = off)
    max_new_tokens: int = 128  # longest generated response (also capped by data.max_len minus the prompt)
    temperature: float = 1.0  # the student's sampling temperature (0 = greedy)
    top_p: float = 1.0  # nucleus sampling: keep the most likely tokens up to this probability mass (1 = all)
    batch_size: int = 0  # sequences per generation batch (0 = train.micro_batch)
    engine: str = "hf"  # hf (the student itself, under the training engine) | vllm (a vLLM engine per rank holding a copy of the student)
    sync_every: int = 1  # engine=vllm: copy the student's weights into the engine every this many optimizer steps (samples are up to sync_every - 1 updates stale)
    vllm: VLLMSection = dataclasses.field(default_factory=lambda: VLLMSection(gpu_memory_utilization=0.3))  # engine=vllm: its settings (max_model_len 0 = data.max_len)

    def validate(self) -> None:
        require(0.0 <= self.fraction <= 1.0, f"kd.on_policy.fraction={self.fraction} must be in [0, 1]")
        require(self.max_new_tokens >= 1, f"kd.on_policy.max_new_tokens={self.max_new_tokens} must be >= 1")
        require(self.temperature >= 0 and math.isfinite(self.temperature),
                f"kd.on_policy.temperature={self.temperature} must be a finite number >= 0 (0 = greedy)")
        require(0.0 < self.top_p <= 1.0, f"kd.on_policy.top_p={self.top_p} must be in (0, 1]")
        require(self.batch_size >= 0, f"kd.on_policy.batch_size={self.batch_size} must be >= 0 (0 = train.micro_batch)")
        require(self.engine in ("hf", "vllm"), f"kd.on_policy.engine={self.engine!r}: hf | vllm")
        require(self.sync_every >= 1, f"kd.on_policy.sync_every={self.sync_every} must be >= 1")
        self.vllm.validate("kd.on_policy.vllm")


@dataclasses.dataclass
class KDSection:
    kind: str = "forward_kl"  # forward_kl | reverse_kl | jsd | skew_kl | skew_reverse_kl | tvd | none (SFT only, no teacher)
    beta: float = 0.5  # jsd mixture weight (0 = forward KL, 1 = reverse KL)
    alpha: float = 0.1  # skew KL mixing weight
    temperature: float = 1.0  # divides both logit sets; the KD term is scaled by T^2
    ce_weight: float = 1.0  # weight of the cross-entropy on the response tokens
    kd_weight: float = 1.0  # weight of the divergence on the response tokens
    impl: str = "auto"  # auto (triton on CUDA, torch otherwise) | torch | triton
    chunk_tokens: int = 0  # tokens per chunk of the torch divergence (0 = the loss's default)
    teacher_backend: str = "colocated"  # teacher backend registry name (colocated = full logits from a teacher in this process)
    topk: int = 0  # k for top-k teacher backends (0 = full logits)
    path: str = "lean"  # lean (final hidden states of the supervised positions in, loss out: logits a chunk at a time) | logits (the models' full [B, L, V] logits; for comparison and debugging)
    cache_dir: str = ""  # kd.teacher_backend=cache: the offline top-k folder (python -m distill.knowdist.topk_cache) ("" = <run.out_dir>/teacher_topk)
    on_policy: OnPolicySection = dataclasses.field(default_factory=OnPolicySection)  # the student writes a share of the responses (GKD)


@dataclasses.dataclass
class DeepSpeedSection:
    engine: str = "deepspeed"  # deepspeed | torch (plain single-process engine, for tests and debugging)
    config: str = "ds_configs/zero3.json"  # DeepSpeed JSON with ZeRO settings only (relative paths: from the repo root)
    zero_stage: int = -1  # -1 = the JSON's stage; else injected (a different stage in the JSON is an error)
    dist_backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo


TEACHER_PLACEMENTS = ("auto", "partitioned", "replicated", "ray", "vllm")


@dataclasses.dataclass
class RayTeacherSection:
    """The settings of a teacher served to the ranks by Ray actors, read by
    :func:`distill.teacher.connect.open_teacher`: the trainer's ``teacher`` section and ICLDist's extend it."""

    quantization: str = ""  # "" | 8bit | 4bit: bitsandbytes weights, CUDA (trainer: replicated and ray; lm_head stays in teacher_dtype)
    ray_address: str = ""  # ray: a running cluster (HOST:PORT or auto); "" = a private Ray on ray_node_ip; "local" = in this process, no Ray
    ray_node_ip: str = "127.0.0.2"  # ray: address of the private Ray node when ray_address is ""
    replicas: int = 1  # ray: teacher copies serving the ranks
    shards: int = 1  # ray: pipeline stages (actors) per copy, one GPU each, for teachers larger than one GPU
    num_gpus: int = -1  # ray: GPUs per shard actor: -1 = 1 if CUDA is visible else 0 (CPU actors); 1 = one GPU each
    max_batch_tokens: int = 16384  # ray: padded tokens per teacher forward
    max_restarts: int = 3  # ray: restarts of a dead teacher actor (the router; each replica) before the run stops
    max_retries: int = 3  # ray: re-sends of one request / batch after the actor serving it died


@dataclasses.dataclass
class TeacherSection(RayTeacherSection):
    placement: str = "auto"  # auto (chosen from the memory model, logged) | partitioned (ZeRO-3 inference engine over the ranks) | replicated (a copy per rank) | ray (served by Ray actors on their own GPUs; top-k only) | vllm (a vLLM engine per rank; top-k only)
    gpu_mem_gb: float = 0.0  # auto: memory per GPU the plan assumes (0 = this device's total; CPU: RAM / local ranks)
    vllm: VLLMSection = dataclasses.field(default_factory=lambda: VLLMSection(gpu_memory_utilization=0.3))  # placement=vllm: the engine beside the student (max_model_len 0 = data.max_len)

    def validate(self) -> None:
        require(self.placement in TEACHER_PLACEMENTS, f"teacher.placement={self.placement!r}: one of {list(TEACHER_PLACEMENTS)}")
        require(self.quantization in ("", "8bit", "4bit"), f"teacher.quantization={self.quantization!r}: '' | 8bit | 4bit")
        self.vllm.validate("teacher.vllm")
        require(not (self.quantization and self.placement == "vllm"),
                f"teacher.quantization={self.quantization} with teacher.placement=vllm: bitsandbytes weights are our HF "
                f"engine's; give vLLM a quantized checkpoint (model.teacher) or use teacher.placement=replicated")
        require(not (self.quantization and self.placement == "partitioned"),
                f"teacher.quantization={self.quantization} with teacher.placement=partitioned: ZeRO-3 partitions float "
                f"weights only; use replicated or ray for a quantized teacher")
        for name in ("replicas", "shards", "max_batch_tokens"):
            require(getattr(self, name) >= 1, f"teacher.{name}={getattr(self, name)} must be >= 1")
        require(self.num_gpus in (-1, 0, 1), f"teacher.num_gpus={self.num_gpus}: -1 (auto), 0 (CPU) or 1 per shard actor")
        require(self.gpu_mem_gb >= 0, f"teacher.gpu_mem_gb={self.gpu_mem_gb} must be >= 0 (0 = the device's)")
        for name in ("max_restarts", "max_retries"):
            require(getattr(self, name) >= 0, f"teacher.{name}={getattr(self, name)} must be >= 0 (0 = none)")


@dataclasses.dataclass
class CheckpointSection:
    dir: str = ""  # checkpoint folder ("" = <out_dir>/checkpoints)
    every: int = 0  # save every N optimizer steps (0 = only at the end)
    keep_last: int = 2  # checkpoints kept (older ones are deleted after a new one is complete)
    resume: str = ""  # "" = fresh run; "latest" = the newest complete checkpoint in dir; or a checkpoint folder
    export: bool = True  # write the final student as an HF folder (<out_dir>/export)
    overwrite: bool = False  # fresh run in a folder with checkpoints: move the earlier run to <out_dir>/previous-<time>/
    sha256: bool = False  # also hash every checkpoint file at save and check it on resume (sizes are always checked)
    allow_config_change: bool = False  # resume although the data order or objective settings differ from the checkpoint's (each segment's config is kept as config.step_N.yaml)


REPORTERS = ("tensorboard", "wandb", "mlflow")  # log.report_to names (distill/reporting.py)


@dataclasses.dataclass
class LogSection:
    every: int = 1  # log line + metrics.jsonl record every N optimizer steps
    progress_bar: bool = True  # tqdm bar on rank 0
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = dataclasses.field(default_factory=list)  # also send metrics.jsonl records, eval results and the config to: tensorboard | wandb | mlflow ([] = none)

    def validate(self) -> None:
        bad = [r for r in self.report_to if r not in REPORTERS]
        require(not bad, f"log.report_to={self.report_to}: unknown {bad}; known: {list(REPORTERS)}")
        require(len(set(self.report_to)) == len(self.report_to), f"log.report_to={self.report_to} names one twice")


@dataclasses.dataclass
class EvalSection:
    every: int = 0  # SentiBench evaluation every N optimizer steps (0 = never during training)
    at_end: bool = False  # evaluate the final student
    teacher: bool = False  # with at_end: score the teacher too (same tasks, slice and split), shown beside the student
    tasks: str = "sc/sst2"  # tasks (comma list, or all / basic / multifaceted / fine-grained)
    limit: int = 50  # test sentences per task (held-out slice; 0 = all)
    shots: int = 4  # demonstrations per prompt
    batch_size: int = 8  # sequences per evaluation forward


# -- multiteacher: the teachers of a multi-teacher run and how their KD terms are weighted
# (distill.multiteacher). One entry per teacher (``multiteacher.teachers``, a YAML list of mappings);
# the weighting strategy and its knobs in sub-sections. RunConfig.validate calls
# MultiTeacherSection.validate with the whole run config (kd.teacher_backend, kd.path, data.packing).

MULTITEACHER_STRATEGIES = ("fixed", "route", "confidence", "attention", "meta")
MULTITEACHER_BACKEND = "multiteacher"  # kd.teacher_backend of a multi-teacher run


@dataclasses.dataclass
class TeacherEntry:
    name: str = ""  # short name (logged as w_<name>, kd_<name>); unique
    path: str = ""  # HF folder / hub name ("builtin" = the built-in tiny teacher); cache backend: as that backend reads model.teacher
    backend: str = "colocated"  # teacher backend registry name: colocated | ray | cache (constructed with this teacher's path, temperature and topk)
    temperature: float = 1.0  # this teacher's KD temperature (its term is scaled by temperature^2)
    topk: int = 0  # k of a top-k backend (0 = full logits; cache and ray need k > 0)
    cache_dir: str = ""  # backend=cache: this teacher's top-k folder ("" = kd.cache_dir)
    weight: float = 1.0  # weighting=fixed: this teacher's weight (the weights are normalised to sum 1)


@dataclasses.dataclass
class RouteSection:
    column: str = "teacher_id"  # data field naming each example's teacher (a teacher name or 0-based index; TRL's convention)


@dataclasses.dataclass
class ConfidenceSection:
    signal: str = "gold_prob"  # gold_prob (the teacher's log-probability of the reference token) | neg_entropy (minus its entropy)
    temperature: float = 0.5  # softmax temperature over the teachers' confidences (smaller = sharper)


@dataclasses.dataclass
class AttentionSection:
    entropy_bonus: float = 0.01  # weight of the gate's entropy (per token) subtracted from its loss: keeps it from collapsing early
    hidden: int = 0  # gate hidden width (0 = one linear layer H -> n_teachers)


@dataclasses.dataclass
class MetaSection:
    every: int = 10  # meta update every N optimizer steps
    lr: float = 0.1  # Adam step size on the teachers' weight logits (log-weight units per update)
    min_weight: float = 0.02  # floor of every teacher's weight (bounds: [min_weight, 1 - (n-1) min_weight])
    max_logit: float = 6.0  # the weight logits are clipped to [-max_logit, max_logit]
    heldout_path: str = ""  # held-out (prompt, response) JSONL for the meta objective ("" = a seeded draw from the training data)
    heldout_batch: int = 8  # held-out sequences per meta update (the same on every rank)


@dataclasses.dataclass
class MultiTeacherSection:
    teachers: list[TeacherEntry] = dataclasses.field(default_factory=list)  # the teachers, each {name, path, backend, temperature, topk, cache_dir, weight} ([] = single-teacher run); needs kd.teacher_backend=multiteacher
    weighting: str = "fixed"  # fixed | route | confidence | attention | meta
    route: RouteSection = dataclasses.field(default_factory=RouteSection)
    confidence: ConfidenceSection = dataclasses.field(default_factory=ConfidenceSection)
    attention: AttentionSection = dataclasses.field(default_factory=AttentionSection)
    meta: MetaSection = dataclasses.field(default_factory=MetaSection)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.teachers]

    def fixed_weights(self) -> list[float]:
        s = sum(t.weight for t in self.teachers)
        return [t.weight / s for t in self.teachers]

    def validate(self, run) -> None:
        """Checks of this section and its fit with the run (``run``: the RunConfig)."""
        k = run.kd
        # the strategy and its knobs are checked with or without teachers: a misspelt name is never ignored
        require(self.weighting in MULTITEACHER_STRATEGIES, f"multiteacher.weighting={self.weighting!r}: one of {list(MULTITEACHER_STRATEGIES)}")
        c, a, m = self.confidence, self.attention, self.meta
        require(c.signal in ("gold_prob", "neg_entropy"),
                f"multiteacher.confidence.signal={c.signal!r}: gold_prob | neg_entropy")
        require(c.temperature > 0 and math.isfinite(c.temperature),
                f"multiteacher.confidence.temperature={c.temperature} must be > 0")
        require(a.entropy_bonus >= 0 and math.isfinite(a.entropy_bonus) and a.hidden >= 0,
                f"multiteacher.attention.entropy_bonus={a.entropy_bonus} and .hidden={a.hidden} must be >= 0")
        require(m.every >= 1 and m.heldout_batch >= 1,
                f"multiteacher.meta.every={m.every} and .heldout_batch={m.heldout_batch} must be >= 1")
        require(m.lr > 0 and math.isfinite(m.lr), f"multiteacher.meta.lr={m.lr} must be > 0")
        require(m.max_logit > 0 and math.isfinite(m.max_logit), f"multiteacher.meta.max_logit={m.max_logit} must be > 0")
        require(bool(self.route.column.strip()), "multiteacher.route.column is empty: name the data field of each "
                                                 "example's teacher (e.g. teacher_id)")
        if not self.teachers:
            require(k.teacher_backend != MULTITEACHER_BACKEND,
                    f"kd.teacher_backend={MULTITEACHER_BACKEND} needs multiteacher.teachers (a list of {{name, path, backend, "
                    f"temperature, weight}})")
            return
        require(k.teacher_backend == MULTITEACHER_BACKEND,
                f"multiteacher.teachers lists {len(self.teachers)} teacher(s) but kd.teacher_backend="
                f"{k.teacher_backend!r}: set kd.teacher_backend={MULTITEACHER_BACKEND}")
        require(k.kind not in ("none",), "multiteacher.teachers with kd.kind=none: set a divergence (e.g. forward_kl)")
        backends = [b for b in registered_names("teacher_backends") if b != MULTITEACHER_BACKEND]
        names = self.names
        require(all(names), f"multiteacher.teachers: every teacher needs a name, got {names}")
        require(len(set(names)) == len(names), f"multiteacher.teachers: names must be unique, got {names}")
        for i, t in enumerate(self.teachers):
            w = f"multiteacher.teachers[{i}] ({t.name})"
            require(bool(t.path), f"{w}: path is empty")
            require(t.backend != MULTITEACHER_BACKEND, f"{w}: backend={t.backend} (a teacher cannot be a multiteacher)")
            require(t.backend != "vllm", f"{w}: backend=vllm is not available for several teachers yet (untested there); "
                                         f"use colocated, ray or cache")
            require(t.backend in backends, f"{w}: backend={t.backend!r} is not a teacher backend; known: {backends}")
            require(t.temperature > 0 and math.isfinite(t.temperature), f"{w}: temperature={t.temperature} must be > 0")
            require(t.topk >= 0, f"{w}: topk={t.topk} must be >= 0")
            require(t.backend not in ("cache", "ray") or t.topk > 0, f"{w}: backend={t.backend} serves top-k: set topk")
            require(t.weight >= 0 and math.isfinite(t.weight), f"{w}: weight={t.weight} must be >= 0")
        caches = [t.cache_dir or k.cache_dir for t in self.teachers if t.backend == "cache"]
        require(len(set(caches)) == len(caches),
                f"multiteacher.teachers: {len(caches)} cache teachers share the top-k folder(s) {sorted(set(caches))}: "
                f"give each its own cache_dir")
        if self.weighting == "fixed":
            require(sum(t.weight for t in self.teachers) > 0,
                    f"multiteacher.weighting=fixed: the weights {[t.weight for t in self.teachers]} sum to 0")
        require(0 <= m.min_weight * len(self.teachers) < 1,
                f"multiteacher.meta.min_weight={m.min_weight} x {len(self.teachers)} teachers must be in [0, 1)")
        if self.weighting in ("attention", "meta"):
            require(k.path == "lean", f"multiteacher.weighting={self.weighting} reads the student's final hidden "
                                      f"states at the supervised rows: it needs kd.path=lean, got {k.path}")
        if self.weighting == "route":
            require(not run.data.packing, "multiteacher.weighting=route reads a per-example teacher column: "
                                          "data.packing=true merges examples; turn packing off")
            require(run.data.name != "sft", f"multiteacher.weighting=route reads each example's "
                                            f"{self.route.column!r} field: set data.name=sft_routed (data.name=sft "
                                            f"drops it)")


_KD_KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "none")

# The registries (distill.data.registry.DATASETS, distill.teacher.registry.TEACHER_BACKENDS) fill as the modules that
# define their entries are imported, after the config is checked; the built-in names are listed
# here (tests/trainer/test_config.py keeps them in step with the registries). A name that a program
# registered itself before the check is read from the registry.
BUILTIN_DATASETS = ("sft", "sft_routed")  # sft_routed: multiteacher.weighting=route (distill.multiteacher.stage)
BUILTIN_TEACHER_BACKENDS = ("colocated", "ray", "cache", "multiteacher", "vllm")
# A stage's own names for its trainer config (distill.icldist.stage builds that dataset and backend itself),
# which it passes as ``stage_names``; they need that stage's parts, so no other config may name them.
STAGE_ONLY_NAMES = ("icldist",)


def registered_names(registry: Literal["datasets", "teacher_backends"], stage_names: tuple[str, ...] = ()) -> list[str]:
    """The names ``data.name`` (``"datasets"``) or ``kd.teacher_backend`` (``"teacher_backends"``) may
    take: the built-in ones, ``stage_names`` (a stage's own, registered when it runs) and any name
    already registered (without importing the registries' modules: the teachers' imports torch)."""
    builtin = BUILTIN_DATASETS if registry == "datasets" else BUILTIN_TEACHER_BACKENDS
    module = sys.modules.get("distill.data.registry" if registry == "datasets" else "distill.teacher.registry")
    live = getattr(module, "DATASETS" if registry == "datasets" else "TEACHER_BACKENDS", {}) if module else {}
    return sorted(set(builtin) | set(stage_names) | (set(live) - set(STAGE_ONLY_NAMES)))


def check_sentibench_tasks(value: str, key: str) -> None:
    """``value`` names SentiBench tasks (a comma list of task names, categories or ``all``), else a
    ConfigError naming ``key``, the unknown names and the known ones."""
    from distill.data.sentibench import CATEGORIES, TASKS

    names = [t.strip() for t in str(value).split(",") if t.strip()]
    require(bool(names), f"{key} is empty: give SentiBench tasks (all, a category or task names such as sc/sst2)")
    bad = [t for t in names if t != "all" and t not in CATEGORIES and t not in TASKS]
    require(not bad, f"{key}={value!r}: unknown SentiBench task(s) {bad}; known: all, {', '.join(CATEGORIES)} "
                     f"(categories) and {', '.join(TASKS)}")


@dataclasses.dataclass
class RunConfig:
    run: RunSection = dataclasses.field(default_factory=RunSection)
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    kd: KDSection = dataclasses.field(default_factory=KDSection)
    teacher: TeacherSection = dataclasses.field(default_factory=TeacherSection)
    deepspeed: DeepSpeedSection = dataclasses.field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    multiteacher: MultiTeacherSection = dataclasses.field(default_factory=MultiTeacherSection)  # several teachers with learned weights (distill.multiteacher)

    def validate(self, *, stage_names: tuple[str, ...] = ()) -> None:
        """Cross-field checks; runs before any process group exists. Messages print the numbers.
        ``stage_names``: data / teacher-backend names a stage registers when it runs (ICLDist's)."""
        t, k, m, d, ds, c = self.train, self.kd, self.model, self.data, self.deepspeed, self.checkpoint
        require(self.run.out_dir.strip() != "", "run.out_dir is empty: give the run's folder (e.g. runs/my_run)")
        require(t.micro_batch >= 1, f"train.micro_batch={t.micro_batch} must be >= 1")
        require(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be >= 1")
        require(t.steps >= 0, f"train.steps={t.steps} must be >= 0 (0 = epochs x steps per epoch)")
        require(t.epochs >= 0 and math.isfinite(t.epochs), f"train.epochs={t.epochs} must be >= 0 (passes over the data)")
        require(t.steps > 0 or t.epochs > 0, f"train.steps={t.steps} and train.epochs={t.epochs}: one must be > 0")
        require(t.lr > 0 and math.isfinite(t.lr), f"train.lr={t.lr} must be > 0")
        require(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
        require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0")
        require(t.steps == 0 or t.warmup_steps <= t.steps,
                f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}")
        require(t.schedule in ("cosine", "constant"), f"train.schedule={t.schedule!r}: cosine | constant")
        require(len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas),
                f"train.adam_betas={t.adam_betas} must be two numbers in [0, 1)")
        require(t.grad_clip >= 0 and math.isfinite(t.grad_clip), f"train.grad_clip={t.grad_clip} must be a finite number >= 0 (0 = off)")
        require(t.weight_decay >= 0 and math.isfinite(t.weight_decay),
                f"train.weight_decay={t.weight_decay} must be a finite number >= 0")
        require(t.adam_eps > 0 and math.isfinite(t.adam_eps), f"train.adam_eps={t.adam_eps} must be a finite number > 0")
        require(k.kind in _KD_KINDS, f"kd.kind={k.kind!r}: one of {list(_KD_KINDS)}")
        require(k.temperature > 0 and math.isfinite(k.temperature), f"kd.temperature={k.temperature} must be > 0")
        require(0.0 <= k.beta <= 1.0, f"kd.beta={k.beta} must be in [0, 1]")
        require(0.0 <= k.alpha <= 1.0, f"kd.alpha={k.alpha} must be in [0, 1]")
        require(k.ce_weight >= 0 and k.kd_weight >= 0 and math.isfinite(k.ce_weight) and math.isfinite(k.kd_weight),
                f"kd.ce_weight={k.ce_weight} and kd.kd_weight={k.kd_weight} must be finite numbers >= 0")
        require(k.ce_weight > 0 or (k.kind != "none" and k.kd_weight > 0),
                f"nothing to train: kd.ce_weight={k.ce_weight}, kd.kind={k.kind!r}, kd.kd_weight={k.kd_weight}")
        require(k.impl in ("auto", "torch", "triton"), f"kd.impl={k.impl!r}: auto | torch | triton")
        require(k.path in ("lean", "logits"), f"kd.path={k.path!r}: lean | logits")
        require(k.chunk_tokens >= 0 and k.topk >= 0, f"kd.chunk_tokens={k.chunk_tokens}, kd.topk={k.topk} must be >= 0")
        backends = registered_names("teacher_backends", stage_names)
        require(k.teacher_backend in backends, f"kd.teacher_backend={k.teacher_backend!r} is not a teacher backend; "
                                               f"known: {backends} (colocated = the teacher in this process)")
        datasets = registered_names("datasets", stage_names)
        require(d.name in datasets, f"data.name={d.name!r} is not a dataset; known: {datasets} "
                                    f"(sft = prompt/response records from data.path)")
        require(k.teacher_backend != "cache" or k.topk > 0, "kd.teacher_backend=cache reads a top-k cache: set kd.topk (the k it was built with)")
        require(k.kind == "none" or m.teacher != "", "kd.kind needs a teacher: model.teacher is empty (set kd.kind=none for SFT)")
        for name in ("dtype", "teacher_dtype"):
            v = getattr(m, name)
            require(v in ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32"), f"model.{name}={v!r}: auto | bfloat16 | float16 | float32")
        require(m.attn in ("auto", "sdpa", "eager", "flash_attention_2"), f"model.attn={m.attn!r}: auto | sdpa | eager | flash_attention_2")
        require(m.vocab_size >= 0, f"model.vocab_size={m.vocab_size} must be >= 0 (0 = the tokenizer's size)")
        require(d.max_len >= 8, f"data.max_len={d.max_len} tokens is too short (>= 8)")
        require(d.format in ("auto", "jsonl", "json", "parquet", "datasets"), f"data.format={d.format!r}: auto | jsonl | json | parquet | datasets")
        require(d.limit >= 0, f"data.limit={d.limit} must be >= 0")
        require(ds.engine in ("deepspeed", "torch"), f"deepspeed.engine={ds.engine!r}: deepspeed | torch")
        require(ds.zero_stage in (-1, 0, 1, 2, 3), f"deepspeed.zero_stage={ds.zero_stage}: -1 (from the JSON) or 0..3")
        require(ds.dist_backend in ("auto", "nccl", "gloo"), f"deepspeed.dist_backend={ds.dist_backend!r}: auto | nccl | gloo")
        require(c.every >= 0, f"checkpoint.every={c.every} must be >= 0")
        require(c.keep_last >= 1, f"checkpoint.keep_last={c.keep_last} must be >= 1")
        require(not (c.overwrite and c.resume), f"checkpoint.overwrite=true and checkpoint.resume={c.resume}: choose one")
        require(self.log.every >= 1, f"log.every={self.log.every} must be >= 1")
        self.log.validate()
        self._check_on_policy()
        self.multiteacher.validate(self)
        self.teacher.validate()
        for served in ("ray", "vllm"):
            require(not (self.teacher.placement == served and k.topk == 0 and k.kind != "none"),
                    f"teacher.placement={served} serves top-k only: set kd.topk (e.g. 64)")
        require(not ((self.teacher.placement == "vllm" or k.teacher_backend == "vllm") and k.path != "lean"),
                f"the vllm teacher scores the supervised positions only: set kd.path=lean (got {k.path})")
        require(self.eval.every >= 0 and self.eval.limit >= 0,
                f"eval.every={self.eval.every} and eval.limit={self.eval.limit} must be >= 0")
        require(self.eval.shots >= 0, f"eval.shots={self.eval.shots} must be >= 0")
        require(self.eval.batch_size >= 1, f"eval.batch_size={self.eval.batch_size} must be >= 1")
        check_sentibench_tasks(self.eval.tasks, "eval.tasks")

    def _check_on_policy(self) -> None:
        op, k = self.kd.on_policy, self.kd
        op.validate()
        if op.fraction == 0:
            return
        require(k.kind != "none", "kd.on_policy.fraction > 0 needs a teacher to score what the student writes: "
                                  "set kd.kind (e.g. forward_kl), or kd.on_policy.fraction=0")
        require(k.teacher_backend != "cache", "kd.on_policy.fraction > 0 with kd.teacher_backend=cache: the cache holds "
                                              "the teacher's top-k of the corpus text and cannot score text the student "
                                              "writes; use kd.teacher_backend=colocated (or teacher.placement=ray), or "
                                              "kd.on_policy.fraction=0")
        caches = [t.name for t in self.multiteacher.teachers if t.backend == "cache"]
        require(not caches, f"kd.on_policy.fraction > 0 with multiteacher teacher(s) {caches} on backend=cache: a "
                            f"cache cannot score text the student writes; give them a colocated or ray backend")
        require(k.path == "lean", f"kd.on_policy.fraction > 0 trains the generated rows on the lean path: set "
                                  f"kd.path=lean (got {k.path})")
        require(not self.data.packing, "kd.on_policy.fraction > 0 with data.packing=true: generated responses are "
                                       "batched unpacked; set data.packing=false")

    def check_machine(self) -> None:
        """Settings this machine cannot honour, one line with what to use instead (a ConfigError).

        Apart from :meth:`validate`: a config written for GPUs still loads, validates and prints
        (``--print-config``) anywhere. The launchers and the run builder (distill.train.build) call it
        before any model is loaded or process group started. Refuses only what fails here: bfloat16
        trains on CPU, and float16 does too on the torch engine (DeepSpeed's CPU accelerator has no
        fp16 unless the CPU does fp16 in oneDNN)."""
        import importlib.util

        import torch

        m, k, ds = self.model, self.kd, self.deepspeed
        cuda = torch.cuda.is_available()
        if ds.dist_backend == "nccl":
            nccl = torch.distributed.is_available() and torch.distributed.is_nccl_available()
            why = "this machine has no CUDA GPU" if not cuda else "this torch build has no NCCL"
            require(cuda and nccl, f"deepspeed.dist_backend=nccl needs CUDA GPUs and NCCL; {why}: use "
                                   f"deepspeed.dist_backend=gloo (or auto: nccl on GPUs, gloo otherwise)")
        if m.attn == "flash_attention_2":
            missing = ([] if importlib.util.find_spec("flash_attn") else ["the flash-attn package is not installed"]) + \
                      ([] if cuda else ["this machine has no CUDA GPU"])
            require(not missing, f"model.attn=flash_attention_2 needs the flash-attn package and a CUDA GPU; "
                                 f"{' and '.join(missing)}: use model.attn=sdpa (or auto: flash_attention_2 where it "
                                 f"can run, else sdpa)")
        if k.impl == "triton":
            interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
            why = ("triton is not installed" if importlib.util.find_spec("triton") is None else
                   None if cuda or interp else "this machine has no CUDA GPU and TRITON_INTERPRET is not 1")
            require(why is None, f"kd.impl=triton runs the Triton kernels on a CUDA GPU (on CPU only under "
                                 f"TRITON_INTERPRET=1, the interpreter, for tests); {why}: use kd.impl=torch (or auto: "
                                 f"triton on CUDA, torch otherwise)")
        asked_vllm = [key for key, on in (("teacher.placement=vllm", self.teacher.placement == "vllm"),
                                          ("kd.teacher_backend=vllm", k.teacher_backend == "vllm"),
                                          ("kd.on_policy.engine=vllm", k.on_policy.fraction > 0 and k.on_policy.engine == "vllm"))
                      if on]
        if asked_vllm and importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"{' and '.join(asked_vllm)}: vLLM is not installed in this environment; install it with "
                              f"pip install -e '.[vllm]' on GPUs (on a CPU-only machine: docs/teacher.md, 'vLLM on a CPU')")
        if not cuda and ds.engine == "deepspeed":
            fp16 = ("float16", "fp16")
            asked = [f"model.dtype={m.dtype}"] if m.dtype in fp16 else []
            # the teacher runs under DeepSpeed where it is partitioned (auto may choose that; a
            # multi-teacher run's auto places its teachers replicated)
            partitioned = self.teacher.placement == "partitioned" or (
                self.teacher.placement == "auto" and not self.multiteacher.teachers)
            if m.teacher_dtype in fp16 and partitioned and k.kind != "none":
                asked.append(f"model.teacher_dtype={m.teacher_dtype} (teacher.placement={self.teacher.placement})")
            if asked:
                from deepspeed.accelerator import get_accelerator

                require(get_accelerator().is_fp16_supported(),
                        f"{' and '.join(asked)}: DeepSpeed has no float16 on this machine (no CUDA GPU; its CPU "
                        f"accelerator has no fp16): use bfloat16 or float32"
                        f"{', or teacher.placement=replicated' if len(asked) == 1 and 'teacher' in asked[0] else ''}")
