"""The reference (kernels/distill_kernels/ref.py), the tolerance helper and the distill_kernels package itself."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from distill_kernels.ref import KINDS, assert_close_to_ref, kd_div_ref, topk_kd_ref


@pytest.mark.parametrize("kind", KINDS)
def test_topk_ref_with_k_equal_vocab_is_the_full_ref_with_finite_grads(kind):
    torch.manual_seed(0)
    s = torch.randn(5, 37, requires_grad=True)
    t = torch.randn(5, 37)
    labels = torch.tensor([1, -100, 3, 4, 5])
    ids = torch.argsort(t, -1, descending=True)
    lp = torch.log_softmax(t / 1.7, -1).gather(-1, ids)  # the teacher's top-k at the temperature of use
    kw = dict(kind=kind, beta=0.3, alpha=0.2, temperature=1.7)
    a = topk_kd_ref(s, ids, lp, torch.zeros(5), labels, **kw)
    (ga,) = torch.autograd.grad(a, s)
    b = kd_div_ref(s, t, labels, **kw)
    (gb,) = torch.autograd.grad(b, s)
    assert torch.isfinite(ga).all()
    torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)


def test_tolerance_helper_rejects_an_error_on_small_gradients():
    ref = torch.full((4, 1000), 1e-7)  # gradient-sized values: a fixed 1e-5 floor would hide anything
    assert_close_to_ref(ref * (1 + 1e-5), ref, ref)
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_close_to_ref(ref * 1.01, ref, ref)
    # The in-dtype reference's own error widens the bound: bf16-level error passes when the
    # reference computed in bf16 is that far off too.
    ref_bf16 = ref.to(torch.bfloat16).float()
    assert_close_to_ref(ref_bf16, ref_bf16, ref)


def test_op_names_stay_functions_after_submodule_import():
    code = (
        "import sys, distill_kernels\n"
        "assert 'triton' not in sys.modules, 'import distill_kernels imported triton'\n"
        "import distill_kernels.fused_linear_kd  # imports the kd_div and topk_kd submodules too\n"
        "import types\n"
        "for n in ('kd_div', 'topk_kd', 'fused_linear_kd'):\n"
        "    f = getattr(distill_kernels, n)\n"
        "    assert callable(f) and not isinstance(f, types.ModuleType), (n, f)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
