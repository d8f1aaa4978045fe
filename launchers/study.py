"""The distillation study: a teacher trained here, students at a quarter of its size, few gold labels.

    # 1 process (CPU; tiny models built here). --quick: the CI smoke run (under 10 minutes on 2 cores)
    python launchers/study.py --quick --out runs/study_quick
    # the study (2 CPU cores: 2,848 s with the teacher reused, about 78-83 min from scratch), results in docs/
    python launchers/study.py --seed 0 --out runs/study
    # the bootstrap, table and plot again from its saved files (trains nothing)
    python launchers/study.py --report --out runs/study

One process only: every arm is a small run on the plain torch engine, one after another (the same
trainer, KnowDist and ICLDist code run under DeepSpeed on GPUs; see docs/recipes.md).

Setting (issue 13). Per task a fixed sample of SentiBench train texts is the students' data; a
fixed 10% of them (by ``--seed``) keep their gold labels, the rest are unlabeled. The teacher is a
6-layer Llama (quick: 4) trained on train records (``teacher_per_task`` per classification task,
``teacher_fine_per_task`` per fine-grained one) in the evaluation's own prompt format
(:func:`distill.eval.protocol.build_prompts`: k = 0 for every record, k = 4 for some) plus the KnowDist
perspectives (:func:`distill.models.builtin.perspective_response`). Students: one init at
about a quarter of the teacher's parameters, the same total optimizer steps, data order seed and
learning rate in every arm:

- ``sft_gold``: SFT on the gold share (perspective analyses + evaluation-format answers).
- ``sft_text``: SFT on the gold share + the teacher's analyses of the unlabeled texts (no KL).
- ``knowdist``: the same corpus, CE + online token-level forward KL to the full-logit teacher.
- ``full``: KnowDist for ``kd_steps``, then ICLDist for ``icl_steps`` (in-process teacher) on
  few-shot prompts whose labels are the gold share plus the teacher's labels of the unlabeled texts
  (in the gold share's class proportions, :func:`align_labels`).
- ``full_onpolicy``: ``full`` whose KnowDist stage generates ``kd.on_policy.fraction`` = 0.5 of its
  sequences from the student (the other ``kd.on_policy`` settings at their defaults), same steps.
- ``full_topk16``: ``full`` with a top-16 teacher from the offline caches in both stages.
- ``icldist_only`` (ablation): ICLDist from the init for all the steps.

Every model is scored with the official protocol (:func:`distill.eval.sentibench.evaluate`, k = 4,
seeds 42/52/62 in the full study, 42 in ``--quick``), all 12 datasets, the first ``eval_limit`` test
sentences each. Writes ``DIR/results.json`` (``{"seed", "arms": {arm: {basic, multifaceted,
fine_grained, average, params, seconds, ...}}, "bootstrap": ..., ...}``), ``DIR/results.md`` and
``DIR/results.png``; ``bootstrap`` is a paired bootstrap over the test sentences (:func:`resample`).
``--arms a,b``: train and score only those arms (the teacher and the students' data are built or reused
all the same); the table, findings and bootstrap cover the arms run.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from importlib.util import find_spec
from pathlib import Path

if find_spec("distill") is None:  # a source checkout runs what is installed, never its own tree
    sys.exit("launchers/study.py: the distill package is not installed; run `pip install -e .` in the repository root")

ARMS = ("teacher", "sft_gold", "sft_text", "knowdist", "full", "full_onpolicy", "full_topk16", "icldist_only")
ON_POLICY_FRACTION = 0.5  # full_onpolicy: share of KnowDist's sequences the student generates itself (kd.on_policy)
GOLD_FRACTION = 0.10  # share of the students' train texts that keep their gold labels

# Model shapes (distill.models.tiny.TinySize fields). The students are about a quarter of the teacher.
SHAPES = {
    "quick": {"teacher": dict(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=176),
              "student": dict(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)},
    "full": {"teacher": dict(hidden=128, layers=6, heads=4, kv_heads=2, intermediate=352),
             "student": dict(hidden=80, layers=2, heads=4, kv_heads=2, intermediate=224)},
}

SETTINGS = {
    # vocab: tokenizer size. Teacher data per task: teacher_per_task train records of a classification
    # task (teacher_fine_per_task of a fine-grained one) as zero-shot evaluation-format pairs (the
    # protocol's instruction and sentence, gold answer), the first
    # teacher_fewshot_per_task of them also as 4-shot pairs and teacher_persp_per_task as KnowDist
    # perspective pairs; pair_chars: characters kept of each text in evaluation-format training pairs.
    # teacher_steps / teacher_micro_batch / teacher_max_len / teacher_lr: its training (packed rows).
    # student_per_task: the students' train texts per task (GOLD_FRACTION of them labelled, at least 5);
    # kd_steps / icl_steps: optimizer steps (every student arm trains kd_steps + icl_steps);
    # micro_batch: sequences per step; max_len: training tokens per sequence (prompts cut from the left);
    # icl_max_len: the same for ICLDist's few-shot prompts (most are 130-300 tokens in the full study);
    # icl_per_task: ICLDist prompts per task; eval_limit: SentiBench test sentences per task;
    # eval_seeds: demonstration seeds; harvest_tokens: new tokens per teacher analysis
    "quick": dict(vocab=1024, teacher_per_task=40, teacher_fine_per_task=20, teacher_fewshot_per_task=10,
                  teacher_persp_per_task=20, pair_chars=400, teacher_steps=30, teacher_micro_batch=16,
                  teacher_max_len=128, teacher_lr=1e-3, student_per_task=30, kd_steps=15, icl_steps=10,
                  micro_batch=16, max_len=80, icl_max_len=80, icl_per_task=8, lr=1e-3, eval_limit=4, eval_seeds=(42,),
                  harvest_tokens=12),
    "full": dict(vocab=1536, teacher_per_task=1500, teacher_fine_per_task=200, teacher_fewshot_per_task=100,
                 teacher_persp_per_task=150, pair_chars=400, teacher_steps=2400, teacher_micro_batch=48,
                 teacher_max_len=256, teacher_lr=1e-3, student_per_task=300, kd_steps=600, icl_steps=300,
                 micro_batch=32, max_len=128, icl_max_len=256, icl_per_task=128, lr=1e-3, eval_limit=96, eval_seeds=(42, 52, 62),
                 harvest_tokens=24),
}


# The settings that make the teacher and its tokenizer: assets/DONE.json records them and a rerun into the
# same --out must match them.
TEACHER_KEYS = ("vocab", "teacher_per_task", "teacher_fine_per_task", "teacher_fewshot_per_task",
                "teacher_persp_per_task", "pair_chars", "teacher_steps", "teacher_micro_batch", "teacher_max_len",
                "teacher_lr")


def _log(msg: str) -> None:
    print(f"[study] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def _params(folder) -> int:
    from safetensors import safe_open

    n = 0
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        for k in f.keys():
            n += math.prod(f.get_slice(k).get_shape())
    return n


# ------------------------------------------------------------------------------------------- data


def _train_split(task: str):
    """(records, raw rows) of a task's train split; ``record.index`` is the row's position."""
    from distill.data import sentibench as sb

    return sb.load_task(task, "train"), sb.read_raw(sb.task_file(task, "train"))


def _eval_pairs(task: str, records, pool, seed: int, shots: int = 4) -> list[dict]:
    """Evaluation-format (prompt, gold answer) pairs: the protocol's prompts with ``shots`` demonstrations
    from ``pool`` (0: the instruction and the sentence only)."""
    from distill.eval.protocol import answer_text, build_prompts

    shots = min(shots, len(pool) - 1)
    prompts, _ = build_prompts(task, records, pool, shots, seed)
    return [{"prompt": p, "response": " " + answer_text(task, r), "task": task, "kind": "eval"}
            for p, r in zip(prompts, records)]


def _label_pairs(task: str, records, pool, seed: int, chars: int, fewshot: int) -> list[dict]:
    """Every record (texts cut to ``chars``) as a zero-shot evaluation-format pair, and the first
    ``fewshot`` of them also as 4-shot pairs with demonstrations from ``pool``."""
    records = [_cut(r, chars) for r in records]
    pool = [_cut(r, chars) for r in pool]
    return _eval_pairs(task, records, pool, seed, shots=0) + _eval_pairs(task, records[:fewshot], pool, seed)


def _cut(record, chars: int):
    import dataclasses

    return dataclasses.replace(record, text=record.text[:chars])


def _perspective_pair(task: str, raw: dict) -> dict | None:
    from distill.models.builtin import format_prompt, perspective_response

    got = perspective_response(task, raw)
    text = raw.get("sentence") or raw.get("text")
    if got is None or not text:
        return None
    return {"prompt": format_prompt(text, got[0]), "response": got[1], "task": task, "kind": "perspective",
            "perspective": got[0]}


def align_labels(scores: list[list[float]], gold_counts: list[int], iters: int = 50) -> list[int]:
    """The teacher's labels for unlabeled texts, in the gold share's class proportions.

    ``p`` = softmax of each text's label scores. First distribution alignment (as in ReMixMatch,
    Berthelot et al. 2020, over the whole unlabeled set at once): with ``pi`` the gold share's class
    frequencies (add-one smoothed), ``q <- q * pi / mean(q)``, renormalised per text, ``iters`` times
    (iterative proportional fitting: the mean of ``q`` converges to ``pi``). Matching the mean is not
    matching the argmax counts (a teacher that gives its majority class 0.7 for every text keeps
    answering it), so the labels are then assigned to quotas: class c gets ``round(pi_c * n)`` texts
    (largest remainders), the (text, class) pairs taken in decreasing ``q``, each text once: a class
    gets the texts of its highest aligned probability that no class took first, so a teacher that
    says its majority class for most texts no longer gives it the texts it is least sure of."""
    import torch

    p = torch.tensor(scores, dtype=torch.float64).softmax(-1)
    n, k = p.shape
    pi = torch.tensor(gold_counts, dtype=torch.float64) + 1.0
    pi = pi / pi.sum()
    q = p
    for _ in range(iters):
        q = q * (pi / q.mean(0))
        q = q / q.sum(-1, keepdim=True)
    quota = (pi * n).floor().long()
    for c in (pi * n - quota).argsort(descending=True)[: n - int(quota.sum())].tolist():
        quota[c] += 1
    label = [-1] * n
    for flat in q.flatten().argsort(descending=True, stable=True).tolist():
        i, c = divmod(flat, k)
        if label[i] < 0 and quota[c] > 0:
            label[i] = c
            quota[c] -= 1
    return label


def split_students(s: dict, seed: int) -> dict:
    """{task: {"gold": [index...], "unlabeled": [index...]}}: the students' texts, fixed by ``seed``."""
    from distill.data.sentibench import TASKS

    out = {}
    for task in TASKS:
        recs, _ = _train_split(task)
        idx = [r.index for r in recs]
        random.Random(f"study-{seed}-{task}").shuffle(idx)
        idx = idx[: s["student_per_task"]]
        n_gold = max(5, round(GOLD_FRACTION * len(idx)))
        out[task] = {"gold": sorted(idx[:n_gold]), "unlabeled": sorted(idx[n_gold:])}
    return out


