"""The ICLDist stage end to end: prompts -> teacher answers -> (cache) -> core training loop -> report.

``run_from_argv`` is what ``launchers/icldist.py`` calls. Training goes through the core loop with the
stage's parts (:class:`ICLDistStage`): the prompt set's student sequences as the dataset, the
teacher's top-k per batch (online with prefetch or from the cache, returned as
:class:`~distill.icldist.loss.BatchTargets`) as the teacher, and
:class:`~distill.icldist.loss.ICLDistLoss` (label-level KL + token-level top-k KD + gold CE) as the
objective, which keeps the loop's global normaliser.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distill.icldist.config import STAGES, ICLDistConfig
from distill.teacher.base import TeacherBackend
from distill.train.build import StageParts
from distill.train.callbacks import Callback

# ---------------------------------------------------------------------------------------------------
# Run state: held by the run's ICLDistStage


@dataclass
class ICLDistRun:
    cfg: ICLDistConfig
    out_dir: Path
    student_path: str = ""
    teacher_path: str = ""
    prompts: list = field(default_factory=list)
    client: object = None  # teacher client (online), None when reading the cache
    owns_client: bool = False
    requests: list = field(default_factory=list)
    answers: list = field(default_factory=list)
    examples: list = field(default_factory=list)
    kinds: list = field(default_factory=list)
    teacher_label_ids: list = field(default_factory=list)
    teacher_vocab: int = 0
    targets: object = None  # OnlineTargets | CachedTargets

    @property
    def cache_dir(self) -> Path:
        return Path(self.cfg.teacher.cache_dir) if self.cfg.teacher.cache_dir else self.out_dir / "teacher_cache"


def _print0(msg: str) -> None:
    """One ``[icldist]`` line on rank 0 (distill.dist.env.print0)."""
    from distill.dist.env import print0

    print0(f"[icldist] {msg}", flush=True)


def resolve_models(cfg: ICLDistConfig, out_dir: Path) -> tuple[str, str]:
    from distill.models.load import resolve_builtin

    return resolve_builtin(cfg.model, out_dir)


def build_prompts(run: ICLDistRun, write: bool) -> list:
    from distill.data.sentibench import data_provenance, sample_note
    from distill.icldist.prompts import build_prompt_set, prompt_set_hash, summarize

    t0 = time.time()
    prompts = run.prompts or build_prompt_set(run.cfg.prompts)  # run_from_argv builds it before any model
    data = data_provenance(run.cfg.prompts.data_dir or None)
    if write:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = run.out_dir / "prompts.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            for p in prompts:
                fh.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
        tmp.replace(run.out_dir / "prompts.jsonl")
        summary = summarize(prompts) | {"prompt_set_hash": prompt_set_hash(prompts), "held_out": run.cfg.prompts.held_out,
                                        "data": data}
        (run.out_dir / "prompts_summary.json").write_text(json.dumps(summary, indent=1))
        _print0(f"prompts: {len(prompts)} from {len(summary['tasks'])} tasks (held out: {run.cfg.prompts.held_out}), "
                f"formats {summary['formats']}, {time.time() - t0:.1f}s -> {run.out_dir / 'prompts.jsonl'}")
        if sample_note(data):
            _print0(sample_note(data))  # the last line of the `prompts` stage
    return prompts


def _teacher_tokenizer(path: str, trust_remote_code: bool = False):
    from distill.models.load import load_tokenizer

    return load_tokenizer(path, trust_remote_code=trust_remote_code)


def manifest_for(run: ICLDistRun, teacher_tok) -> dict:
    """The cache manifest of this run; also what the online top-k is requested with (k, temperature:
    the KD temperature the losses use, vocab_size: the teacher tokenizer's real vocabulary).

    It fingerprints everything the cached targets depend on (distill.icldist.cache.KEY_FIELDS): the
    teacher (name, weights, dtype, quantization, tokenizer, generation budget), the prompt set and
    ``icl.max_len``; :func:`answers_fingerprint` is its teacher part."""
    from distill.icldist.prompts import prompt_set_hash
    from distill.models.fingerprint import tokenizer_hash, weights_fingerprint

    t = run.cfg.teacher
    return {"teacher": teacher_name(run), "k": t.k, "temperature": float(run.cfg.kd.temperature),
            "vocab_size": len(teacher_tok), "tokenizer_hash": tokenizer_hash(teacher_tok),
            "prompt_set_hash": prompt_set_hash(run.prompts), "n_prompts": len(run.prompts), "shard_size": t.shard_size,
            "max_len": run.cfg.icl.max_len, "teacher_weights": weights_fingerprint(run.teacher_path),
            "teacher_dtype": t.dtype, "teacher_quantization": t.quantization, "max_new_tokens": t.max_new_tokens}


def answers_fingerprint(manifest: dict) -> dict:
    """What the teacher's answers depend on (recorded on the first line of teacher_answers.jsonl)."""
    from distill.icldist.cache import ANSWER_FIELDS

    return {k: manifest[k] for k in ANSWER_FIELDS}


def teacher_name(run: ICLDistRun) -> str:
    """The teacher as the user named it; the built-in one by its recipe folder (stable across runs)."""
    if run.cfg.model.teacher == "builtin":
        return "builtin:" + Path(run.teacher_path).name
    return run.cfg.model.teacher


def check_levels(run: ICLDistRun, teacher_tok, student_tok) -> None:
    """Token-level KD (fine-grained prompts, or icl.classification=token) needs one vocabulary."""
    from distill.icldist.targets import check_token_level

    needs_token = any(p.kind == "fine-grained" for p in run.prompts) or run.cfg.icl.classification == "token"
    if needs_token:
        what = ("fine-grained prompts" if any(p.kind == "fine-grained" for p in run.prompts)
                else "icl.classification=token")
        check_token_level(teacher_tok, student_tok, what)


def open_client(run: ICLDistRun, *, rank: int, world: int):
    from distill.dist.env import broadcast_object0
    from distill.icldist.online import open_teacher

    if run.client is None:
        run_id = f"{os.getpid()}-{int(time.time() * 1000)}"
        run.client = open_teacher(run.cfg.teacher, run.teacher_path, rank=rank, world=world,
                                  broadcast=broadcast_object0, run_id=run_id)
        run.owns_client = True
    return run.client


def teacher_answers(run: ICLDistRun, teacher_tok) -> dict:
    from distill.icldist.online import generate_answers

    return generate_answers(run.client, run.prompts, run.out_dir / "teacher_answers.jsonl", tokenizer=teacher_tok,
                            max_new_tokens=run.cfg.teacher.max_new_tokens, request_size=run.cfg.teacher.request_size,
                            fingerprint=answers_fingerprint(manifest_for(run, teacher_tok)))


def build_requests(run: ICLDistRun, teacher_tok, answers: dict) -> None:
    from distill.icldist.data import teacher_request

    run.answers = [list(answers.get(p.id, [])) for p in run.prompts]
    run.requests = [teacher_request(p, teacher_tok, a, run.cfg.icl.max_len) for p, a in zip(run.prompts, run.answers)]


def run_cache_stage(run: ICLDistRun) -> Path:
    """``--stage cache``: the teacher's answers and top-k for the whole prompt set (one process)."""
    from distill.icldist.online import build_cache

    teacher_tok = _teacher_tokenizer(run.teacher_path, run.cfg.model.trust_remote_code)
    open_client(run, rank=0, world=1)
    answers = teacher_answers(run, teacher_tok)
    build_requests(run, teacher_tok, answers)
    t0 = time.time()
    root = build_cache(run.client, run.requests, run.answers, run.cache_dir, manifest_for(run, teacher_tok),
                       request_size=run.cfg.teacher.request_size)
    _print0(f"teacher cache: {len(run.prompts)} prompts, k={run.cfg.teacher.k}, T={run.cfg.kd.temperature}, "
            f"{time.time() - t0:.1f}s -> {root}")
    return root


def _cache_complete(root: Path) -> bool:
    try:
        return bool(json.loads((root / "manifest.json").read_text(encoding="utf-8")).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


# ---------------------------------------------------------------------------------------------------
# The stage's parts


def _prepare(run: ICLDistRun, tokenizer, ctx) -> ICLDistRun:
    """Everything the dataset and the backend need, on every rank: the prompts, the teacher's answers
    (the teacher client started or the cache read) and the student's examples. The stage's dataset."""
    from distill.dist import env as distenv
    from distill.icldist.cache import TeacherCache
    from distill.icldist.data import student_example
    from distill.icldist.online import CachedTargets, OnlineTargets, close_teacher
    from distill.icldist.targets import label_token_ids

    if run.examples:
        return run
    cfg = run.cfg
    rank, world = ctx.env.rank, ctx.env.world_size
    run.teacher_path = ctx.teacher_path
    if rank == 0:
        from distill.config import dump_yaml

        run.out_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, run.out_dir / "icldist_config.yaml")  # the whole run's settings (config.yaml: the trainer's)
    run.prompts = build_prompts(run, write=rank == 0)
    teacher_tok = _teacher_tokenizer(run.teacher_path, cfg.model.trust_remote_code)
    check_levels(run, teacher_tok, tokenizer)
    manifest = manifest_for(run, teacher_tok)
    if cfg.teacher.source == "cache":
        if rank == 0 and not _cache_complete(run.cache_dir):
            _print0(f"no complete teacher cache at {run.cache_dir}: building it first (teacher.source=cache)")
            run_cache_stage(run)
            if run.owns_client:
                close_teacher(run.client)
                run.client, run.owns_client = None, False
        distenv.barrier()
        cache = TeacherCache(run.cache_dir, expect=manifest)
        run.answers = [cache[i].answer_ids if p.kind == "fine-grained" else [] for i, p in enumerate(run.prompts)]
        from distill.icldist.data import teacher_request

        run.requests = [teacher_request(p, teacher_tok, a, cfg.icl.max_len) for p, a in zip(run.prompts, run.answers)]
        run.targets = CachedTargets(cache)
        _print0(f"teacher targets: cache {run.cache_dir} (no teacher running)")
    else:
        open_client(run, rank=rank, world=world)
        answers = teacher_answers(run, teacher_tok) if rank == 0 else None
        answers = distenv.broadcast_object0(answers)
        build_requests(run, teacher_tok, answers)
        run.targets = OnlineTargets(run.client, run.requests, cfg.teacher.k, temperature=manifest["temperature"],
                                    vocab_size=manifest["vocab_size"])
        _print0(f"teacher targets: online ({type(run.client).__name__}, prefetch {cfg.teacher.prefetch} micro-batch(es) ahead)")
    run.teacher_vocab = len(teacher_tok)
    for i, (p, a) in enumerate(zip(run.prompts, run.answers)):
        s_ids = label_token_ids(tokenizer, p.task, p.label_words) if p.kind == "classification" else []
        run.teacher_label_ids.append(
            label_token_ids(teacher_tok, p.task, p.label_words) if p.kind == "classification" else [])
        run.examples.append(student_example(i, p, tokenizer, a, cfg.icl.max_len, s_ids))
        run.kinds.append(p.kind)
    return run


class ICLDistDataset:
    def __init__(self, run: ICLDistRun, pad_id: int):
        self.run, self.pad_id = run, pad_id

    def __len__(self) -> int:
        return len(self.run.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.run.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels, "example_id": e.index}

    def collate(self, items: list[dict]) -> dict:
        from distill.icldist.data import collate

        return collate([self.run.examples[it["example_id"]] for it in items], self.pad_id)


class ICLDistBackend(TeacherBackend):
    """Teacher backend: a batch -> :class:`BatchTargets` (top-k online with prefetch, or cached)."""

    softcap = None
    topk_ids_checked = True  # checked where they enter: cache shards and service replies

    def __init__(self, run: ICLDistRun):
        self.run = run

    def prefetch(self, batch: dict) -> None:
        self.run.targets.prefetch(batch["example_id"].tolist())

    def __call__(self, batch: dict):
        from distill.icldist.loss import assemble

        run = self.run
        ids = batch["example_id"].tolist()
        topks = run.targets.get(ids)
        t = assemble([run.examples[i] for i in ids], [run.kinds[i] for i in ids], topks, batch["input_ids"].shape[1],
                     teacher_label_ids=[run.teacher_label_ids[i] for i in ids], teacher_vocab=run.teacher_vocab,
                     classification=run.cfg.icl.classification)
        return t.to(batch["input_ids"].device)

    def rows(self, batch: dict, index):
        """``kd.path=lean``: the batch's targets whole (small: k ids per position); the ICLDist
        objective picks its token-level and label rows among the supervised ones itself."""
        return self(batch)

    def close(self) -> None:
        self.run.targets.close()


class ICLDistStage(StageParts):
    """ICLDist's parts for :func:`distill.train.build.build_trainer`: the prompt set as the dataset,
    the teacher's top-k targets (online with prefetch, or the cache) as the teacher, the
    :class:`~distill.icldist.loss.ICLDistLoss` objective, and the teacher-wait callback."""

    def __init__(self, run: ICLDistRun):
        self.run = run

    def dataset(self, cfg, tokenizer, ctx):
        return ICLDistDataset(_prepare(self.run, tokenizer, ctx), tokenizer.pad_token_id)

    def teacher(self, cfg, ctx):
        return ICLDistBackend(self.run)

    def prefetch_depth(self, teacher) -> int:
        return self.run.cfg.teacher.prefetch

    def objective(self, cfg, ctx, teacher):
        from distill.icldist.loss import ICLDistLoss

        k = self.run.cfg.kd
        loss = ICLDistLoss(kind=k.kind, beta=k.beta, alpha=k.alpha, temperature=k.temperature,
                           kd_weight=k.kd_weight, label_kd_weight=self.run.cfg.icl.label_kd_weight,
                           ce_weight=k.ce_weight, vocab_size=ctx.vocab_size, impl=k.impl)
        _print0(f"objective: {loss!r} classification={self.run.cfg.icl.classification} path={k.path}")
        return loss

    def callbacks(self, cfg, ctx, student) -> list:
        return [TeacherWait(self.run.targets)]


class TeacherWait(Callback):
    """Logs the time this rank's step waited for teacher targets: ``teacher_wait_s`` and its share of
    the step, ``teacher_wait_frac``."""

    def __init__(self, targets):
        self.targets = targets
        self._wait0 = self._t0 = 0.0

    def begin_step(self, step: int, lr: float) -> None:
        self._wait0, self._t0 = self.targets.wait_s, time.perf_counter()

    def end_step(self, rec: dict, sums: dict) -> None:
        wait = self.targets.wait_s - self._wait0
        rec["teacher_wait_s"] = wait  # this rank's
        rec["teacher_wait_frac"] = wait / max(time.perf_counter() - self._t0, 1e-9)


def make_trainer(run: ICLDistRun, argv=None):
    """The run's Trainer with ICLDist's parts (then ``.train()``)."""
    from distill.train.build import build_trainer

    return build_trainer(run.cfg.trainer_config(), argv=argv, stage=ICLDistStage(run))


# ---------------------------------------------------------------------------------------------------
# Report


def write_report(run: ICLDistRun, export_dir: Path, *, teacher_path: str | None = None) -> dict | None:
    """SentiBench on the exported student (every rank calls it; rank 0 writes results.* there)."""
    from distill.eval.sentibench import evaluate, summary_line, write_results
    from distill.models.load import load_causal_lm, load_tokenizer

    r = run.cfg.report
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))

    def one(path: str, name: str) -> dict:
        tok = load_tokenizer(path, what=name)
        model = load_causal_lm(path, dtype=torch.bfloat16 if device == "cuda" else torch.float32, attn=None,
                               device=device, what=name)
        res = evaluate(model, tok, tasks=r.tasks, shots=r.shots, seeds=r.seeds, limit=r.limit or None,
                       batch_size=r.batch_size, data_dir=run.cfg.prompts.data_dir or None, model_name=name)
        del model
        return res

    t0 = time.time()
    results = one(str(export_dir), f"icldist student ({run.cfg.model.student})")
    held = [t for t in run.cfg.prompts.held_out if t in results.get("tasks", {})]
    results["icldist"] = {"held_out": held, "trained_on": sorted({p.task for p in run.prompts}),
                          "teacher": teacher_name(run), "prompts": len(run.prompts)}
    others = []
    if teacher_path:
        others.append(one(teacher_path, f"teacher ({teacher_name(run)})"))
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    paths = write_results(results, export_dir)
    if others:
        from distill.eval.report import plot_results, results_markdown

        paths["md"].write_text(results_markdown([results, *others]), encoding="utf-8")
        plot_results([results, *others], paths["png"])
        (export_dir / "results_teacher.json").write_text(json.dumps(others[0], indent=2))
    with open(paths["md"], "a", encoding="utf-8") as fh:
        seen = [t for t in results["tasks"] if t not in held]
        fh.write("\n\nICLDist: tasks held out of training (unseen-task generalisation): "
                 f"{', '.join(held) or 'none'}.\n")
        for label, tasks in (("held-out", held), ("trained", seen)):
            scores = [results["tasks"][t]["score"] for t in tasks if results["tasks"][t].get("score") is not None]
            if scores:
                fh.write(f"- mean over {label} tasks: {sum(scores) / len(scores):.2f} ({len(scores)} tasks)\n")
    _print0(f"report ({time.time() - t0:.0f}s): {summary_line(results)}")
    _print0(f"report -> {paths['json']}, {paths['md']}, {paths['png']}")
    return results


