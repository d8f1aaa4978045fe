"""The KnowDist stage: corpus (given, or harvested from the teacher) -> student trained on it.

``launchers/knowdist.py`` parses and validates a :class:`KnowDistConfig` and calls :func:`run`.
With ``data.path`` empty the corpus is harvested first (:func:`prepare_corpus`):

* the built-in tiny teacher (``model.teacher: builtin``) writes in its own ``Text:/Perspective:``
  format, which is the only format it was trained on (:func:`harvest_corpus`);
* a real teacher (a folder or hub name) writes through its tokenizer's chat template, the
  perspective as the system message and the text as the user message (``prompt_style=chat_system``,
  :func:`chat_harvest_config`); a tokenizer without a chat template is a ConfigError, never a silent
  fall-back to the built-in format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

from distill.config import (
    CheckpointSection,
    DataSection,
    KDSection,
    RunConfig,
    RunSection,
    TrainSection,
    require,
)
from distill.data.corpus import read_manifest
from distill.data.sentibench import sample_note


@dataclasses.dataclass
class HarvestSection:
    texts_per_task: int = 12  # SentiBench train texts per task to analyse (harvest when data.path is empty)
    perspectives: list[str] = dataclasses.field(  # perspective names (distill/knowdist/perspectives.yaml)
        default_factory=lambda: ["overall polarity", "emotion", "irony", "aspects", "opinion holder"])
    max_new_tokens: int = 40  # tokens the teacher writes per analysis
    temperature: float = 0.0  # teacher sampling temperature (0 = greedy)
    batch_size: int = 32  # prompts per teacher generate call
    seed: int = 0  # text selection and sampling


# The built-in run: tiny teacher/student trained here, fp32 on CPU, about a minute of training.
def _builtin_train() -> TrainSection:
    return TrainSection(steps=60, micro_batch=8, grad_accum=2, lr=2e-3, warmup_steps=6, min_lr_ratio=0.1,
                        adam_betas=[0.9, 0.98], seed=0)


@dataclasses.dataclass
class KnowDistConfig(RunConfig):
    run: RunSection = dataclasses.field(default_factory=lambda: RunSection(out_dir="runs/knowdist"))
    data: DataSection = dataclasses.field(default_factory=lambda: DataSection(max_len=160))
    train: TrainSection = dataclasses.field(default_factory=_builtin_train)
    kd: KDSection = dataclasses.field(default_factory=lambda: KDSection(kind="forward_kl", ce_weight=1.0, kd_weight=1.0))
    checkpoint: CheckpointSection = dataclasses.field(default_factory=lambda: CheckpointSection(every=30, keep_last=2))
    harvest: HarvestSection = dataclasses.field(default_factory=HarvestSection)

    def validate(self) -> None:
        super().validate()
        h = self.harvest
        for name in ("texts_per_task", "max_new_tokens", "batch_size"):
            require(getattr(h, name) >= 1, f"harvest.{name}={getattr(h, name)} must be >= 1")
        require(h.temperature >= 0 and math.isfinite(h.temperature),
                f"harvest.temperature={h.temperature} must be a finite number >= 0 (0 = greedy)")
        require(len(h.perspectives) >= 1, "harvest.perspectives is empty")
        if not self.data.path:  # the corpus is harvested first: check its names now
            from distill.knowdist.harvest import PerspectiveSection, load_perspectives

            builtin = self.model.teacher == "builtin"
            style = "builtin" if builtin else "chat_system"
            known = [p["name"] for p in load_perspectives(PerspectiveSection(prompt_style=style))[1]]
            unknown = [n for n in h.perspectives if n not in known]
            require(not unknown, f"harvest.perspectives {unknown}: not "
                    + ("names the built-in teacher was trained on" if builtin else
                       "defined in distill/knowdist/perspectives.yaml")
                    + f"; known: {known}")


def harvest_corpus(teacher_path: str, workdir: Path, h: HarvestSection) -> Path:
    """Corpus of the built-in teacher's analyses of SentiBench train texts (cached by teacher + settings)."""
    from distill.knowdist.harvest import harvest_builtin

    key = hashlib.sha256(json.dumps({"teacher": str(teacher_path), "h": dataclasses.asdict(h)}, sort_keys=True)
                         .encode()).hexdigest()[:12]
    marker = workdir / f"corpus-{key}.done"  # written once the corpus is complete: later calls and ranks reuse it
    if marker.is_file() and Path(marker.read_text().strip()).exists():
        print(f"[knowdist] corpus: cached {marker.read_text().strip()}", flush=True)
        return Path(marker.read_text().strip())
    path = Path(harvest_builtin(teacher_path, workdir, h))
    marker.write_text(str(path))
    return path


