"""distill_kernels: fused kernels for logit distillation.

Importing this package is cheap: it never imports triton or distill. The ops are loaded on first
attribute access (``distill_kernels.kd_div``), which imports triton then.
"""

from __future__ import annotations

import importlib

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