# -------------------------------------------------------------------------------------- training


def _train(name: str, out: Path, *, student: str, teacher: str, data: str, steps: int, s: dict, seed: int,
           kind: str = "none", backend: str = "colocated", topk: int = 0, lr: float | None = None,
           micro_batch: int | None = None, max_len: int | None = None, packing: bool = False,
           kd_extra: dict | None = None) -> dict:
    """One core-trainer run (plain torch engine); returns {export, seconds, loss_first, loss_last} and, where
    its steps record ``gen_*`` numbers (on-policy generation), their sums under ``gen``."""
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    run_dir = out / "runs" / name
    d = {
        "run": {"out_dir": str(run_dir)},
        "model": {"student": student, "teacher": teacher if kind != "none" else ""},
        "data": {"name": "sft", "path": data, "max_len": max_len or s["max_len"], "packing": packing},
        "train": {"steps": steps, "micro_batch": micro_batch or s["micro_batch"], "grad_accum": 1, "lr": lr or s["lr"],
                  "warmup_steps": max(1, steps // 20), "seed": seed},
        "kd": {"kind": kind, "teacher_backend": backend, "topk": topk,
               "cache_dir": str(run_dir / "teacher_topk") if backend == "cache" else "", **(kd_extra or {})},
        "deepspeed": {"engine": "torch"},
        "checkpoint": {"every": 0, "overwrite": True},
        "log": {"progress_bar": False, "every": max(1, steps // 5)},
    }
    cfg = from_dict(RunConfig, d)
    cfg.validate()
    t0 = time.time()
    if backend == "cache":
        from distill.teacher.topk_cache import build_topk_cache

        build_topk_cache(cfg)
    tr = build_trainer(cfg)
    result = tr.train()
    hist = tr.history
    res = {"export": str(result.get("export", run_dir / "export")), "seconds": round(time.time() - t0, 1),
           "loss_first": hist[0]["loss"] if hist else None, "loss_last": hist[-1]["loss"] if hist else None}
    gen = gen_sums(hist)
    return {**res, "gen": gen} if gen else res


def gen_sums(records) -> dict:
    """{key: sum over ``records``} of the numeric ``gen_*`` fields (on-policy generation: ``gen_time_s``,
    ``gen_tokens``, ``gen_seqs``; means are not summed); {} when no record has one. The trainer's
    history has every step's record (metrics.jsonl only every ``log.every``-th), so it is what is summed."""
    sums: dict[str, float] = {}
    for rec in records:
        for k, v in rec.items():
            if k.startswith("gen_") and "mean" not in k and isinstance(v, (int, float)) and not isinstance(v, bool):
                sums[k] = round(sums.get(k, 0.0) + v, 3)
    return sums
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        for k, v in rec.items() if isinstance(rec, dict) else ():
            if k.startswith("gen_") and isinstance(v, (int, float)) and not isinstance(v, bool):
                sums[k] = round(sums.get(k, 0.0) + v, 3)
    return sums


def _icldist(name: str, out: Path, *, student: str, teacher: str, data_dir: Path, steps: int, s: dict, seed: int,
             k: int, cached: bool) -> dict:
    """ICLDist (launchers/icldist.py's code) with the in-process teacher or its offline top-k cache."""
    from distill.icldist.stage import run_from_argv

    run_dir = out / "runs" / name
    argv = [
        f"--run.out_dir={run_dir}", f"--model.student={student}", f"--model.teacher={teacher}",
        "--teacher.ray_address=local", f"--teacher.k={k}", f"--teacher.source={'cache' if cached else 'online'}",
        f"--prompts.data_dir={data_dir}", "--prompts.held_out=[]", f"--prompts.per_task={s['icl_per_task']}",
        f"--prompts.seed={seed}", "--prompts.max_shots=4", "--prompts.max_prompt_chars=1200",
        f"--icl.max_len={s['icl_max_len']}", f"--train.steps={steps}", f"--train.micro_batch={s['micro_batch']}",
        f"--train.lr={s['lr']}", f"--train.warmup_steps={max(1, steps // 20)}", f"--train.seed={seed}",
        "--deepspeed.engine=torch", "--report.enabled=false", "--log.progress_bar=false",
        f"--log.every={max(1, steps // 5)}", "--checkpoint.overwrite=true",
    ]
    t0 = time.time()
    run_from_argv(argv)
    return {"export": str(run_dir / "export"), "seconds": round(time.time() - t0, 1)}


# ---------------------------------------------------------------------------------------- assets


def _reuse(done: Path, made_with: dict) -> dict:
    """The finished stage recorded in ``done``, if it was made with these settings (else a UserError: the
    files there are kept, the user picks another --out)."""
    from distill.errors import UserError

    try:
        info = json.loads(done.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{done}: unreadable ({e}); use another --out") from None
    had = info.get("made_with") if isinstance(info, dict) else None
    if had != made_with:
        diff = sorted(k for k in made_with if not isinstance(had, dict) or had.get(k) != made_with[k])
        raise UserError(f"{done}: field made_with differs from this run's settings in {diff}; use another --out "
                        f"(what is there is kept)")
    return info


def _check_verbalizers(tok) -> None:
    from distill.eval.protocol import LABEL_WORDS
    from distill.eval.runner import verbalizer_ids

    for task in LABEL_WORDS:
        verbalizer_ids(tok, task)  # raises, naming the colliding words


def teacher_made_with(s: dict, mode: str, seed: int) -> dict:
    """What assets/DONE.json records and a rerun must match: the settings that make the teacher, and
    whether its SentiBench train splits were the full data or the packaged sample (a launcher run from
    a copy outside a checkout reads the sample when ../shared/sentibench is not beside it)."""
    from distill.data.sentibench import data_provenance

    return {"mode": mode, "seed": seed, "shapes": SHAPES[mode], "sentibench": data_provenance()["source"],
            **{k: v for k, v in s.items() if k in TEACHER_KEYS}}


def build_teacher(out: Path, s: dict, mode: str, seed: int) -> dict:
    """Tokenizer, the trained teacher and the students' init (reused when ``out/assets/DONE.json`` exists)."""
    from distill.data.sentibench import TASKS
    from distill.eval.protocol import LABEL_WORDS
    from distill.models.tiny import TinySize, build_tiny_causal_lm, train_tokenizer

    a = out / "assets"
    done = a / "DONE.json"
    made_with = teacher_made_with(s, mode, seed)
    if done.is_file():
        return _reuse(done, made_with)
    a.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows, texts = [], []
    for task in TASKS:
        recs, raw = _train_split(task)
        rng = random.Random(f"teacher-{seed}-{task}")
        n = s["teacher_per_task"] if task in LABEL_WORDS else s["teacher_fine_per_task"]
        pick = sorted(rng.sample(range(len(recs)), min(n, len(recs))))
        chosen = [recs[i] for i in pick]
        rows += _label_pairs(task, chosen, recs, seed, s["pair_chars"], s["teacher_fewshot_per_task"])
        rows += [p for p in (_perspective_pair(task, raw[r.index]) for r in chosen[: s["teacher_persp_per_task"]]) if p]
        texts += [r.text for r in recs]
    random.Random(seed).shuffle(rows)
    # The teacher's training text itself (the evaluation's instructions, label words) is in the corpus so
    # that every label word keeps a distinct first sub-token even in a small vocabulary.
    from distill.models.tiny import LABEL_WORDS as WORDS

    tok = train_tokenizer(texts + [r["prompt"] + r["response"] for r in rows] + [" " + " ".join(WORDS)] * 1000,
                          vocab_size=s["vocab"])
    _check_verbalizers(tok)
    data = _write_jsonl(a / "teacher_train.jsonl", rows)
    init = {}
    for role, sd in SHAPES[mode].items():
        folder = a / f"{role}_init"
        build_tiny_causal_lm(len(tok), TinySize(**sd), seed=seed + (0 if role == "teacher" else 1)).save_pretrained(folder)
        tok.save_pretrained(folder)
        init[role] = str(folder)
    _log(f"teacher data: {len(rows)} pairs ({sum(r['kind'] == 'eval' for r in rows)} evaluation-format); "
         f"tokenizer {len(tok)}; params teacher {_params(init['teacher'])}, student {_params(init['student'])}")
    res = _train("teacher", out, student=init["teacher"], teacher="", data=str(data), steps=s["teacher_steps"],
                 s=s, seed=seed, lr=s["teacher_lr"], micro_batch=s["teacher_micro_batch"],
                 max_len=s["teacher_max_len"], packing=True)
    info = {"made_with": made_with, "teacher": res["export"], "student_init": init["student"],
            "teacher_train_s": res["seconds"],
            "teacher_loss": [res["loss_first"], res["loss_last"]], "seconds": round(time.time() - t0, 1)}
    done.write_text(json.dumps(info, indent=2))
    _log(f"teacher trained in {res['seconds']:.0f}s (loss {res['loss_first']:.2f} -> {res['loss_last']:.2f})")
    return info


def _generate(model, tok, prompts: list[str], max_new_tokens: int, batch: int = 64) -> list[str]:
    import torch

    outs = []
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            g = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        outs += tok.batch_decode(g[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outs


def build_student_data(out: Path, s: dict, assets: dict, split: dict, seed: int) -> dict:
    """The students' corpora and ICLDist's SentiBench folder (gold share + the teacher's labels)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.data import sentibench as sb
    from distill.eval.protocol import LABEL_WORDS, build_prompts
    from distill.eval.runner import Runner, best_labels, verbalizer_ids

    a = out / "assets"
    done = a / "DATA_DONE.json"
    # the split follows from the teacher's seed, student_per_task and GOLD_FRACTION (split_students)
    made_with = {"teacher": assets["made_with"], "student_per_task": s["student_per_task"],
                 "gold_fraction": GOLD_FRACTION, "harvest_tokens": s["harvest_tokens"], "pseudo_labels": "aligned"}
    if done.is_file():
        return _reuse(done, made_with)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(assets["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"]).eval()
    gold_rows, harvest_jobs = [], []
    icl_root = a / "icl_sentibench"
    n_pseudo = agree = 0
    counts: dict[str, dict] = {}  # per classification task: label counts of gold share, teacher argmax, aligned
    for task in sb.TASKS:
        recs, raw = _train_split(task)
        gold = [recs[i] for i in split[task]["gold"]]
        unl = [recs[i] for i in split[task]["unlabeled"]]
        gold_rows += _label_pairs(task, gold, gold, seed, s["pair_chars"], len(gold))
        gold_rows += [p for p in (_perspective_pair(task, raw[r.index]) for r in gold) if p]
        for r in unl:
            p = _perspective_pair(task, raw[r.index])  # its prompt only: the gold response is not used
            if p:
                harvest_jobs.append(p)
        # ICLDist's train split: the gold rows, plus (classification) the unlabeled texts labelled by
        # the teacher through the evaluation's prompt (demonstrations from the gold share).
        rows_out = [raw[r.index] for r in gold]
        if task in LABEL_WORDS:
            # Texts cut for the labelling prompts only (IMDB reviews make 4-shot prompts of ~5k tokens).
            prompts, _ = build_prompts(task, [_cut(r, 600) for r in unl], [_cut(r, 300) for r in gold],
                                       min(4, len(gold)), seed)
            runner = Runner(teacher, tok, batch_size=32)
            scores = runner.label_scores(runner.tokenize(prompts), verbalizer_ids(tok, task))
            words = [w.strip() for w in LABEL_WORDS[task]]
            raw_label = {str(x["label"]).lower(): x["label"] for x in raw}
            gold_counts = [sum(r.label_word == w for r in gold) for w in words]
            pred = align_labels(scores, gold_counts)
            argmax = best_labels(scores)
            counts[task] = {"gold": dict(zip(words, gold_counts)),
                            "teacher": {w: argmax.count(i) for i, w in enumerate(words)},
                            "aligned": {w: pred.count(i) for i, w in enumerate(words)}}
            for r, k in zip(unl, pred):
                row = dict(raw[r.index])
                row["label"] = raw_label.get(words[k], words[k])
                if "label_score" in row:
                    row["label_score"] = 0.0  # the gold score is not the students'; the prompts do not show it
                agree += row["label"] == raw[r.index]["label"]
                n_pseudo += 1
                rows_out.append(row)
        d = icl_root / task
        d.mkdir(parents=True, exist_ok=True)
        (d / "train.json").write_text(json.dumps(rows_out, ensure_ascii=False), encoding="utf-8")
        test = d / "test.json"
        if not test.exists():
            test.symlink_to(sb.task_file(task, "test").resolve())
    _log(f"teacher labels for {n_pseudo} unlabeled classification texts ({100 * agree / max(n_pseudo, 1):.1f}% agree "
         f"with gold, not shown to students)")
    t1 = time.time()
    gens = _generate(teacher, tok, [j["prompt"] for j in harvest_jobs], s["harvest_tokens"])
    teacher_rows = []
    for j, g in zip(harvest_jobs, gens):
        g = " " + " ".join(g.split())
        if len(g) > 1:
            teacher_rows.append({**j, "response": g, "kind": "teacher_analysis"})
    _log(f"teacher analyses: {len(teacher_rows)} of {len(harvest_jobs)} unlabeled texts in {time.time() - t1:.0f}s; "
         f"e.g. {teacher_rows[0]['prompt'][-60:]!r} -> {teacher_rows[0]['response']!r}" if teacher_rows else "")
    rng = random.Random(seed)
    rng.shuffle(gold_rows)
    mixed = gold_rows + teacher_rows
    rng.shuffle(mixed)
    info = {"made_with": made_with, "gold": str(_write_jsonl(a / "students_gold.jsonl", gold_rows)),
            "teacher_text": str(_write_jsonl(a / "students_teacher_text.jsonl", mixed)),
            "icl_data_dir": str(icl_root), "n_gold_rows": len(gold_rows), "n_teacher_rows": len(teacher_rows),
            "pseudo_label_agreement": agree / max(n_pseudo, 1), "pseudo_label_counts": counts,
            "seconds": round(time.time() - t0, 1)}
    del teacher
    done.write_text(json.dumps(info, indent=2))
    return info


# -------------------------------------------------------------------------------------- evaluation


def evaluate_model(folder: str, s: dict, out: Path, name: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.eval.sentibench import evaluate

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    t0 = time.time()
    ev = evaluate(model, tok, tasks="all", shots=4, seeds=s["eval_seeds"], limit=s["eval_limit"], batch_size=16,
                  progress=False, model_name=name, predictions_dir=out / "eval" / name / "predictions")
    (out / "eval" / name / "results.json").write_text(json.dumps(ev, indent=1))
    cats = ev["categories"]
    return {"basic": cats["basic"]["score"], "multifaceted": cats["multifaceted"]["score"],
            "fine_grained": cats["fine-grained"]["score"], "average": ev["overall"]["score"],
            "tasks": {t: v["score"] for t, v in ev["tasks"].items()}, "eval_seconds": round(time.time() - t0, 1)}


def chance(s: dict) -> dict:
    """Chance level per category: a uniform random guess's expected macro-F1 (x100), about 100 / n classes."""
    from distill.eval.protocol import LABEL_WORDS

    from distill.data.sentibench import CATEGORIES

    out = {}
    for cat in ("basic", "multifaceted"):
        out[cat] = sum(100 / len(LABEL_WORDS[t]) for t in CATEGORIES[cat]) / len(CATEGORIES[cat])
    return out


# ------------------------------------------------------------------------------------------ report

PAIRS = (("full", "sft_gold"), ("full", "sft_text"), ("full", "knowdist"), ("full_topk16", "full"),
         ("full_onpolicy", "full"), ("knowdist", "sft_text"), ("sft_text", "sft_gold"))


def resample(out: Path, s: dict, arms, n_boot: int = 1000, seed: int = 0) -> dict:
    """Paired bootstrap over the test sentences of the basic+multifaceted mean, from the saved predictions
    (``DIR/eval/<arm>/predictions``): each resample draws every task's sentences with replacement, the same
    draw for every arm and demonstration seed, and rescores them with the official scorer. Returns each
    arm's standard error and, per pair in ``PAIRS``, the difference's 95% percentile interval."""
    import numpy as np

    from distill.data.sentibench import CATEGORIES, load_task
    from distill.eval.scoring import score_task
    from distill.eval.sentibench import predictions_file, read_predictions

    t0 = time.time()
    rng = np.random.default_rng(seed)
    cats = ("basic", "multifaceted")
    boot = {a: np.zeros(n_boot) for a in arms}
    for cat in cats:
        for task in CATEGORIES[cat]:
            recs = load_task(task, "test")[: s["eval_limit"]]
            preds = {a: [read_predictions(predictions_file(out / "eval" / a / "predictions", task, sd), len(recs))
                         for sd in s["eval_seeds"]] for a in arms}
            weight = 100 / len(s["eval_seeds"]) / len(CATEGORIES[cat]) / len(cats)
            for b, idx in enumerate(rng.integers(0, len(recs), size=(n_boot, len(recs)))):
                rs = [recs[i] for i in idx]
                for a in arms:
                    boot[a][b] += weight * sum(score_task(task, rs, [p[i] for i in idx])["f1"] for p in preds[a])
    res = {"n_boot": n_boot, "seed": seed, "se": {a: round(float(boot[a].std(ddof=1)), 2) for a in arms}, "pairs": {}}
    for x, y in PAIRS:
        if x in boot and y in boot:
            d = boot[x] - boot[y]
            lo, hi = np.percentile(d, [2.5, 97.5])
            res["pairs"][f"{x} - {y}"] = {"lo": round(float(lo), 2), "hi": round(float(hi), 2),
                                          "p_le_0": round(float((d <= 0).mean()), 3)}
    res["seconds"] = round(time.time() - t0, 1)
    return res



def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(results: dict) -> str:
    rows = ["| arm | basic | multifaceted | fine-grained | average | basic+multi mean | params | seconds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["arms"].items():
        bm = (r["basic"] + r["multifaceted"]) / 2
        rows.append(f"| {name} | {_fmt(r['basic'])} | {_fmt(r['multifaceted'])} | {_fmt(r['fine_grained'])} | "
                    f"{_fmt(r['average'])} | {bm:.2f} | {r['params']:,} | {r['seconds']:.0f} |")
    return "\n".join(rows)


def findings(results: dict) -> list[str]:
    """The study's claims as lines; a claim whose arms were not run (``--arms``) is left out."""
    arms = results["arms"]

    def bm(n):
        return (arms[n]["basic"] + arms[n]["multifaceted"]) / 2

    def have(*names):
        return all(n in arms for n in names)

    ch = results["chance"]
    lines = []
    if have("teacher"):
        t = arms["teacher"]
        lines.append(f"- teacher vs chance (uniform-random macro-F1): basic {t['basic']:.2f} vs {ch['basic']:.2f}, "
                     f"multifaceted {t['multifaceted']:.2f} vs {ch['multifaceted']:.2f}.")
    if have("full", "sft_gold", "sft_text"):
        lines.append(f"- full ({bm('full'):.2f}) vs sft_gold ({bm('sft_gold'):.2f}) and sft_text ({bm('sft_text'):.2f}) "
                     f"on the mean of basic and multifaceted: "
                     f"{'beats both' if bm('full') > max(bm('sft_gold'), bm('sft_text')) else 'does NOT beat both'}.")
    if have("full", "full_topk16"):
        lines.append(f"- full_topk16 - full = {bm('full_topk16') - bm('full'):+.2f} (basic+multi mean; "
                     f"{'within' if abs(bm('full_topk16') - bm('full')) <= 1 else 'NOT within'} 1 point).")
    if have("full", "full_onpolicy"):
        on, base = arms["full_onpolicy"], arms["full"]
        gen = on.get("gen") or {}
        secs = [v for k, v in gen.items() if k.endswith(("_s", "_seconds", "_time"))]
        share = (f"; generation {sum(secs):.0f} s of its KnowDist stage's {on['stages']['knowdist']:.0f} s"
                 if secs and on.get("stages") else "")
        lines.append(f"- on-policy KnowDist (fraction {ON_POLICY_FRACTION}): full_onpolicy - full = "
                     f"{bm('full_onpolicy') - bm('full'):+.2f} (basic+multi mean), at {on['seconds']:.0f} s of "
                     f"training vs {base['seconds']:.0f} s{share}.")
    parts = []
    if have("sft_text", "knowdist"):
        parts.append(f"sft_text -> knowdist {bm('knowdist') - bm('sft_text'):+.2f}")
    if have("icldist_only", "full"):
        parts.append(f"icldist_only -> full {bm('full') - bm('icldist_only'):+.2f}")
    if parts:
        lines.append(f"- ablation, what KnowDist adds: {'; '.join(parts)}.")
    if have("knowdist", "full"):
        lines.append(f"- ablation, what ICLDist adds: knowdist -> full {bm('full') - bm('knowdist'):+.2f} "
                     f"(same total steps).")
    boot = results.get("bootstrap")
    if boot:
        se = ", ".join(f"{a} {v:.2f}" for a, v in boot["se"].items())
        lines.append(f"- paired bootstrap over test sentences ({boot['n_boot']} resamples), standard error of the "
                     f"basic+multi mean: {se}.")
        for pair, v in boot["pairs"].items():
            x, y = pair.split(" - ")
            lines.append(f"- {pair} = {bm(x) - bm(y):+.2f}, 95% interval [{v['lo']:+.2f}, {v['hi']:+.2f}] "
                         f"(share of resamples <= 0: {v['p_le_0']:.3f}).")
    return lines


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["arms"])
    cols = ("basic", "multifaceted", "fine_grained", "average")
    fig, ax = plt.subplots(figsize=(10, 4))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar([c + i * w for c in range(len(cols))], [results["arms"][n][c] for c in cols], w, label=n)
    for cat, x in (("basic", 0), ("multifaceted", 1)):
        ax.hlines(results["chance"][cat], x - w / 2, x + 0.8 - w / 2, colors="k", linestyles="dotted")
    ax.set_xticks([c + 0.4 - w / 2 for c in range(len(cols))], cols)
    ax.set_ylabel("SentiBench score (x100)")
    ax.set_title(f"{results['mode']} study, seed {results['seed']} (dotted: chance)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, results: dict) -> None:
    lines = [f"# Distillation study ({results['mode']}, seed {results['seed']})", "",
             f"command: `{results['command']}`", "", f"settings: `{json.dumps(results['settings'])}`", "",
             table(results), "", *findings(results), ""]
    (out / "results.md").write_text("\n".join(lines))
    plot(results, out / "results.png")


# -------------------------------------------------------------------------------------------- main


def export_path(export, out: Path) -> str:
    """An arm's export as results.json records it: relative to ``out`` when inside it, else as given (a
    teacher reused through an assets/DONE.json that points into another run's folder)."""
    p = Path(export)
    try:
        return str(p.relative_to(out))
    except ValueError:
        return str(p)


def parse_arms(text: str) -> tuple[str, ...]:
    """``--arms a,b``: the named arms in the study's order (a UserError names an unknown or missing one)."""
    from distill.errors import UserError

    asked = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in asked if a not in ARMS]
    if unknown or not asked:
        raise UserError(f"--arms: {'unknown arm(s) ' + ', '.join(unknown) if unknown else 'no arm named'}; "
                        f"choose from {','.join(ARMS)}")
    return tuple(a for a in ARMS if a in asked)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="launchers/study.py")
    ap.add_argument("--quick", action="store_true", help="small settings: every arm end to end in under 10 minutes")
    ap.add_argument("--seed", type=int, default=0, help="gold share, inits, data order")
    ap.add_argument("--out", default=None, help="output folder (default runs/study or runs/study_quick)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--report", action="store_true",
                    help="train nothing: rebuild the bootstrap, table and plot from DIR/results.json and "
                         "DIR/eval/*/predictions")
    ap.add_argument("--arms", default=",".join(ARMS),
                    help=f"comma-separated arms to train and score (default: all: {','.join(ARMS)})")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args = ap.parse_args(argv)
    arms = parse_arms(args.arms)
    import torch

    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    s = SETTINGS[mode]
    out = Path(args.out or ("runs/study_quick" if args.quick else "runs/study"))
    if args.report:
        return report_only(out)
    out.mkdir(parents=True, exist_ok=True)
    seed = args.seed
    t0 = time.time()
    cmd = "python launchers/study.py" + (" --quick" if args.quick else "") + f" --seed {seed} --out {out}"
    if arms != ARMS:
        cmd += f" --arms {','.join(arms)}"

    from distill.data.sentibench import data_provenance

    prov = data_provenance()
    _log(f"SentiBench: {prov['source']} data at {prov['path']}"
         + (" (the packaged sample: these numbers are not the study's)" if prov["source"] == "sample" else ""))
    assets = build_teacher(out, s, mode, seed)
    split = split_students(s, seed)
    data = build_student_data(out, s, assets, split, seed)
    teacher, init = assets["teacher"], assets["student_init"]
    total = s["kd_steps"] + s["icl_steps"]
    runs = {"teacher": {"export": teacher, "seconds": assets["teacher_train_s"]}}
    common = dict(student=init, teacher=teacher, s=s, seed=seed)
    for name, d, kind in (("sft_gold", "gold", "none"), ("sft_text", "teacher_text", "none"),
                          ("knowdist", "teacher_text", "forward_kl")):
        if name in arms:
            runs[name] = _train(name, out, data=data[d], steps=total, kind=kind, **common)
    icl_dir = Path(data["icl_data_dir"])
    for name, cached, k, extra in (("full", False, 64, None),
                                   ("full_onpolicy", False, 64, {"on_policy": {"fraction": ON_POLICY_FRACTION}}),
                                   ("full_topk16", True, 16, None)):
        if name not in arms:
            continue
        st1 = _train(f"{name}_stage1_knowdist", out, data=data["teacher_text"], steps=s["kd_steps"], kind="forward_kl",
                     backend="cache" if cached else "colocated", topk=k if cached else 0, kd_extra=extra, **common)
        st2 = _icldist(f"{name}_stage2_icldist", out, student=st1["export"], teacher=teacher, data_dir=icl_dir,
                       steps=s["icl_steps"], s=s, seed=seed, k=k, cached=cached)
        runs[name] = {"export": st2["export"], "seconds": st1["seconds"] + st2["seconds"],
                      "stages": {"knowdist": st1["seconds"], "icldist": st2["seconds"]},
                      **({"gen": st1["gen"]} if "gen" in st1 else {})}
        gen = f" (generation logged: {st1['gen']})" if "gen" in st1 else ""
        _log(f"{name}: KnowDist {st1['seconds']:.0f}s + ICLDist {st2['seconds']:.0f}s{gen}")
    if "icldist_only" in arms:
        runs["icldist_only"] = _icldist("icldist_only", out, student=init, teacher=teacher, data_dir=icl_dir,
                                        steps=total, s=s, seed=seed, k=64, cached=False)
    results = {"seed": seed, "mode": mode, "command": cmd, "settings": {**s, "shapes": SHAPES[mode]},
               "gold_fraction": GOLD_FRACTION, "data": {k: v for k, v in data.items() if k.startswith(("n_", "pseudo"))},
               "chance": chance(s), "sentibench": prov, "arms": {}}
    for name in arms:
        r = runs[name]
        ev = evaluate_model(r["export"], s, out, name)
        results["arms"][name] = {**ev, "params": _params(r["export"]), "seconds": r["seconds"],
                                 **({"stages": r["stages"]} if "stages" in r else {}),
                                 **({"gen": r["gen"]} if "gen" in r else {}),
                                 "export": export_path(r["export"], out)}
        _log(f"{name}: basic {ev['basic']:.2f} multi {ev['multifaceted']:.2f} fine {ev['fine_grained']:.2f} "
             f"avg {ev['average']:.2f} (train {r['seconds']:.0f}s, eval {ev['eval_seconds']:.0f}s)")
        (out / "results.partial.json").write_text(json.dumps(results, indent=2))  # what a cut-short run has
    results["bootstrap"] = resample(out, s, arms)
    results["seconds"] = round(time.time() - t0, 1)
    return _finish(out, results)


def _finish(out: Path, results: dict) -> int:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(out, results)
    print(table(results), flush=True)
    print("\n".join(findings(results)), flush=True)
    _log(f"done in {results['seconds']:.0f}s -> {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return 0


def report_only(out: Path) -> int:
    """``--report``: the bootstrap, table and plot again from a finished run's files (its timings kept)."""
    from distill.errors import UserError

    path = out / "results.json"
    try:
        results = json.loads(path.read_text())
        ran = {k: results["settings"][k] for k in ("eval_limit", "eval_seeds")}  # the run's own
        arms = list(results["arms"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a finished study's results ({type(e).__name__}: {e}); run the study first") from None
    results["bootstrap"] = resample(out, ran, arms)
    return _finish(out, results)


if __name__ == "__main__":
    from distill.errors import run_cli

    sys.exit(run_cli(main, "study.py"))
