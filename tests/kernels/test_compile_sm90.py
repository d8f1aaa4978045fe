"""The kernels compile for an H100 (sm_90) on this CPU-only machine.

The interpreter accepts code the GPU compiler rejects (non-constexpr globals, loop-carried type
changes, ...). Triton ships ptxas, so the full compile to a cubin runs without a GPU; it runs in
a subprocess because TRITON_INTERPRET=1 (set for the other tests) changes what @triton.jit builds.
Register use and spills are printed (-s) and spills are asserted absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, tempfile
    import triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from distill_kernels._common import launch_config
    from distill_kernels.kd_div import _kd_div_fwd_kernel
    from distill_kernels.topk_kd import _topk_kd_fwd_kernel

    target = GPUTarget("cuda", 90, 32)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    common = {"g_ptr": "*bf16", "g_stride": "i64", "labels_ptr": "*i64", "loss_ptr": "*fp32",
              "scale_ptr": "*fp32", "inv_T": "fp32", "beta": "fp32", "alpha": "fp32",
              "ignore_index": "i32", "V": "i32"}
    kd_sig = dict(common, s_ptr="*bf16", s_stride="i64", t_ptr="*bf16", t_stride="i64")
    topk_sig = dict(common, s_ptr="*bf16", s_stride="i64", ids_ptr="*i32", ids_stride="i64",
                    lp_ptr="*bf16", lp_stride="i64", tail_ptr="*fp32", K="i32")
    block, warps = launch_config(128256)
    out = []
    cases = [(_kd_div_fwd_kernel, kd_sig, dict(KIND=kind, HAS_LABELS=True, COMPUTE_GRAD=True,
                                               BLOCK_V=block, RTNE_BF16=False))
             for kind in (0, 1, 2, 5)]
    cases += [(_topk_kd_fwd_kernel, topk_sig, dict(KIND=kind, HAS_TAIL=True, HAS_LABELS=True,
                                                   COMPUTE_GRAD=True, BLOCK_V=block, BLOCK_K=256,
                                                   RTNE_BF16=False))
              for kind in (0, 2)]
    for fn, sig, consts in cases:
        names = fn.arg_names
        full = {n: (sig[n] if n in sig else "constexpr") for n in names}
        k = triton.compile(ASTSource(fn=fn, signature=full, constexprs=consts), target=target,
                           options={"num_warps": warps})
        usage = ""
        if os.path.exists(cuobjdump):
            with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                f.write(k.asm["cubin"])
            res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True)
            usage = " ".join(l.strip() for l in res.stdout.splitlines() if "REG" in l)
        out.append({"kernel": fn.__name__, "kind": consts["KIND"], "usage": usage})
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    import json

    report = json.loads(res.stdout.strip().splitlines()[-1])
    print(report)
    assert len(report) == 6
    for r in report:
        if r["usage"]:
            assert "LOCAL:0" in r["usage"], f"register spills in {r}"
