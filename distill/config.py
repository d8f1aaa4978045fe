"""Typed run configuration: nested dataclasses, loaded as defaults <- --config YAML <- --a.b=value.

The loader is generic (``load_config(SchemaClass, argv)``); each stage defines its schema as nested
``@dataclass``es whose every field has a default and a one-line comment with units. Unknown keys, in
YAML or on the command line, are errors that name the key and the file. Cross-field checks live in
each schema's ``validate()`` and run before any process group exists.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem; the message names the key and where it came from."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
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
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in (x.strip() for x in value.split(",")) if v] if not value.startswith("[") else json.loads(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
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
    if tp is float:
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
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from a (possibly partial) mapping; unknown keys are errors."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for section {cls.__name__}; known: {sorted(types_)}")
    defaults = cls()
    kwargs = {}
    for name, tp in types_.items():
        if name in data:
            sub = f"{where}.{name}"
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
        if arg.startswith("--config"):
            if arg == "--config":
                if i + 1 >= len(argv):
                    raise ConfigError("--config needs a file path")
                config_path = argv[i + 1]
                i += 2
                continue
            if arg.startswith("--config="):
                config_path = arg.split("=", 1)[1]
                i += 1
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


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: invalid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], argv: list[str] | None = None, *, config_path: str | None = None) -> tuple[T, list[str]]:
    """defaults <- YAML (``--config``) <- ``--section.key=value``. Returns (config, leftover args).

    Calls ``cfg.validate()`` when the schema defines it.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    cli_path, overrides, rest = parse_overrides(argv)
    path = cli_path or config_path
    data: dict = {}
    where = "defaults"
    if path:
        data = load_yaml(path)
        where = str(path)
    cfg = from_dict(cls, data, where=where)
    if overrides:
        merged = _deep_merge(to_dict(cfg), overrides)
        cfg = from_dict(cls, merged, where="command line")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg, rest


def dump_yaml(cfg: Any, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