def _teacher_dtype(dtype: str) -> str:
    return dtype if dtype in ("auto", "bfloat16", "float16", "float32") else "auto"


def chat_harvest_config(teacher: str, out_dir: str | Path, h: HarvestSection, *, dtype: str = "auto"):
    """The :class:`~distill.knowdist.harvest.HarvestConfig` of a real teacher's corpus for ``h``.

    SentiBench train texts (``h.texts_per_task`` per task) x every perspective of ``h.perspectives``,
    through the teacher's chat template (``chat_system``), the in-process teacher (no Ray inside a
    DeepSpeed job). The folder resumes if cut short and refuses a corpus of other settings.
    """
    from distill.knowdist import harvest as kh

    return kh.HarvestConfig(
        input=kh.InputSection(source="sentibench", limit_per_task=h.texts_per_task),
        perspectives=kh.PerspectiveSection(names=list(h.perspectives), prompt_style="chat_system"),
        teacher=kh.TeacherSection(model=str(teacher), backend="local", dtype=_teacher_dtype(dtype),
                                  max_batch_size=h.batch_size),
        sampling=kh.SamplingSection(max_new_tokens=h.max_new_tokens, temperature=h.temperature, seed=h.seed),
        output=kh.OutputSection(dir=str(out_dir), shard_size=256),
    )


def prepare_corpus(cfg: KnowDistConfig, teacher_is_builtin: bool) -> str:
    """``cfg.data.path``, harvesting the corpus first when it is empty (once; other ranks wait and reuse it)."""
    if cfg.data.path:
        return cfg.data.path
    from distill.models.builtin import FileLock

    out_dir = Path(cfg.run.out_dir)
    if teacher_is_builtin:
        work = Path(cfg.model.builtin_dir or out_dir / "builtin")
        with FileLock(work / ".corpus.lock"):
            return str(harvest_corpus(cfg.model.teacher, work, cfg.harvest))
    from distill.knowdist.harvest import harvest

    folder = out_dir / "corpus"
    print(f"[knowdist] data.path is empty: harvesting {folder} from {cfg.model.teacher} (its chat template)", flush=True)
    with FileLock(out_dir / ".corpus.lock"):
        return str(harvest(chat_harvest_config(cfg.model.teacher, folder, cfg.harvest, dtype=cfg.model.teacher_dtype)))


