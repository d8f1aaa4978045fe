"""Step cost of online KD: one KD optimizer step vs (one student SFT step + one teacher forward).

    python launchers/bench_step.py                       # CPU, tiny Llamas, vocab 8192
    python launchers/bench_step.py --vocab 32000 --seq 256 --micro-batch 4 --teacher-size 256x4 --student-size 128x2
    deepspeed --num_gpus 1 launchers/bench_step.py --engine deepspeed --vocab 151936 --seq 1024

All three are timed side by side in one process on the same batch, interleaved (KD, SFT, teacher
forward, repeat), through the trainer's own ``train_step`` (the SFT step is the same step with the
teacher switched off, so CE-only objective). Reports p50 [p20-p80] per kind and the ratio
KD / (SFT + teacher forward); the target is <= 1.15. The last line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _size(s: str):
    from distill.models.tiny import TinySize

    h, layers = (int(x) for x in s.split("x"))
    heads = max(1, h // 32)
    return TinySize(hidden=h, layers=layers, heads=heads, kv_heads=max(1, heads // 2), intermediate=int(h * 2.75))


def _q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (prompt 1/4, response 3/4)")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--teacher-size", default="192x4", help="hidden x layers")
    ap.add_argument("--student-size", default="96x2", help="hidden x layers")
    ap.add_argument("--kind", default="forward_kl")
    ap.add_argument("--engine", default="torch", choices=["torch", "deepspeed"])
    ap.add_argument("--ds-config", default="ds_configs/zero3.json")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args(argv)

    import torch

    from distill.config import RunConfig, from_dict
    from distill.models.tiny import build_tiny_causal_lm, train_tokenizer
    from distill.trainer import Trainer

    work = Path(tempfile.mkdtemp(prefix="bench_step_"))
    tok = train_tokenizer([f"word{i} token{i % 97} sample{i % 13}" for i in range(3000)], vocab_size=1024)
    for name, size, seed in (("teacher", args.teacher_size, 1), ("student", args.student_size, 2)):
        m = build_tiny_causal_lm(args.vocab, _size(size), seed=seed)
        m.save_pretrained(work / name)
        tok.save_pretrained(work / name)
    # Random token sequences of exactly --seq tokens, prompt = first quarter.
    g = torch.Generator().manual_seed(0)
    n = args.micro_batch * args.grad_accum * 4
    ids = torch.randint(4, len(tok), (n, args.seq), generator=g)
    cfg = from_dict(RunConfig, {
        "run": {"out_dir": str(work / "run")},
        "model": {"student": str(work / "student"), "teacher": str(work / "teacher"), "vocab_size": args.vocab},
        "data": {"path": str(work / "unused.jsonl")},
        "train": {"steps": 10**6, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "lr": 1e-4},
        "kd": {"kind": args.kind},
        "deepspeed": {"engine": args.engine, "config": args.ds_config},
        "checkpoint": {"export": False},
        "log": {"progress_bar": False},
    })
    from distill import trainer as T

    class _Fixed:
        def __init__(self):
            p = args.seq // 4
            self.items = [{"input_ids": r.tolist(), "labels": [-100] * p + r[p:].tolist()} for r in ids]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    T.register_dataset("bench_fixed")(lambda cfg, tok, ctx: _Fixed())
    cfg.data.name = "bench_fixed"
    tr = Trainer(cfg).setup()
    micro = tr.micro_batches(0)
    teacher = tr.teacher
    dev_batches = [tr._to_device(b) for b in micro]
    sync = (lambda: torch.cuda.synchronize()) if tr.device.type == "cuda" else (lambda: None)

    def kd_step():
        tr.teacher = teacher
        tr.train_step(0, micro)

    def sft_step():
        tr.teacher = None
        tr.train_step(0, micro)

    def teacher_fwd():
        for b in dev_batches:
            teacher(b)

    times = {"kd_step": [], "sft_step": [], "teacher_fwd": []}
    fns = {"kd_step": kd_step, "sft_step": sft_step, "teacher_fwd": teacher_fwd}
    for r in range(args.warmup + args.repeats):
        for k, f in fns.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            if r >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    tr.teacher = teacher
    ratios = [a / (b + c) for a, b, c in zip(times["kd_step"], times["sft_step"], times["teacher_fwd"])]
    rows = []
    for k, v in times.items():
        rows.append({"name": k, "p50_ms": 1e3 * statistics.median(v), "p20_ms": 1e3 * _q(v, 0.2), "p80_ms": 1e3 * _q(v, 0.8)})
    summ = {"ratio_p50": statistics.median(ratios), "ratio_p20": _q(ratios, 0.2), "ratio_p80": _q(ratios, 0.8),
            "ratio_of_p50s": rows[0]["p50_ms"] / (rows[1]["p50_ms"] + rows[2]["p50_ms"])}
    if tr.env.is_main:
        print(f"device={tr.device} engine={args.engine} vocab={args.vocab} tokens/step="
              f"{args.micro_batch * args.grad_accum * args.seq} teacher={args.teacher_size} student={args.student_size} "
              f"kind={args.kind} repeats={args.repeats}")
        print(f"{'what':<14}{'p50 ms':>10}{'p20 ms':>10}{'p80 ms':>10}")
        for r in rows:
            print(f"{r['name']:<14}{r['p50_ms']:>10.1f}{r['p20_ms']:>10.1f}{r['p80_ms']:>10.1f}")
        print(f"KD step / (SFT step + teacher forward): p50 {summ['ratio_p50']:.3f} "
              f"[p20 {summ['ratio_p20']:.3f} - p80 {summ['ratio_p80']:.3f}] (target <= 1.15)")
        print(json.dumps({"args": vars(args), "rows": rows, **summ}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
