"""Everything a lent GPU should run, in priority order, within one time budget.

    python -m distill_kernels.bench.suite --budget 480             # on the GPU machine, from the repo root
    python -m distill_kernels.bench.suite --budget 480 --dry-run   # the plan: stages, caps, what fits
    OUT=/tmp/out python -m distill_kernels.bench.suite --budget 900 --cap bench_step_knowdist=300

Stages, highest priority first (each one a subprocess killed with its process group at its cap):

1. ``gpu_tests``: ``pytest -m gpu tests/kernels -x -q`` (every kernel against kernels/distill_kernels/ref.py at
   real vocabularies 32000 / 128256 / 152064, bf16 and fp32);
2. one run of every kernel benchmark at its defaults: ``kd_div`` (jsd), ``topk_kd`` (forward KL,
   k=64), ``fused_linear_kd`` (full teacher, jsd);
3. ``launchers/bench_step.py --preset gpu`` (the KD step: lean vs logits vs the eager TRL peer at
   Qwen2.5-0.5B / 7B sizes), the ICLDist batch first, then the KnowDist batch;
4. the other benchmark variants of kernels/BENCHMARKS.md (kd_div forward KL, topk_kd jsd,
   fused_linear_kd with a top-k teacher), if time is left.

Budget: a stage starts only if its cap fits in the budget left (the suite's own start-up
included); stages that end early leave their time to later ones, so a stage the plan skips may
still run. ``--dry-run`` prints the plan as if every stage used its whole cap and exits 0; it
works without a GPU. Without CUDA (and no ``--dry-run``) the suite says so in one line and exits 2.

Output: a summary table (stage, status, seconds, headline figures) and, last, one JSON line with
the device name, date and every stage's last-line JSON. Each stage's full stdout/stderr goes to
``$OUT/<stage>.log`` (``./bench_out/`` when OUT is unset), its JSON to ``$OUT/<stage>.json``, the
summary to ``$OUT/suite.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]  # kernels/distill_kernels/bench/suite.py -> the repository root
NO_CUDA_EXIT = 2


@dataclasses.dataclass
class Stage:
    name: str
    cmd: list[str]  # argv; "{py}" is sys.executable
    cap_s: float  # timeout (seconds); the stage is skipped when it no longer fits
    kind: str  # pytest | kernel | step (how its headline is read)
    needs: str = ""  # a repo-relative path the stage needs (a source checkout)


def default_stages() -> list[Stage]:
    """Caps are estimates for an H100/H200 (no GPU has run this suite yet): each stage's measured
    seconds are in the summary; adjust with ``--cap NAME=SECONDS``. The kernel benchmarks run with
    ``--reps 10`` (their GPU default is 20) to stay within their caps."""
    py = "{py}"
    k = [py, "-m"]
    reps = ["--reps", "10"]
    return [
        Stage("gpu_tests", [py, "-m", "pytest", "-m", "gpu", "tests/kernels", "-x", "-q", "-p", "no:cacheprovider"],
              90, "pytest", needs="tests/kernels"),
        Stage("kd_div", k + ["distill_kernels.bench.kd_div", "--kind", "jsd", *reps], 60, "kernel"),
        Stage("topk_kd", k + ["distill_kernels.bench.topk_kd", "--kind", "forward_kl", "--k", "64", *reps], 60,
              "kernel"),
        Stage("fused_linear_kd", k + ["distill_kernels.bench.fused_linear_kd", "--teacher", "full", *reps], 60,
              "kernel"),
        Stage("bench_step_icldist", [py, "launchers/bench_step.py", "--preset", "gpu", "--batch", "icldist"],
              170, "step", needs="launchers/bench_step.py"),
        Stage("bench_step_knowdist", [py, "launchers/bench_step.py", "--preset", "gpu", "--batch", "knowdist"],
              170, "step", needs="launchers/bench_step.py"),
        Stage("kd_div_forward_kl", k + ["distill_kernels.bench.kd_div", "--kind", "forward_kl", *reps], 50, "kernel"),
        Stage("topk_kd_jsd", k + ["distill_kernels.bench.topk_kd", "--kind", "jsd", "--k", "64", *reps], 50, "kernel"),
        Stage("fused_linear_kd_topk", k + ["distill_kernels.bench.fused_linear_kd", "--teacher", "topk",
                                           "--kind", "forward_kl", *reps], 50, "kernel"),
    ]


def plan(stages: list[Stage], budget: float, used: float = 0.0) -> list[tuple[Stage, bool]]:
    """(stage, fits) in priority order, if every stage that runs uses its whole cap."""
    out, left = [], budget - used
    for s in stages:
        fits = s.cap_s <= left
        if fits:
            left -= s.cap_s
        out.append((s, fits))
    return out


# ------------------------------------------------------------------------------------------------
# Headlines: a few figures per stage, read from its last-line JSON (or pytest's summary line)


def _rng(xs, spec):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    lo, hi = min(xs), max(xs)
    return format(lo, spec) if lo == hi else f"{format(lo, spec)}-{format(hi, spec)}"


def headline(stage: Stage, doc: dict | None, log_tail: list[str]) -> str:
    if stage.kind == "pytest":
        for line in reversed(log_tail):
            if any(w in line for w in ("passed", "failed", "error", "skipped", "no tests ran")):
                return line.strip("= ").strip()
        return ""
    if doc is None:
        return ""
    if stage.kind == "kernel":
        tri = [r for r in doc.get("rows", []) if r.get("provider") == "triton" and r.get("mode") == "fwd+bwd"]
        parts = [f"triton fwd+bwd x torch {_rng([r.get('speedup_vs_torch') for r in tri], '.2f')}"]
        if any(r.get("speedup_vs_liger") is not None for r in tri):
            parts.append(f"x liger {_rng([r.get('speedup_vs_liger') for r in tri], '.2f')}")
        if any(r.get("pct_peak_bw") is not None for r in tri):
            parts.append(f"%BW {_rng([r.get('pct_peak_bw') for r in tri], '.0f')}")
        if any(r.get("mfu") is not None for r in tri):
            parts.append(f"MFU% {_rng([r.get('mfu') for r in tri], '.0f')}")
        return ", ".join(parts)
    if stage.kind == "step":
        parts = []
        for r in doc.get("ratios", []):
            parts.append(f"{r['batch']} {r['what']} time {_rng([r.get('time')], '.3f')} "
                         f"peak+ {_rng([r.get('mem_extra')], '.3f')}")
        for r in doc.get("rows", []):
            if r.get("path") == "lean" and "error" not in r:
                mfu = r.get("mfu")
                parts.append(f"lean {r['tok_s']:.0f} tok/s" + ("" if mfu is None else f" MFU {100 * mfu:.1f}%"))
        return "; ".join(parts)
    return ""


# ------------------------------------------------------------------------------------------------
# Running


def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_stage(stage: Stage, out_dir: Path, timeout: float) -> dict:
    cmd = [sys.executable if c == "{py}" else c for c in stage.cmd]
    log = out_dir / f"{stage.name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OUT", str(out_dir))
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        # Own process group: a timeout also ends the stage's own children (bench_step's workers).
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, f"timeout ({timeout:.0f} s)"
    secs = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    doc = _last_json(text)
    if doc is not None:
        (out_dir / f"{stage.name}.json").write_text(json.dumps(doc))
    tail = text.strip().splitlines()[-20:]
    return {"stage": stage.name, "status": status, "rc": rc, "seconds": secs, "cap_s": timeout,
            "cmd": " ".join(cmd), "log": str(log), "headline": headline(stage, doc, tail), "json": doc}


def _parse_caps(items: list[str]) -> dict:
    caps = {}
    for it in items:
        name, _, val = it.partition("=")
        if not val:
            raise SystemExit(f"--cap {it!r}: NAME=SECONDS")
        caps[name] = float(val)
    return caps


def select(stages: list[Stage], names: list[str] | None, caps: dict) -> list[Stage]:
    known = {s.name for s in stages}
    bad = [n for n in [*(names or []), *caps] if n not in known]
    if bad:
        raise SystemExit(f"unknown stage(s) {bad}; known: {[s.name for s in stages]}")
    if names:
        stages = [next(s for s in stages if s.name == n) for n in names]  # in the order given
    return [dataclasses.replace(s, cap_s=caps.get(s.name, s.cap_s)) for s in stages]


def print_table(results: list[dict]) -> None:
    head = ["stage", "status", "seconds", "cap", "headline"]
    body = [[r["stage"], r["status"], "-" if r.get("seconds") is None else f"{r['seconds']:.0f}",
             f"{r['cap_s']:.0f}", r.get("headline", "")] for r in results]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for b in body:
        print("  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip())


def main(argv=None) -> int:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole suite")
    ap.add_argument("--dry-run", action="store_true", help="print the planned stages and their caps, run nothing")
    ap.add_argument("--stages", nargs="+", default=None, help="run only these, in this order")
    ap.add_argument("--cap", action="append", default=[], metavar="NAME=SECONDS", help="override a stage's cap")
    args = ap.parse_args(argv)
    stages = select(default_stages(), args.stages, _parse_caps(args.cap))
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    if args.dry_run:
        rows = plan(stages, args.budget)
        print(f"# plan: budget {args.budget:.0f} s, {sum(f for _, f in rows)} of {len(rows)} stages fit at their "
              f"caps (a skipped one still runs if earlier stages end early)")
        used = 0.0
        print(f"{'stage':<22}{'cap s':>7}{'start by':>10}  {'plan':<8}command")
        for s, fits in rows:
            print(f"{s.name:<22}{s.cap_s:>7.0f}{(f'{used:.0f}' if fits else '-'):>10}  {'run' if fits else 'skip':<8}"
                  f"{' '.join('python' if c == '{py}' else c for c in s.cmd)}")
            used += s.cap_s if fits else 0.0
        print(json.dumps({"suite": "distill_kernels.bench.suite", "dry_run": True, "budget_s": args.budget,
                          "date": date, "stages": [{"stage": s.name, "cap_s": s.cap_s, "fits": fits,
                                                    "cmd": s.cmd} for s, fits in rows]}))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("distill_kernels.bench.suite: no CUDA device here (torch.cuda.is_available() is False); nothing run "
              "(--dry-run shows the plan)", file=sys.stderr)
        return NO_CUDA_EXIT
    device = torch.cuda.get_device_name()
    out_dir = Path(os.environ.get("OUT") or "bench_out").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"# suite: {device} | torch {torch.__version__} | {date} | budget {args.budget:.0f} s | out {out_dir}",
          flush=True)
    results = []
    for s in stages:
        left = args.budget - (time.perf_counter() - t_start)
        if s.needs and not (REPO / s.needs).exists():
            results.append({"stage": s.name, "status": f"skipped ({s.needs} not in {REPO})", "seconds": None,
                            "cap_s": s.cap_s, "headline": ""})
            continue
        if s.cap_s > left:
            results.append({"stage": s.name, "status": f"skipped (cap {s.cap_s:.0f} s > {max(left, 0):.0f} s left)",
                            "seconds": None, "cap_s": s.cap_s, "headline": ""})
            print(f"[suite] {s.name}: skipped, {max(left, 0):.0f} s left", flush=True)
            continue
        print(f"[suite] {s.name}: running (cap {s.cap_s:.0f} s, {left:.0f} s left)", flush=True)
        r = run_stage(s, out_dir, s.cap_s)
        print(f"[suite] {s.name}: {r['status']} in {r['seconds']:.0f} s  {r['headline']}", flush=True)
        results.append(r)
    total = time.perf_counter() - t_start
    print()
    print_table(results)
    print(f"total {total:.0f} s of {args.budget:.0f} s; logs and JSON in {out_dir}")
    doc = {"suite": "distill_kernels.bench.suite", "device": device, "torch": torch.__version__, "date": date,
           "budget_s": args.budget, "total_s": total, "out_dir": str(out_dir), "stages": results}
    (out_dir / "suite.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc))
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
