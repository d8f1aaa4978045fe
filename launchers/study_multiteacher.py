"""Multi-teacher study: one student distilled from three teachers with each weighting strategy.

    # 1 process (CPU, tiny models built here; --quick: under 10 minutes on 2 cores):
    python launchers/study_multiteacher.py --quick --out runs/study_multiteacher
    python launchers/study_multiteacher.py --smoke --out /tmp/mt_smoke    # the pipeline only, about a minute
    python launchers/study_multiteacher.py --out runs/study_multiteacher_full

One process only: the study trains many small runs one after another on the plain torch engine
(the strategies themselves run on any engine and world size; see docs/multiteacher.md for a
DeepSpeed run's config).

Teachers of different strengths per task, all with one tokenizer trained here on SentiBench text:
``polarity`` (trained mostly on sc/sst2 + sc/twitter), ``irony_stance`` (mostly on
multifaced/irony18 + multifaced/pstance), ``noise`` (random init: a teacher that knows nothing, with
diffuse distributions) and ``wrong`` (trained as long on every pair with another pair's response: a
confident teacher that is wrong about the text). The student trains on a mix of both task groups (the
teacher's ``Text:/Perspective:`` format, responses from the gold labels) with each strategy: fixed
equal weights, fixed equal over the two real teachers (the best fixed average a user who knows which
teachers are bad would pick), route (each example to its group's teacher), confidence, attention and
meta. The held-out pairs are split in two disjoint halves: meta tunes on one, every strategy is scored
on the other. Reported: each teacher's CE and entropy on the scored half; per strategy the final mean
weights, the held-out loss (response-token CE, overall and per task group) and SentiBench slices of
the exported student. Writes ``DIR/results.json``,
``DIR/results.md`` (the table) and ``DIR/weights.png`` (the weight trajectories).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from importlib.util import find_spec
from pathlib import Path

if find_spec("distill") is None:  # a source checkout runs what is installed, never its own tree
    sys.exit("launchers/study_multiteacher.py: the distill package is not installed; run `pip install -e .` in the repository root")

GROUPS = {"polarity": ("sc/sst2", "sc/twitter"), "irony_stance": ("multifaced/irony18", "multifaced/pstance")}
EVAL_TASKS = "sc/sst2,multifaced/irony18,multifaced/pstance"

SETTINGS = {
    # per_task: training pairs per task; held: held-out pairs per task; teacher_steps / student_steps:
    # optimizer steps; vocab: tokenizer size; eval_limit: SentiBench test sentences per task
    "quick": dict(per_task=240, held=60, vocab=1024, teacher_steps=250, student_steps=300, micro_batch=8,
                  max_len=64, eval_limit=60, meta_every=5),
    # smoke: every strategy end to end in about a minute; it checks the pipeline, its numbers mean nothing
    "smoke": dict(per_task=32, held=12, vocab=512, teacher_steps=15, student_steps=12, micro_batch=8,
                  max_len=64, eval_limit=4, meta_every=3),
    "full": dict(per_task=600, held=100, vocab=2048, teacher_steps=400, student_steps=400, micro_batch=8,
                 max_len=96, eval_limit=200, meta_every=10),
}


def _pairs(records: dict, per_task: int, held: int, seed: int):
    """{group: (train pairs, held-out pairs)} of (prompt, response) from each group's tasks."""
    from distill.models.builtin import format_prompt, perspective_response

    rng = random.Random(seed)
    out = {}
    for group, tasks in GROUPS.items():
        tr, he = [], []
        for task in tasks:
            recs = list(records.get(task, []))
            rng.shuffle(recs)
            got = []
            for r in recs:
                text = r.get("sentence") or r.get("text")
                resp = perspective_response(task, r)
                if text and resp is not None and len(text) < 300:
                    got.append((format_prompt(text, resp[0]), resp[1]))
                if len(got) >= per_task + held:
                    break
            tr += got[:per_task]
            he += got[per_task:per_task + held]
        out[group] = (tr, he)
    return out


