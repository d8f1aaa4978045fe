"""Peak memory of the KD loss (forward + backward) on CPU: eager torch vs the chunked torch path.

    python -m distill.losses.bench_memory            # the table in docs/losses.md (a few minutes)
    python -m distill.losses.bench_memory --quick    # small shapes only (seconds)

Method: every case runs in a FRESH Python subprocess. After the inputs are built, the worker
resets the kernel's resident-set high-water mark (``echo 5 > /proc/self/clear_refs``) and records
``VmRSS`` as the baseline; after forward + backward it reads ``VmHWM`` from ``/proc/self/status``.
``peak extra = VmHWM - baseline`` is every byte the loss touched above its inputs, whoever
allocated it: torch's CPU allocator has no cache, and with ``MALLOC_MMAP_THRESHOLD_=65536`` (set
for the worker) glibc mmaps every block >= 64 KiB and unmaps it on free, so the RSS follows
torch's live tensors (tracemalloc and the torch profiler's CPU memory
events would miss or mis-attribute them). Linux only.

Columns: ``grad`` the gradient of the student logits (logits dtype, kept by the caller), ``chunk``
one fp32 [chunk_tokens x vocab] tensor, ``fp32 copies`` peak extra / one fp32 [tokens x vocab]
tensor (eager code needs several), ``work/chunk`` (peak extra - grad) / chunk: the working set of
one chunk, in chunk tensors, ``chunk share`` (peak extra - grad) / peak extra. The last line is
JSON with every row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MIB = 1024 * 1024


def _eager_loss(student, teacher, labels, kind, temperature):
    """KD as commonly written with torch ops (TRL / tutorials): full fp32 log-softmaxes."""
    import torch

    log_q = torch.log_softmax(student.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher.float() / temperature, dim=-1)
    if kind == "forward_kl":
        per_tok = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif kind == "jsd":
        beta = 0.5
        log_m = torch.logsumexp(
            torch.stack([log_q + torch.log(torch.tensor(1 - beta)), log_p + torch.log(torch.tensor(beta))]),
            dim=0,
        )
        per_tok = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (
            log_q.exp() * (log_q - log_m)
        ).sum(-1)
    else:
        raise ValueError(f"eager baseline implements forward_kl and jsd, not {kind}")
    mask = labels != -100
    return (per_tok * mask).sum() / mask.sum().clamp_min(1)


def worker(case: dict) -> dict:
    """Run one case in this process and return its measurements (call in a fresh process)."""
    import torch

    from distill.losses.divergences import default_chunk_tokens, divergence
    from distill_kernels.bench.harness import proc_status_bytes, reset_hwm

    torch.set_num_threads(int(case.get("threads", 2)))
    torch.manual_seed(0)
    n, vocab = case["tokens"], case["vocab"]
    dtype = getattr(torch, case["dtype"])
    student = torch.randn(n, vocab, dtype=dtype).requires_grad_()
    teacher = torch.randn(n, vocab, dtype=dtype)
    labels = torch.randint(0, vocab, (n,))
    labels[::10] = -100
    chunk_tokens = case.get("chunk_tokens") or default_chunk_tokens(vocab)
    reset_hwm()
    base = proc_status_bytes()["VmRSS"]
    t0 = time.perf_counter()
    if case["impl"] == "eager":
        loss = _eager_loss(student, teacher, labels, case["kind"], case.get("temperature", 1.0))
    else:
        loss = divergence(
            case["kind"], student, teacher, labels, temperature=case.get("temperature", 1.0),
            impl="torch", chunk_tokens=chunk_tokens, grad_inplace=case["impl"] == "chunked_inplace",
        )
    (grad,) = torch.autograd.grad(loss, student)
    secs = time.perf_counter() - t0
    st = proc_status_bytes()
    elem = torch.tensor([], dtype=dtype).element_size()
    grad_bytes = 0 if case["impl"] == "chunked_inplace" else n * vocab * elem
    chunk_bytes = 4 * min(chunk_tokens, n) * vocab
    peak_extra = st["VmHWM"] - base
    return {
        **case,
        "loss": float(loss),
        "grad_finite": bool(torch.isfinite(grad).all()),
        "inputs_mib": 2 * n * vocab * elem / MIB,
        "grad_mib": grad_bytes / MIB,
        "chunk_tokens": chunk_tokens if case["impl"] != "eager" else None,
        "chunk_mib": chunk_bytes / MIB if case["impl"] != "eager" else None,
        "peak_extra_mib": peak_extra / MIB,
        "fp32_copies": peak_extra / (4 * n * vocab),
        "work_per_chunk": (peak_extra - grad_bytes) / chunk_bytes if case["impl"] != "eager" else None,
        "chunk_share": (peak_extra - grad_bytes) / peak_extra if case["impl"] != "eager" else None,
        "seconds": secs,
    }


def measure(case: dict, timeout: float = 1800) -> dict:
    """Run ``case`` in a fresh subprocess (a clean high-water mark) and return its row."""
    return measure_many([case], timeout)[0]


def measure_many(cases: list[dict], timeout: float = 1800) -> list[dict]:
    """Run ``cases`` one after the other in ONE fresh subprocess (cheaper: one torch import).
    Sound because each case builds its own inputs, the previous case's memory has been unmapped
    (fixed mmap threshold) and the high-water mark is reset after the inputs exist."""
    env = dict(os.environ)
    # A fixed mmap threshold stops glibc from moving freed blocks < 32 MiB onto its heap (where
    # they stay resident after free): every block >= 64 KiB is mmap'ed and unmapped on free.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, "-m", "distill.losses.bench_memory", "--worker", json.dumps(cases)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker failed for {cases}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def default_cases(quick: bool) -> list[dict]:
    v = 151_936
    if quick:
        small = dict(tokens=256, vocab=32_000, dtype="float32", kind="forward_kl", chunk_tokens=32)
        return [dict(small, impl="eager"), dict(small, impl="chunked"), dict(small, impl="chunked_inplace")]
    cases = []
    for kind in ("forward_kl", "jsd"):
        base = dict(tokens=1024, vocab=v, dtype="bfloat16", kind=kind)
        cases += [dict(base, impl="eager"), dict(base, impl="chunked")]
    big = dict(tokens=8192, vocab=v, dtype="bfloat16", kind="forward_kl")
    cases += [dict(big, impl="chunked"), dict(big, impl="chunked_inplace")]
    return cases


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps([worker(c) for c in json.loads(args.worker)]))
        return
    if not os.path.exists("/proc/self/clear_refs"):
        sys.exit("bench_memory needs Linux /proc (VmHWM + clear_refs)")
    rows = [measure(c) for c in default_cases(args.quick)]
    # Eager / chunked ratio at equal shape and kind.
    for r in rows:
        eager = [e for e in rows if e["impl"] == "eager" and all(
            e[k] == r[k] for k in ("tokens", "vocab", "dtype", "kind"))]
        r["eager_over_this"] = eager[0]["peak_extra_mib"] / r["peak_extra_mib"] if eager else None
    head = (f"{'impl':<16}{'kind':<11}{'tokens':>7}{'vocab':>8}{'dtype':>9}{'inputs MiB':>11}"
            f"{'grad MiB':>10}{'chunk':>6}{'chunk MiB':>10}{'peak+ MiB':>11}{'fp32 copies':>12}"
            f"{'work/chunk':>11}{'chunk share':>12}{'eager/this':>11}{'s':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['impl']:<16}{r['kind']:<11}{r['tokens']:>7}{r['vocab']:>8}{r['dtype']:>9}"
              f"{r['inputs_mib']:>11.0f}{r['grad_mib']:>10.0f}{_fmt(r['chunk_tokens'], 'd'):>6}"
              f"{_fmt(r['chunk_mib'], '.1f'):>10}{r['peak_extra_mib']:>11.0f}{r['fp32_copies']:>12.2f}"
              f"{_fmt(r['work_per_chunk'], '.1f'):>11}{_fmt(r['chunk_share'], '.1%'):>12}"
              f"{_fmt(r['eager_over_this'], '.1f'):>11}{r['seconds']:>7.1f}")
    print("method: fresh subprocess per row; peak extra = VmHWM - VmRSS after inputs "
          "(/proc/self/clear_refs reset), forward + backward")
    print(json.dumps({"bench": "losses.bench_memory", "method": "VmHWM above inputs, fresh process",
                      "rows": rows}))


if __name__ == "__main__":
    main()