# ---------------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str]) -> tuple[ICLDistConfig, str, list[str]]:
    from distill.config import load_config

    cfg, rest = load_config(ICLDistConfig, argv)
    ap = argparse.ArgumentParser(prog="launchers/icldist.py", add_help=True)
    ap.add_argument("--stage", choices=STAGES, default="all")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args, unknown = ap.parse_known_args(rest)
    if unknown:
        from distill.config import ConfigError

        raise ConfigError(f"command line: unknown arguments {unknown} (settings are --section.key=value, see --help)")
    return cfg, args.stage, rest


def check_inputs(run: ICLDistRun, stage: str) -> None:
    """What a stage needs from the user, before any model is built or loaded: the prompt set (every
    task's data read and checked: labels, fields, files), the local model folders it will load (a
    missing folder or config.json, missing or truncated weights, a model that is not a causal LM),
    the trained student for ``--stage eval``, and the folders it writes (rank 0)."""
    from distill.config import ConfigError
    from distill.fileio import writable_folder
    from distill.models.load import check_model_folder, local_folder

    cfg = run.cfg
    if int(os.environ.get("RANK", "0")) == 0:
        writable_folder(run.out_dir, "run.out_dir")
    run.prompts = build_prompts(run, write=False)
    if stage == "prompts":
        return
    if run.cache_dir.exists() and not run.cache_dir.is_dir():
        raise ConfigError(f"teacher.cache_dir: {run.cache_dir} is a file, not a folder; move it away or point "
                          f"teacher.cache_dir elsewhere")
    named = [("model.teacher", cfg.model.teacher)] if stage != "eval" or cfg.report.teacher else []
    if stage in ("all", "train"):
        named.append(("model.student", cfg.model.student))
    for key, name in named:
        if name and name != "builtin":
            folder = local_folder(name, f"{key.split('.')[1]} folder ({key})")
            if folder is not None:
                check_model_folder(folder, f"{key.split('.')[1]} folder ({key})")
    if stage == "eval":
        export = run.out_dir / "export"
        if not export.is_dir():
            raise ConfigError(f"--stage eval: {export} does not exist; train first (--stage train or all) with this "
                              f"run.out_dir")
        check_model_folder(export, "the trained student (run.out_dir/export)")


