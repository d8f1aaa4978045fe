"""Shared pieces of the distillation kernels: kind codes, launch heuristics, the per-element
divergence terms (one Triton definition used by kd_div and topk_kd) and host-side argument checks.

Notation used by every kernel (see kernels/distill_kernels/ref.py for the definitions):
``q`` student probabilities, ``p`` teacher probabilities, both at temperature T. For a divergence
``L(q)`` the gradient w.r.t. the tempered student logits ``a = x / T`` is the softmax Jacobian
applied to ``G = dL/dq``::

    dL/da_v = q_v * (G_v - S),   S = sum_u q_u * G_u

so each kernel needs, per row, the normalisers (one scan), then ``S`` (a second scan when ``G``
depends on both normalisers), then writes ``q * (G - S) / T``. Forward and reverse KL have closed
forms (``q - p`` and ``q * (log q - log p - L)``) whose ``S`` is known after the first scan.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Kind codes (tl.constexpr in the kernels).
FKL, RKL, JSD, SKL, SRKL, TVD = 0, 1, 2, 3, 4, 5
KIND_CODES = {"forward_kl": FKL, "reverse_kl": RKL, "jsd": JSD, "skew_kl": SKL,
              "skew_reverse_kl": SRKL, "tvd": TVD}
REDUCTIONS = ("mean", "sum", "none")

# Upper bound on the vocabulary block. On a GPU 4096 keeps a bf16 row block at 8 KiB per operand
# (16 fp32 registers per thread per live vector at 8 warps). Tests lower it (monkeypatch) so small
# vocabularies still span several blocks plus a ragged tail; the env var does the same for users.
MAX_BLOCK_V = int(os.environ.get("DISTILL_KERNELS_MAX_BLOCK_V", "4096"))

LOG2E = 1.4426950408889634
# Finite "minus infinity" for running maxima: exp(m_old - m_new) stays finite (no inf - inf).
NEG_BIG: tl.constexpr = tl.constexpr(-1.0e38)


def resolve_kind(kind: str, beta: float) -> int:
    """Kind code, with JSD's ends mapped as kernels/distill_kernels/ref.py defines them (beta 0 -> forward KL,
    beta 1 -> reverse KL). Unknown kinds raise NotImplementedError so callers can fall back."""
    if kind not in KIND_CODES:
        raise NotImplementedError(f"divergence kind {kind!r} has no Triton kernel; "
                                  f"supported: {sorted(KIND_CODES)}")
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd beta={beta} must be in [0, 1]")
        if beta == 0.0:
            return FKL
        if beta == 1.0:
            return RKL
    return KIND_CODES[kind]


def check_common(temperature: float, reduction: str, alpha: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")


def launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of ``vocab`` elements."""
    block = min(triton.next_power_of_2(max(vocab, 16)), MAX_BLOCK_V)
    num_warps = 4 if block <= 1024 else (8 if block <= 2048 else 16)
    return block, num_warps


def rows_2d(x: torch.Tensor, name: str) -> torch.Tensor:
    """View ``[..., V]`` as ``[N, V]`` keeping any row stride (a vocab slice ``x[..., :V]`` needs
    no copy); copies only when the last dim is not unit-stride or rows cannot be flattened."""
    v = x.shape[-1]
    if x.dim() == 1:
        raise ValueError(f"{name} must be [..., V], got shape {tuple(x.shape)}")
    try:
        y = x.view(-1, v)
    except RuntimeError:
        y = x.reshape(-1, v)
    if y.stride(-1) != 1:
        y = y.contiguous()
    return y


def valid_count_scale(labels2d: torch.Tensor | None, n_rows: int, ignore_index: int,
                      reduction: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_valid fp32 [1], grad scale fp32 [1]) computed on the device: no host sync."""
    if labels2d is None:
        n_valid = torch.full((1,), float(n_rows), device=device, dtype=torch.float32)
    else:
        n_valid = (labels2d != ignore_index).sum().to(torch.float32).reshape(1)
    if reduction == "mean":
        scale = 1.0 / n_valid.clamp_min(1.0)
    else:
        scale = torch.ones(1, device=device, dtype=torch.float32)
    return n_valid, scale


def reduce_rows(per_row: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row fp32 losses (0 on ignored rows) -> the requested reduction, on device."""
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / n_valid.clamp_min(1.0).reshape(())


