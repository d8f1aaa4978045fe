"""Fixtures of the kernel tests.

Under the Triton interpreter (CPU) the vocabulary block is capped at 128 so that small, odd
vocabularies (301, 1271) still span several blocks and end in a ragged one; on a GPU the
production block sizes are kept.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def small_blocks(monkeypatch):
    import distill_kernels._common as common

    monkeypatch.setattr(common, "MAX_BLOCK_V", 128)


def make_labels(shape, *, ignore_frac=0.3, all_ignored=False, seed=0, device="cpu"):
    """Labels aligned with the rows; some rows (or all) set to -100."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 50, shape, generator=g)
    if all_ignored:
        labels.fill_(-100)
    else:
        drop = torch.rand(shape, generator=g) < ignore_frac
        labels[drop] = -100
        labels.view(-1)[0] = 7  # at least one counted row
    return labels.to(device)


def randn(shape, *, scale=3.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device)


def ref_pair(fn, inputs_in_dtype: dict, grad_keys, upstream, **kw):
    """Run the reference twice, on the dtype-rounded inputs kept in their dtype and on fp32
    upcasts of the same values. Returns ((out, grads) in dtype, (out, grads) in fp32).

    The in-dtype run stages its gradients the way every fused loss does (the kernels form the
    gradient in the forward, before the upstream gradient exists): gradient at a unit upstream
    rounded to the dtype, then multiplied by the upstream gradient in the dtype. That second
    rounding is real behaviour of the kernels, so the reference run in the dtype shows it too;
    with fp32 inputs, or an upstream gradient of exactly 1, it changes nothing.
    """
    results = []
    for cast in (False, True):
        args = {}
        for name, x in inputs_in_dtype.items():
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                x = x.detach().float() if cast else x.detach().clone()
                if name in grad_keys:
                    x.requires_grad_(True)
            args[name] = x
        out = fn(**args, **kw)
        if cast:
            (out * upstream).sum().backward()
            grads = [args[k].grad for k in grad_keys]
        else:
            out.sum().backward()
            grads = []
            for k in grad_keys:
                g = args[k].grad
                w = upstream
                if isinstance(w, torch.Tensor) and w.dim() > 0:  # reduction "none": one per row
                    w = w.reshape(*w.shape, *([1] * (g.dim() - w.dim())))
                grads.append(g * torch.as_tensor(w, dtype=torch.float32).to(g.dtype))
        results.append((out.detach(), grads))
    return results[0], results[1]


def grad_atol(ref_fp32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Elementwise floor for gradients stored in a 16-bit dtype: one unit in the last place of
    that dtype at each element, plus the helper's default floor. A value computed in fp32 that
    lands within rounding error of a bf16 rounding boundary may round to either neighbour, so
    the in-dtype reference's own rounding error (which can be ~0 there) cannot bound it alone.
    None (the helper's default) for fp32."""
    if dtype == torch.float32:
        return None
    mant = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    r = ref_fp32.float().abs()
    ulp = torch.exp2(torch.floor(torch.log2(r.clamp_min(1e-30))) - mant)
    floor = 1e-5 * max(1.0, float(r.max()) if r.numel() else 0.0)
    return torch.where(r > 0, ulp, torch.zeros_like(r)) + floor