def _data_note(cfg: ICLDistConfig) -> str:
    """"; <sample note>" for the final line of a run on the packaged SentiBench sample, else ""."""
    from distill.data.sentibench import data_provenance, sample_note

    note = sample_note(data_provenance(cfg.prompts.data_dir or None))
    return f"; {note}" if note else ""


def run_from_argv(argv: list[str]) -> int:
    cfg, stage, rest = parse_args(argv)
    t_start = time.time()
    out_dir = Path(cfg.run.out_dir)
    rank = int(os.environ.get("RANK", "0"))
    run = ICLDistRun(cfg=cfg, out_dir=out_dir)
    check_inputs(run, stage)

    if stage == "prompts":
        if rank == 0:
            build_prompts(run, write=True)
        return 0
    if stage == "cache":
        if rank != 0:
            return 0  # one process drives the service; the service itself is parallel
        run.student_path, run.teacher_path = resolve_models(cfg, out_dir)
        build_prompts(run, write=True)
        try:
            run_cache_stage(run)
        finally:
            if run.owns_client:
                from distill.icldist.online import close_teacher

                close_teacher(run.client)
        _print0(f"done in {time.time() - t_start:.0f}s" + _data_note(cfg))
        return 0
    if stage == "eval":
        export = out_dir / "export"
        run.student_path, run.teacher_path = resolve_models(cfg, out_dir)
        write_report(run, export, teacher_path=run.teacher_path if cfg.report.teacher else None)
        return 0

    from distill.train.checkpoint import check_run_folder

    check_run_folder(cfg.trainer_config())  # before any model or teacher service starts
    try:
        trainer = make_trainer(run, argv=rest)
        result = trainer.train()
    finally:
        if run.owns_client and run.client is not None:
            from distill.dist.env import barrier

            from distill.icldist.online import close_teacher

            try:
                barrier()  # other ranks may still be waiting on the service
            finally:
                close_teacher(run.client)
    hist = trainer.history
    if hist:
        frac = sum(h["teacher_wait_s"] for h in hist) / max(sum(h["step_time_s"] for h in hist), 1e-9)
        _print0(f"teacher wait: {100 * frac:.1f}% of step time over {len(hist)} steps "
                f"({cfg.teacher.source}); loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f}")
    export = Path(result.get("export", out_dir / "export"))
    if stage == "all" and cfg.report.enabled and cfg.checkpoint.export:
        write_report(run, export, teacher_path=run.teacher_path if cfg.report.teacher else None)
    _print0(f"done in {time.time() - t_start:.0f}s: student {export}, checkpoints {trainer.ckpt_dir}, "
            f"metrics {out_dir / 'metrics.jsonl'}" + _data_note(cfg))
    return 0
