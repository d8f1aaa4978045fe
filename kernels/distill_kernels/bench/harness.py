"""Shared microbenchmark harness: timing, peak memory, bandwidth / MFU, table and JSON.

Every provider of one op runs in the same process on the same inputs (STYLE.md "Benchmarks"):
``torch`` (eager, plain torch ops as a user writes them), ``ref`` (kernels/distill_kernels/ref.py), ``triton``
(our kernel) and ``liger`` (Liger-Kernel, when installed). Each row reports

* ms p50 with p20-p80 over ``--reps`` runs (CUDA events on a GPU, perf_counter on CPU);
* peak memory above the baseline taken right before the call (inputs already allocated):
  ``torch.cuda.max_memory_allocated`` on a GPU; on CPU the process's resident high-water mark
  (VmHWM, reset through /proc/self/clear_refs) above VmRSS, which tracks large tensors because
  glibc serves them with mmap and returns them on free;
* GB/s = the op's minimal HBM traffic (each input read once, each produced gradient written
  once: the same byte count for every provider, i.e. an effective bandwidth) / time, and its
  % of the device's peak HBM bandwidth (memory-bound ops); or TFLOP/s and MFU for GEMM-bound
  ops (fused_linear_kd);
* speedups of ``triton`` vs ``torch`` and vs ``liger`` (same row shape and mode).

On CPU (no CUDA) the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set here before
triton is imported): their timings are meaningless and are excluded from every speed
comparison; their peak memory is still their real allocation pattern. The last line printed is
one JSON document with every row.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The interpreter's cost is per block iteration: one block per row keeps CPU runs short.
    # Its numpy temporaries (a few fp32 vectors of one block) stay far below the buffers measured.
    os.environ.setdefault("DISTILL_KERNELS_MAX_BLOCK_V", str(2**18))


def _pin_cpu_allocator() -> None:
    """Serve every allocation >= 128 KiB with mmap and return it on free (glibc's default raises
    that threshold after the first large free, after which freed tensors stay resident and the
    resident high-water mark no longer shows a call's peak)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixed: disables the dynamic threshold)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass

# Peak HBM bandwidth (TB/s) and dense bf16 tensor-core peak (TFLOP/s) by device-name substring;
# first match wins, so more specific names come first. Vendor datasheet figures.
DEVICE_PEAKS = [
    ("H200", 4.8, 989.0),
    ("H100 NVL", 3.9, 835.0),
    ("H100 PCIe", 2.0, 756.0),
    ("H100", 3.35, 989.0),  # SXM5
    ("GH200", 4.0, 989.0),
    ("B200", 8.0, 2250.0),
    ("A100-SXM4-80GB", 2.039, 312.0),
    ("A100 80GB PCIe", 1.935, 312.0),
    ("A100", 1.555, 312.0),  # 40 GB
    ("L40S", 0.864, 362.0),
    ("A10G", 0.6, 70.0),
    ("RTX 4090", 1.008, 165.0),
]


def device_peaks(name: str) -> tuple[float | None, float | None]:
    for key, tbps, tflops in DEVICE_PEAKS:
        if key.lower() in name.lower():
            return tbps, tflops
    return None, None


@dataclass
class Env:
    device: str
    name: str
    peak_tbps: float | None
    peak_tflops: float | None
    interp: bool
    date: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"))
    torch: str = torch.__version__


def make_env(device: str) -> Env:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        tbps, tflops = device_peaks(name)
        return Env("cuda", name, tbps, tflops, interp=False)
    _pin_cpu_allocator()
    name = f"CPU ({os.cpu_count()} logical cores)"
    return Env("cpu", name, None, None, interp=os.environ.get("TRITON_INTERPRET") == "1")


# ------------------------------------------------------------------------------------------------
# Measurement


def proc_status_bytes() -> dict:
    """``{"VmRSS": bytes, "VmHWM": bytes}`` of this process (Linux /proc/self/status)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out


def reset_hwm() -> bool:
    """Reset this process's resident-set high-water mark (VmHWM) to the current RSS; False where
    the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure(fn: Callable[[], None], env: Env, *, reps: int, warmup: int) -> dict:
    """Run ``fn`` warmup + reps times; return ms percentiles and peak MiB above the baseline."""
    gc.collect()
    if env.device == "cuda":
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(warmup):
            fn()
        gc.collect()
        peak = None
        if reset_hwm():
            base = proc_status_bytes()["VmRSS"] // 1024
            fn()
            peak = max(0, proc_status_bytes()["VmHWM"] // 1024 - base) / 1024
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"ms_p50": statistics.median(times), "ms_p20": q[1], "ms_p80": q[7],
            "peak_mib": peak, "reps": len(times)}


@dataclass
class Row:
    op: str
    provider: str
    mode: str  # "fwd" or "fwd+bwd"
    tokens: int
    vocab: int
    extra: str  # op-specific shape info (k, hidden, kind)
    ms_p50: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    peak_mib: float | None = None
    gbps: float | None = None
    pct_peak_bw: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    speedup_vs_torch: float | None = None
    speedup_vs_liger: float | None = None
    note: str = ""


def run_case(rows: list[Row], env: Env, *, op, provider, mode, tokens, vocab, extra, fn,
             bytes_moved=None, flops=None, reps=10, warmup=2, note=""):
    """Measure one provider on one case and append its Row (errors become a note, e.g. OOM)."""
    row = Row(op, provider, mode, tokens, vocab, extra, note=note)
    interp = env.interp and provider == "triton"
    try:
        m = measure(fn, env, reps=1 if interp else reps, warmup=0 if interp else warmup)
    except torch.cuda.OutOfMemoryError:
        row.note = "OOM"
        torch.cuda.empty_cache()
        rows.append(row)
        return row
    row.ms_p50, row.ms_p20, row.ms_p80, row.peak_mib = (m["ms_p50"], m["ms_p20"], m["ms_p80"],
                                                        m["peak_mib"])
    if interp:
        row.note = ((row.note + " " if row.note else "")
                    + "interpreter: time not comparable; memory includes its copies of the args")
    elif row.ms_p50:
        sec = row.ms_p50 / 1e3
        if bytes_moved:
            row.gbps = bytes_moved / sec / 1e9
            if env.peak_tbps:
                row.pct_peak_bw = 100.0 * row.gbps / (env.peak_tbps * 1e3)
        if flops:
            row.tflops = flops / sec / 1e12
            if env.peak_tflops:
                row.mfu = 100.0 * row.tflops / env.peak_tflops
    rows.append(row)
    return row


def add_speedups(rows: list[Row], env: Env) -> None:
    """Speedup of each triton row vs the torch / liger row of the same case (never for
    interpreter timings)."""
    index = {(r.op, r.provider, r.mode, r.tokens, r.vocab, r.extra): r for r in rows}
    for r in rows:
        if r.provider != "triton" or r.ms_p50 is None or (env.interp and env.device == "cpu"):
            continue
        for other, attr in (("torch", "speedup_vs_torch"), ("liger", "speedup_vs_liger")):
            o = index.get((r.op, other, r.mode, r.tokens, r.vocab, r.extra))
            if o is not None and o.ms_p50:
                setattr(r, attr, o.ms_p50 / r.ms_p50)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(rows: list[Row], env: Env, title: str) -> None:
    print(f"# {title} | device: {env.name} | torch {env.torch} | {env.date}"
          + (" | Triton interpreter: triton timings excluded from comparisons" if env.interp else ""))
    head = ["op", "provider", "mode", "tokens", "vocab", "extra", "ms p50", "(p20-p80)",
            "peak MiB", "GB/s", "%BW", "TFLOP/s", "MFU%", "x torch", "x liger", "note"]
    body = []
    for r in rows:
        body.append([
            r.op, r.provider, r.mode, str(r.tokens), str(r.vocab), r.extra,
            _fmt(r.ms_p50, ".3f"),
            "-" if r.ms_p20 is None else f"({r.ms_p20:.3f}-{r.ms_p80:.3f})",
            _fmt(r.peak_mib, ".1f"), _fmt(r.gbps, ".1f"), _fmt(r.pct_peak_bw, ".1f"),
            _fmt(r.tflops, ".1f"), _fmt(r.mfu, ".1f"),
            _fmt(r.speedup_vs_torch, ".2f"), _fmt(r.speedup_vs_liger, ".2f"), r.note,
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for b in body:
        print("  ".join(c.ljust(w) for c, w in zip(b, widths)))


def print_json(rows: list[Row], env: Env, op: str) -> None:
    print(json.dumps({"op": op, "env": asdict(env), "rows": [asdict(r) for r in rows]}))


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--small", action="store_true",
                   help="reduced CPU-sized shapes (the default on a machine without CUDA)")
    p.add_argument("--tokens", type=int, nargs="*", help="override the token counts")
    p.add_argument("--vocab", type=int, nargs="*", help="override the vocabulary sizes")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--providers", nargs="*", default=["torch", "ref", "triton", "liger"])
    p.add_argument("--reps", type=int, default=None, help="timed runs per case (default 20 GPU, 3 CPU)")
    p.add_argument("--interp-max-elems", type=float, default=2**23,
                   help="CPU only: skip the interpreted kernel above tokens*vocab elements (slow)")
    return p


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def try_import_liger(name: str):
    """A Liger-Kernel class or None (optional dependency)."""
    try:
        import liger_kernel.transformers as lt  # noqa: PLC0415
    except Exception:  # noqa: BLE001 - not installed or not importable here
        return None
    return getattr(lt, name, None)


def sync(env: Env) -> None:
    if env.device == "cuda":
        torch.cuda.synchronize()