def stash_grad(ctx, grad: torch.Tensor, student_logits: torch.Tensor, reduction: str) -> None:
    """Keep the gradient the forward kernel wrote, for a backward that only scales it.

    When the gradient was written into the student-logits buffer itself (``grad_inplace``), the
    logits' autograd version is bumped so any other op that saved them fails loudly instead of
    reading gradients.
    """
    if grad.data_ptr() == student_logits.data_ptr():
        torch.autograd.graph.increment_version(student_logits)
    ctx.grad = grad
    ctx.shape = student_logits.shape
    ctx.reduction = reduction


def take_scaled_grad(ctx, grad_output: torch.Tensor) -> torch.Tensor:
    """The stashed gradient times the upstream gradient (in place), shaped like the logits."""
    grad = ctx.grad
    if grad is None:
        raise RuntimeError("the gradient formed in the forward was consumed by a first "
                           "backward; backward twice (retain_graph) is not supported")
    ctx.grad = None
    if ctx.reduction == "none":
        grad.mul_(grad_output.reshape(-1, 1))
    else:
        grad.mul_(grad_output)
    return grad.view(ctx.shape)


def no_grad_for(name: str, t) -> None:
    if isinstance(t, torch.Tensor) and t.requires_grad:
        raise NotImplementedError(
            f"{name} requires grad: the Triton kernels treat the teacher as a constant; detach it "
            "or use the torch implementation")


@triton.jit
def div_terms(log_q, log_p, KIND: tl.constexpr, beta, alpha):
    """Per-outcome loss term and G = dL/dq for the kinds without a closed-form gradient
    (reverse KL, JSD, skew KL, skew reverse KL, TVD). Inputs fp32 log-probs (may be -inf)."""
    q = tl.exp(log_q)
    p = tl.exp(log_p)
    if KIND == 1:  # reverse KL: q (log q - log p)
        term = tl.where(q > 0, q * (log_q - log_p), 0.0)
        g = log_q - log_p + 1.0
    elif KIND == 2:  # JSD(beta): m = (1 - beta) q + beta p
        m = (1.0 - beta) * q + beta * p
        log_m = tl.log(tl.maximum(m, 1e-30))
        kq = tl.where(q > 0, q * (log_q - log_m), 0.0)
        kp = tl.where(p > 0, p * (log_p - log_m), 0.0)
        term = beta * kp + (1.0 - beta) * kq
        g = (1.0 - beta) * (log_q - log_m)
    elif KIND == 3:  # skew KL: KL(p || alpha p + (1 - alpha) q)
        m = alpha * p + (1.0 - alpha) * q
        log_m = tl.log(tl.maximum(m, 1e-30))
        term = tl.where(p > 0, p * (log_p - log_m), 0.0)
        g = tl.where(p > 0, -(1.0 - alpha) * (p / tl.maximum(m, 1e-30)), 0.0)
    elif KIND == 4:  # skew reverse KL: KL(q || alpha q + (1 - alpha) p)
        m = alpha * q + (1.0 - alpha) * p
        log_m = tl.log(tl.maximum(m, 1e-30))
        term = tl.where(q > 0, q * (log_q - log_m), 0.0)
        g = log_q + 1.0 - log_m - alpha * (q / tl.maximum(m, 1e-30))
    else:  # TVD: 0.5 |p - q|
        term = 0.5 * tl.abs(p - q)
        g = tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))
    qg = tl.where(q > 0, q * g, 0.0)
    return term, g, qg


# Workaround (2026-11-23, Triton 3.9): the interpreter (TRITON_INTERPRET=1) converts fp32 to bf16
# by truncating the mantissa, while compiled kernels round to nearest even. Kernels round
# explicitly in the interpreter so CPU tests see the GPU's numerics.
def interp_bf16_rounding(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def rtne_bf16(x, RTNE_BF16: tl.constexpr):
    """fp32 ``x`` pre-rounded to the nearest-even bf16 value when ``RTNE_BF16`` (interpreter
    only; the store's own cast then truncates nothing). Identity otherwise."""
    if RTNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x
