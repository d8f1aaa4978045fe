"""distill_kernels: fused kernels for logit distillation.

Importing this package is cheap: it never imports triton or distill. The ops are loaded on first
attribute access (``distill_kernels.kd_div``), which imports triton then.

Each op lives in a submodule of the same name (``distill_kernels/kd_div.py`` defines ``kd_div``).
Python's import system binds a submodule onto its package when it is imported, which would make
``distill_kernels.kd_div`` the module instead of the function once anything imported the submodule;
the package's module class refuses that binding so the attribute always stays the function.
"""

from __future__ import annotations

import importlib
import sys
import types

_LAZY = {
    "kd_div": "distill_kernels.kd_div",
    "topk_kd": "distill_kernels.topk_kd",
    "fused_linear_kd": "distill_kernels.fused_linear_kd",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distill_kernels' has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # The import system sets ``package.<submodule> = module``; keep op names resolving to the
        # functions (through __getattr__) instead.
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