def summary_line(trainer, result: dict, t0: float, teacher: str, corpus: str) -> str | None:
    """The end-of-run line: first/last loss and where everything is; None without a history."""
    hist = trainer.history
    if not hist:
        return None
    out_dir = trainer.out_dir
    k = max(1, len(hist) // 10)
    first = sum(r["loss"] for r in hist[:k]) / k
    last = sum(r["loss"] for r in hist[-k:]) / k
    ckpts = sorted(p.name for p in trainer.ckpt_dir.glob("step_*"))
    return (f"[knowdist] done in {time.time() - t0:.0f}s: student loss {first:.3f} -> {last:.3f} "
            f"(mean of first/last {k} steps) | run {out_dir} | metrics {out_dir / 'metrics.jsonl'} | "
            f"checkpoint {trainer.ckpt_dir / ckpts[-1] if ckpts else '-'} | student {result.get('export', '-')} | "
            f"teacher {teacher} | corpus {corpus}")


# The built-in default's closing comparison: a quick SentiBench slice (one seed, few examples), so
# that it adds well under a minute on a CPU. Not comparable with full SentiBench numbers.
QUICK_EVAL = {"tasks": ("sc/sst2", "sc/twitter", "multifaced/irony18", "multifaced/tweeteval"), "limit": 24,
              "shots": 4, "seeds": (42,)}


def _quick_score(folder: str | Path, *, cache: bool, label: str) -> dict:
    """SentiBench quick-slice results of the model in ``folder``; cached in that folder when ``cache``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.eval.sentibench import evaluate
    from distill.fileio import atomic_write_text

    folder = Path(folder)
    key = hashlib.sha256(json.dumps(QUICK_EVAL, sort_keys=True).encode()).hexdigest()[:12]
    path = folder / f"sentibench-quick-{key}.json"
    if cache and path.is_file():
        return json.loads(path.read_text())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    res = evaluate(model, tok, tasks=list(QUICK_EVAL["tasks"]), shots=QUICK_EVAL["shots"], seeds=QUICK_EVAL["seeds"],
                   limit=QUICK_EVAL["limit"], progress=False, model_name=label)
    if cache:
        atomic_write_text(path, json.dumps(res, indent=1, default=str))
    return res


def quick_comparison0(teacher: str, student_init: str, student: str, out_dir: str | Path) -> list[str]:
    """Rank 0, world 1: the trained student's quick SentiBench score beside the teacher's (cached next
    to the cached teacher) and the untrained student's (cached next to it); lines to print, plot path last."""
    from distill.eval.report import plot_results

    t0 = time.time()
    rows = [("teacher", teacher, True), ("student before", student_init, True), ("student after", student, False)]
    results = [_quick_score(path, cache=cache, label=name) for name, path, cache in rows]
    plot = plot_results(results, Path(out_dir) / "sentibench_quick.png", labels=[r[0] for r in rows])
    q = QUICK_EVAL
    lines = [f"[knowdist] SentiBench quick slice ({len(q['tasks'])} tasks {', '.join(q['tasks'])}; first {q['limit']} "
             f"test examples, {q['shots']}-shot, seed {q['seeds'][0]}; x100, not comparable with full runs; "
             f"{time.time() - t0:.0f}s):"]
    for (name, path, _), res in zip(rows, results):
        per = " ".join(f"{t.split('/')[-1]} {v.get('score', float('nan')):.1f}" for t, v in res["tasks"].items())
        lines.append(f"[knowdist]   {name:<15} {res['overall']['score']:5.1f}  ({per})  {path}")
    lines.append(f"[knowdist] plot {plot}")
    return lines


def check_model_folders(cfg: KnowDistConfig) -> None:
    """The local student and teacher folders are whole causal-LM folders (distill.models.load.check_model_folder)
    before the built-in models are built, the corpus harvested or any model loaded: a teacher that is a
    BERT, or has truncated weights, fails in one line at once rather than after the student has loaded."""
    from distill.models.load import check_model_folder, local_folder

    for key in ("student", "teacher"):
        name = getattr(cfg.model, key)
        if key == "teacher" and (cfg.kd.kind == "none" or cfg.kd.teacher_backend not in ("colocated", "ray")):
            continue  # no teacher, or one read from a cache / built by another backend
        if name and name != "builtin":
            what = f"{key} folder (model.{key})"
            folder = local_folder(name, what)
            if folder is not None:
                check_model_folder(folder, what)


def run(cfg: KnowDistConfig, argv: list[str] | None = None) -> int:
    """Resolve the models, get the corpus, train, print the summary (rank 0). ``argv`` goes to the run builder."""
    t0 = time.time()
    # Before the built-in models, the harvest and the trainer: what this machine cannot run, and a run
    # or checkpoint folder that cannot be written, are one line now rather than after hours of work.
    cfg.check_machine()
    from distill.dist.env import print0, read_env
    from distill.models.load import resolve_builtin
    from distill.train.build import build_trainer
    from distill.train.checkpoint import check_run_folder

    env = read_env(argv)
    check_run_folder(cfg)  # a used or busy run folder is refused before the teacher is built or the corpus harvested
    check_model_folders(cfg)
    teacher_is_builtin = cfg.model.teacher == "builtin"
    builtin_default = teacher_is_builtin and cfg.model.student == "builtin"
    # Teacher/student first (cached; several ranks wait on one lock), then the corpus.
    student, teacher = resolve_builtin(cfg.model, cfg.run.out_dir)
    cfg.model.student, cfg.model.teacher = student, teacher
    cfg.data.path = prepare_corpus(cfg, teacher_is_builtin)

    stage = None
    if cfg.multiteacher.teachers:  # several teachers with learned weights (distill.multiteacher)
        from distill.multiteacher.stage import MultiTeacherStage

        stage = MultiTeacherStage(cfg)
    trainer = build_trainer(cfg, argv=argv, stage=stage)
    result = trainer.train()
    line = summary_line(trainer, result, t0, teacher, cfg.data.path) if env.rank == 0 else None
    if line:
        print0(line)
    if builtin_default and env.rank == 0:
        # Real models are evaluated by the Trainer where eval.* asks for it; the built-in default ends
        # with the comparison users care about.
        if env.world_size > 1:
            # The evaluator's collectives would hang on rank 0 alone.
            print0("[knowdist] SentiBench quick comparison skipped: world_size "
                   f"{env.world_size} > 1 (run `python launchers/knowdist.py` for it)")
        elif not result.get("export"):
            print0("[knowdist] SentiBench quick comparison skipped: no exported student")
        else:
            for x in quick_comparison0(teacher, student, result["export"], cfg.run.out_dir):
                print0(x)
    note = sample_note((read_manifest(Path(cfg.data.path)) or {}).get("data")) if Path(cfg.data.path).is_dir() else ""
    if note and env.rank == 0:
        print0(f"[knowdist] {note}")  # the last line says when SentiBench came from the packaged sample
    return 0