def _mostly(own, other, frac: float, seed: int):
    rng = random.Random(seed)
    extra = rng.sample(other, int(len(other) * frac))
    return own + extra


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def build_assets(out: Path, s: dict, seed: int = 0) -> dict:
    """Tokenizer, teachers, student init and data files under ``out/assets`` (reused when present)."""
    from distill.models.builtin import records_by_task
    from distill.models.tiny import build_tiny_causal_lm, train_tokenizer
    from distill.multiteacher.study import mismatched_pairs, noise_teacher, train_teacher

    a = out / "assets"
    done = a / "DONE.json"
    if done.is_file():
        return json.loads(done.read_text())
    a.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    records, source = records_by_task()
    groups = _pairs(records, s["per_task"], s["held"], seed)
    texts = [p + r for tr, _ in groups.values() for p, r in tr]
    tok = train_tokenizer(texts * 2, vocab_size=s["vocab"])
    print(f"[study] data {source}: " + ", ".join(f"{g} {len(tr)} train / {len(he)} held-out"
                                              for g, (tr, he) in groups.items()) + f"; tokenizer {len(tok)}", flush=True)
    pol, iro = groups["polarity"][0], groups["irony_stance"][0]
    teachers = {}
    for name, data in (("polarity", _mostly(pol, iro, 0.1, seed)), ("irony_stance", _mostly(iro, pol, 0.1, seed))):
        t1 = time.time()
        teachers[name] = str(train_teacher(tok, data, a / name, size="student", steps=s["teacher_steps"],
                                           max_len=s["max_len"], seed=seed))
        print(f"[study] teacher {name}: {len(data)} pairs, {s['teacher_steps']} steps, {time.time() - t1:.0f}s", flush=True)
    teachers["noise"] = str(noise_teacher(tok, a / "noise", size="student", initializer_range=0.3))
    # Confidently wrong: as long a training as the real teachers, on every pair of both groups with another
    # pair's response (fluent and sure of itself, wrong about the text in front of it).
    t1 = time.time()
    teachers["wrong"] = str(train_teacher(tok, mismatched_pairs(pol + iro, seed=seed + 1), a / "wrong", size="student",
                                          steps=s["teacher_steps"], max_len=s["max_len"], seed=seed))
    print(f"[study] teacher wrong: {len(pol + iro)} mismatched pairs, {s['teacher_steps']} steps, "
          f"{time.time() - t1:.0f}s", flush=True)
    student = a / "student"
    build_tiny_causal_lm(len(tok), "micro", seed=seed + 2).save_pretrained(student)
    tok.save_pretrained(student)
    rows = [{"id": f"{g}-{i}", "prompt": p, "response": r, "teacher_id": g, "group": g}
            for g, (tr, _) in groups.items() for i, (p, r) in enumerate(tr)]
    held = [{"id": f"{g}-h{i}", "prompt": p, "response": r, "group": g}
            for g, (_, he) in groups.items() for i, (p, r) in enumerate(he)]
    # Two disjoint halves of the held-out pairs: meta tunes its weights on one (heldout_tune) and every
    # strategy is scored on the other (heldout), so no strategy is scored on what it was tuned on.
    tune, score = held[0::2], held[1::2]
    info = {"teachers": teachers, "student": str(student), "data": str(_write_jsonl(a / "train.jsonl", rows)),
            "heldout": str(_write_jsonl(a / "heldout.jsonl", score)),
            "heldout_tune": str(_write_jsonl(a / "heldout_tune.jsonl", tune)), "source": source,
            "seconds": round(time.time() - t0, 1)}
    done.write_text(json.dumps(info, indent=2))
    return info


STRATEGIES = {
    "fixed_equal": {"weighting": "fixed"},
    "fixed_real_only": {"weighting": "fixed", "weights": {"polarity": 1.0, "irony_stance": 1.0, "noise": 0.0,
                                                           "wrong": 0.0}},
    "route": {"weighting": "route"},
    "confidence": {"weighting": "confidence"},
    "attention": {"weighting": "attention"},
    "meta": {"weighting": "meta"},
}


