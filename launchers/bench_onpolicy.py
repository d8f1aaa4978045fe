"""Where an on-policy KnowDist step's time goes: the student's generation, the teacher's scoring, the
student's forward + backward + optimizer step, the rest.

    python launchers/bench_onpolicy.py                                  # the built-in default, fraction 0.5
    python launchers/bench_onpolicy.py --steps 20 --kd.on_policy.fraction=1.0 --model.builtin_dir=runs/knowdist/builtin
    python launchers/bench_onpolicy.py --config FILE.yaml ...           # a real pair (1 process)

Takes the KnowDist launcher's config and overrides (``kd.on_policy.fraction`` defaults to 0.5 here),
prepares the models and the corpus as the launcher does (the built-in teacher is trained once and
cached under ``model.builtin_dir``), trains ``--steps`` optimizer steps in ``run.out_dir`` (default
runs/bench_onpolicy, overwritten) and prints one JSON line: seconds per step of each part (the first
step is left out as warm-up), each part's share, and the generated tokens per step. Parts are wall
time around the calls on rank 0, synchronised on CUDA.
"""

from __future__ import annotations

import json
import sys
import time
from importlib.util import find_spec

if find_spec("distill") is None:  # a source checkout runs what is installed, never its own tree
    sys.exit("launchers/bench_onpolicy.py: the distill package is not installed; run `pip install -e .` in the repository root")


def _timed(obj, name: str, totals: dict, part: str) -> None:
    import torch

    inner = getattr(obj, name)

    def call(*a, **k):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = inner(*a, **k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        totals[part] = totals.get(part, 0.0) + time.perf_counter() - t0
        return out

    setattr(obj, name, call)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from distill.config import load_config
    from distill.knowdist.stage import KnowDistConfig, prepare_corpus
    from distill.models.load import resolve_builtin
    from distill.train.build import build_trainer

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="launchers/bench_onpolicy.py")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps (the first is warm-up)")
    cfg_args = [a for a in argv if a.startswith("--") and "." in a.split("=")[0] or a.startswith("--config")]
    args, _ = ap.parse_known_args([a for a in argv if a not in cfg_args])
    defaults = ["--kd.on_policy.fraction=0.5", "--run.out_dir=runs/bench_onpolicy", "--checkpoint.overwrite=true",
                "--checkpoint.export=false", "--eval.at_end=false", "--log.progress_bar=false"]
    cfg, _ = load_config(KnowDistConfig, defaults + argv)
    cfg.train.steps, cfg.train.epochs = args.steps, 0
    cfg.checkpoint.every = 0
    cfg.validate()
    student, teacher = resolve_builtin(cfg.model, cfg.run.out_dir)
    builtin = cfg.model.teacher == "builtin"
    cfg.model.student, cfg.model.teacher = student, teacher
    cfg.data.path = prepare_corpus(cfg, builtin)
    tr = build_trainer(cfg)
    parts: dict[str, float] = {}
    if tr.batches.rollout is not None:
        _timed(tr.batches, "rollout", parts, "generation")
    if tr.teacher is not None:
        _timed(tr.teacher, "rows", parts, "teacher")
    for name in ("forward", "backward", "step"):
        _timed(tr.engine, name, parts, "student")
    per_step, tokens = [], []
    for step in range(args.steps):
        before = dict(parts)
        t0 = time.perf_counter()
        rec = tr.train_step(step)
        total = time.perf_counter() - t0
        tr.step = step + 1
        spent = {k: parts.get(k, 0.0) - before.get(k, 0.0) for k in parts}
        per_step.append({**spent, "other": total - sum(spent.values()), "total": total})
        tokens.append(rec.get("gen_tokens", 0))
    keep = per_step[1:] or per_step
    mean = {k: sum(s.get(k, 0.0) for s in keep) / len(keep) for k in ("generation", "teacher", "student", "other", "total")}
    print(json.dumps({"bench": "launchers/bench_onpolicy.py", "fraction": cfg.kd.on_policy.fraction,
                      "steps_measured": len(keep), "seconds_per_step": {k: round(v, 4) for k, v in mean.items()},
                      "share": {k: round(mean[k] / mean["total"], 3) for k in ("generation", "teacher", "student", "other")},
                      "gen_tokens_per_step": sum(tokens[1:] or tokens) / len(keep),
                      "global_batch": tr.batches.schedule.global_batch}))
    return 0


if __name__ == "__main__":
    from distill.errors import run_cli

    sys.exit(run_cli(main, "bench_onpolicy.py"))
