"""The registry of teacher backends (``kd.teacher_backend``): the built-in ones, imported on first use,
and any a program registers with :func:`register_teacher_backend` (docs/architecture.md)."""

from __future__ import annotations

import importlib
from typing import Callable

from distill.config import ConfigError

TEACHER_BACKENDS: dict[str, Callable] = {}
# The built-in backends, imported when a run names them: name -> "module:factory".
LAZY_BACKENDS = {"colocated": "distill.teacher.colocated:ColocatedTeacher",
                 "ray": "distill.teacher.ray_backend:RayTeacher",
                 "cache": "distill.teacher.topk_cache:CachedTopKTeacher",
                 "vllm": "distill.teacher.vllm_backend:VLLMTeacher"}


def register_teacher_backend(name: str):
    """Decorator: ``factory(cfg: RunConfig, ctx: BackendContext) -> TeacherBackend``."""

    def deco(factory):
        TEACHER_BACKENDS[name] = factory
        return factory

    return deco


def teacher_factory(name: str, *, key: str = "kd.teacher_backend", hidden: tuple[str, ...] = ()) -> Callable:
    """The registered factory of backend ``name`` (a built-in one imported on first use); a ConfigError
    naming ``key`` and the known names otherwise."""
    if name not in TEACHER_BACKENDS and name in LAZY_BACKENDS:
        module, attr = LAZY_BACKENDS[name].split(":")
        TEACHER_BACKENDS[name] = getattr(importlib.import_module(module), attr)
    if name not in TEACHER_BACKENDS:
        known = sorted((set(TEACHER_BACKENDS) | set(LAZY_BACKENDS)) - set(hidden))
        raise ConfigError(f"{key}={name!r} is not registered; known: {known}")
    return TEACHER_BACKENDS[name]
