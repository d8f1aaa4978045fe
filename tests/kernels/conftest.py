"""Fixtures of the kernel tests.

Under the Triton interpreter (CPU) the vocabulary block is capped at 128 (``small_blocks``) so
that small, odd vocabularies (301, 1271) still span several blocks and end in a ragged one, or at
16 (``tiny_blocks``) for tests that loop over many cases on a vocabulary of ~67; without either
fixture the production block sizes are kept.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def small_blocks(monkeypatch):
    import distill_kernels._common as common

    monkeypatch.setattr(common, "MAX_BLOCK_V", 128)


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Vocabulary block 16: a vocabulary of 67 is scanned in 5 blocks, the last one ragged (3)."""
    import distill_kernels._common as common

    monkeypatch.setattr(common, "MAX_BLOCK_V", 16)


# Zero divergence at equality (tests/kernels/test_topk_kd.py, test_fused_linear_kd.py): a student
# equal to its teacher, the teacher's top-k taken at the temperature of use, for every kind, k and
# T on a vocabulary of EQUALITY_V (5 blocks with ``tiny_blocks``). Loss per row and gradient per
# logit within EQUALITY_ATOL (fp32).
EQUALITY_KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5),
                  ("jsd", 0.9), ("jsd", 1.0), ("skew_kl", 0.5), ("skew_reverse_kl", 0.5),
                  ("tvd", 0.5)]
EQUALITY_V = 67
EQUALITY_ATOL = 1e-6


def equality_cases():
    """(kind, beta, k, temperature) of the zero-at-equality tests."""
    for kind, beta in EQUALITY_KINDS:
        for k in (1, 16, EQUALITY_V):
            for temperature in (0.5, 1.0, 2.0, 4.0):
                yield kind, beta, k, temperature


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