def run_strategy(name: str, spec: dict, assets: dict, out: Path, s: dict, seed: int = 0) -> dict:
    from distill.config import RunConfig, from_dict
    from distill.multiteacher.stage import make_trainer

    weights = spec.get("weights", {})
    teachers = [{"name": n, "path": p, "weight": weights.get(n, 1.0)} for n, p in assets["teachers"].items()]
    d = {
        "run": {"out_dir": str(out / "runs" / name)},
        "model": {"student": assets["student"], "teacher": assets["teachers"]["polarity"]},
        "data": {"name": "sft_routed" if spec["weighting"] == "route" else "sft", "path": assets["data"],
                 "max_len": s["max_len"]},
        "train": {"steps": s["student_steps"], "micro_batch": s["micro_batch"], "grad_accum": 1, "lr": 3e-3,
                  "warmup_steps": 5, "seed": seed},
        "kd": {"kind": "forward_kl", "teacher_backend": "multiteacher"},
        "deepspeed": {"engine": "torch"},
        "checkpoint": {"every": 0, "overwrite": True},
        "log": {"progress_bar": False, "every": 10},
        "multiteacher": {"teachers": teachers, "weighting": spec["weighting"],
                         "meta": {"every": s["meta_every"], "heldout_path": assets["heldout_tune"]}},
    }
    cfg = from_dict(RunConfig, d)
    cfg.validate()
    t0 = time.time()
    tr = make_trainer(cfg)
    tr.train()
    secs = time.time() - t0
    names = list(assets["teachers"])
    hist = tr.history
    tail = hist[-max(1, len(hist) // 10):]
    final = {n: sum(r[f"w_{n}"] for r in tail) / len(tail) for n in names}
    traj = [{"step": r["step"], **{n: r[f"w_{n}"] for n in names}} for r in hist]
    meta_steps = [r["step_time_s"] for r in hist if r.get("meta_update")]
    other = [r["step_time_s"] for r in hist if not r.get("meta_update")]
    cost = None
    if meta_steps:
        cost = {"updates": len(meta_steps), "heldout_pass_s": sum(r["meta_s"] for r in hist if r.get("meta_update")) / len(meta_steps),
                "meta_step_s": sum(meta_steps) / len(meta_steps), "other_step_s": sum(other) / max(len(other), 1)}
    return {"run_dir": str(out / "runs" / name), "final_weights": final, "trajectory": traj, "train_s": round(secs, 1),
            "step_s": sorted(r["step_time_s"] for r in hist)[len(hist) // 2], "meta_cost": cost}


def teacher_stats(assets: dict, s: dict) -> dict:
    """Each teacher's response-token CE (how right) and mean entropy (how confident) on the scored
    held-out pairs."""
    from distill.multiteacher.study import heldout_loss, response_entropy

    held = [json.loads(x) for x in Path(assets["heldout"]).read_text().splitlines()]
    pairs = [(h["prompt"], h["response"]) for h in held]
    return {n: {"ce": round(heldout_loss(p, pairs, max_len=s["max_len"]), 4),
                "entropy": round(response_entropy(p, pairs, max_len=s["max_len"]), 4)}
            for n, p in assets["teachers"].items()}


def evaluate_run(res: dict, assets: dict, s: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.eval.sentibench import evaluate
    from distill.multiteacher.study import heldout_loss

    export = Path(res["run_dir"]) / "export"
    held = [json.loads(x) for x in Path(assets["heldout"]).read_text().splitlines()]
    res["heldout_loss"] = heldout_loss(export, [(h["prompt"], h["response"]) for h in held], max_len=s["max_len"])
    res["heldout_by_group"] = {g: heldout_loss(export, [(h["prompt"], h["response"]) for h in held if h["group"] == g],
                                               max_len=s["max_len"]) for g in GROUPS}
    tok = AutoTokenizer.from_pretrained(str(export))
    model = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    ev = evaluate(model, tok, tasks=EVAL_TASKS, shots=0, seeds=(42,), limit=s["eval_limit"], batch_size=16,
                  progress=False)
    res["sentibench"] = {"tasks": {t: v.get("score") for t, v in ev.get("tasks", {}).items()},
                         "overall": (ev.get("overall") or {}).get("score") if isinstance(ev.get("overall"), dict) else None,
                         "limit": s["eval_limit"], "shots": 0}


def write_report(out: Path, results: dict, names: list[str]) -> None:
    rows = ["| strategy | " + " | ".join(f"w {n}" for n in names) + " | held-out CE | CE polarity | CE irony/stance | "
            "SentiBench (sst2 / irony18 / pstance) | s/step |",
            "|---" * (len(names) + 6) + "|"]
    for name, r in results["strategies"].items():
        sb = r["sentibench"]["tasks"]
        scores = " / ".join("-" if sb.get(t) is None else f"{sb[t]:.1f}" for t in EVAL_TASKS.split(","))
        rows.append(f"| {name} | " + " | ".join(f"{r['final_weights'][n]:.2f}" for n in names)
                    + f" | {r['heldout_loss']:.3f} | {r['heldout_by_group']['polarity']:.3f} | "
                      f"{r['heldout_by_group']['irony_stance']:.3f} | {scores} | {r['step_s']:.2f} |")
    meta = results["strategies"].get("meta", {}).get("meta_cost")
    lines = ["# Multi-teacher study (CPU, tiny models)", "", f"settings: {json.dumps(results['settings'])}", ""] + rows
    if meta:
        lines += ["", f"meta update cost: held-out pass {meta['heldout_pass_s'] * 1e3:.0f} ms; a step with an update "
                      f"{meta['meta_step_s']:.3f} s vs {meta['other_step_s']:.3f} s without ({meta['updates']} updates)"]
    lines += ["", results["verdict"]]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(rows), flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learned = [n for n in results["strategies"] if n in ("confidence", "attention", "meta")]
    fig, axes = plt.subplots(1, len(learned), figsize=(4.5 * len(learned), 3.2), sharey=True)
    for ax, name in zip(axes if len(learned) > 1 else [axes], learned):
        traj = results["strategies"][name]["trajectory"]
        for n in names:
            ax.plot([t["step"] for t in traj], [t[n] for t in traj], label=n)
        ax.set_title(name)
        ax.set_xlabel("step")
    axes[0].set_ylabel("mean teacher weight")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "weights.png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="launchers/study_multiteacher.py")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small settings (under 10 minutes on 2 CPU cores)")
    size.add_argument("--smoke", action="store_true", help="tiny settings: checks the pipeline, numbers mean nothing")
    ap.add_argument("--out", default="runs/study_multiteacher", help="output folder")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args = ap.parse_args(argv)
    s = SETTINGS["quick" if args.quick else "smoke" if args.smoke else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    assets = build_assets(out, s)
    names = list(assets["teachers"])
    results = {"teachers": names, "settings": s, "strategies": {}, "teacher_stats": teacher_stats(assets, s)}
    print(f"[study] teachers on the scored held-out pairs: {results['teacher_stats']}", flush=True)
    for name, spec in STRATEGIES.items():
        res = run_strategy(name, spec, assets, out, s)
        evaluate_run(res, assets, s)
        results["strategies"][name] = res
        print(f"[study] {name}: weights {({n: round(w, 3) for n, w in res['final_weights'].items()})} held-out CE "
              f"{res['heldout_loss']:.4f} ({res['train_s']:.0f}s, {time.time() - t0:.0f}s total)", flush=True)
    st = results["strategies"]
    best_fixed = min(("fixed_equal", "fixed_real_only"), key=lambda n: st[n]["heldout_loss"])
    learned = {n: st[n]["heldout_loss"] for n in ("confidence", "attention", "meta")}
    beat = [n for n, v in learned.items() if v < st[best_fixed]["heldout_loss"]]
    results["verdict"] = (f"Best fixed average: {best_fixed} (held-out CE {st[best_fixed]['heldout_loss']:.4f}). "
                          f"Learned weights that beat it: {beat or 'none'} "
                          f"({', '.join(f'{n} {v:.4f}' for n, v in learned.items())}).")
    results["seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(out, results, names)
    print(f"[study] {results['verdict']}", flush=True)
    print(f"[study] done in {results['seconds']:.0f}s -> {out / 'results.json'}, {out / 'results.md'}, "
          f"{out / 'weights.png'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
