"""KnowDist: distil a teacher's sentiment knowledge into a student (CE on the teacher's analyses +
online token-level KL to the co-located teacher) with DeepSpeed ZeRO-3.

    # 1 process (CPU or 1 GPU), built-in tiny default: tokenizer + small teacher trained here (cached),
    # a small corpus harvested from that teacher, then the smaller student distilled from it:
    python launchers/knowdist.py
    # 1 node through deepspeed (CPU: gloo; GPUs: nccl), same default or a shipped config:
    deepspeed launchers/knowdist.py
    deepspeed --num_gpus 8 launchers/knowdist.py --config launchers/configs/qwen2.5-7b-instruct_to_qwen2.5-0.5b_knowdist.yaml --train.lr=1e-5
    # SLURM, 2 nodes x 8 GPUs (see slurm/ for the sbatch script):
    srun --nodes 2 --ntasks-per-node 1 deepspeed --num_gpus 8 --num_nodes 2 --launcher slurm --no_ssh_check launchers/knowdist.py --config FILE
    # CPU-only smoke test of 2 ranks on loopback:
    unshare -n bash -c 'ip link set lo up && deepspeed --num_gpus 2 --master_addr 127.0.0.1 launchers/knowdist.py'

Flags: ``--config FILE.yaml`` and ``--section.key=value`` (sections run, model, data, train, kd,
deepspeed, checkpoint, log, eval, harvest; see docs/trainer.md), ``--resume`` (= checkpoint.resume
latest), ``--local_rank`` / ``$LOCAL_RANK`` (set by the deepspeed launcher), ``--debug`` (or
``DISTILL_DEBUG=1``: the traceback of user errors, which otherwise are one line and exit status 2).

With ``data.path`` empty, a corpus is harvested first: the teacher writes analyses of SentiBench
train texts from several perspectives (``harvest.*``), one JSONL record per (text, perspective) with
prompt and response; then the student is trained on it. A given corpus (``data.path`` = JSONL,
Parquet, a folder of shards from ``launchers/harvest.py``, or a datasets name) skips that step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout works without install

from distill.fileio import atomic_write_text  # noqa: E402
from distill.config import (  # noqa: E402
    CheckpointSection,
    ConfigError,
    DataSection,
    KDSection,
    RunConfig,
    RunSection,
    TrainSection,
    _check,
    load_config,
)


@dataclasses.dataclass
class HarvestSection:
    texts_per_task: int = 12  # SentiBench train texts per task to analyse (built-in corpus)
    perspectives: list[str] = dataclasses.field(  # perspective names of the built-in teacher's prompt
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
        _check(h.texts_per_task >= 1 and h.max_new_tokens >= 1 and h.batch_size >= 1,
               f"harvest: texts_per_task={h.texts_per_task}, max_new_tokens={h.max_new_tokens}, "
               f"batch_size={h.batch_size} must be >= 1")
        _check(len(h.perspectives) >= 1, "harvest.perspectives is empty")


def harvest_corpus(teacher_path: str, workdir: Path, h: HarvestSection) -> Path:
    """JSONL corpus of teacher analyses of SentiBench train texts (cached by teacher + settings).

    Uses the KnowDist harvester (distill.knowdist) when it offers ``harvest_builtin``; otherwise a
    local loop over :class:`distill.teacher.local.LocalTeacher` generations.
    """
    import random

    key = hashlib.sha256(json.dumps({"teacher": str(teacher_path), "h": dataclasses.asdict(h)}, sort_keys=True)
                         .encode()).hexdigest()[:12]
    out = workdir / f"corpus-{key}.jsonl"
    marker = workdir / f"corpus-{key}.done"  # written once the corpus is complete: later calls and ranks reuse it
    if marker.is_file() and Path(marker.read_text().strip()).exists():
        print(f"[knowdist] corpus: cached {marker.read_text().strip()}", flush=True)
        return Path(marker.read_text().strip())
    try:
        from distill.knowdist import harvest as kh  # the KnowDist harvester (resumable, sharded, manifest)
    except ImportError:
        kh = None
    if kh is not None and hasattr(kh, "harvest_builtin"):
        path = Path(kh.harvest_builtin(teacher_path, workdir, h))
        marker.write_text(str(path))
        return path
    from distill.data.sentibench import TASKS, load_task
    from distill.models.builtin import format_prompt
    from distill.teacher.local import LocalTeacher
    from distill.teacher.pipeline import SamplingParams

    rng = random.Random(h.seed)
    jobs = []
    for task in TASKS:
        if task == "absa/acsa_rest16":
            continue  # same texts as atsa_rest16
        recs = load_task(task, "train")
        for r in rng.sample(recs, min(h.texts_per_task, len(recs))):
            text = " ".join(r.text.split()[:60])
            persp = h.perspectives[len(jobs) % len(h.perspectives)]
            jobs.append((f"{task}/{getattr(r, 'index', len(jobs))}", text, persp))
    t0 = time.time()
    teacher = LocalTeacher(teacher_path)
    sampling = SamplingParams(max_new_tokens=h.max_new_tokens, temperature=h.temperature, seed=h.seed)
    from tqdm.auto import tqdm

    records, dropped = [], 0
    for i in tqdm(range(0, len(jobs), h.batch_size), desc="harvest", mininterval=2):
        chunk = jobs[i:i + h.batch_size]
        prompts = [format_prompt(text, p) for _, text, p in chunk]
        gens = teacher.generate(prompts, sampling)
        for (jid, text, persp), prompt, g in zip(chunk, prompts, gens):
            resp = g.text.rstrip()
            if not resp.strip() or g.finish_reason != "stop":
                dropped += 1  # empty or truncated analyses are not training targets
                continue
            records.append({"id": f"{jid}/{persp}", "text": text, "perspective": persp, "prompt": prompt,
                            "response": resp, "teacher": str(teacher_path),
                            "sampling": dataclasses.asdict(sampling)})
    teacher.shutdown()
    seen, uniq = set(), []
    for r in records:
        if (r["prompt"], r["response"]) in seen:
            dropped += 1
            continue
        seen.add((r["prompt"], r["response"]))
        uniq.append(r)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in uniq))
    marker.write_text(str(out))
    print(f"[knowdist] corpus: {len(uniq)} analyses of {len(jobs)} prompts ({dropped} empty/truncated/duplicate "
          f"dropped) in {time.time() - t0:.1f}s -> {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--resume" in argv:
        argv.remove("--resume")
        argv.append("--checkpoint.resume=latest")
    cfg, rest = load_config(KnowDistConfig, argv)
    rest = [a for i, a in enumerate(rest) if not (a.startswith("--local_rank") or a.startswith("--local-rank")
                                                   or (i > 0 and rest[i - 1] in ("--local_rank", "--local-rank")))]
    if rest:
        raise ConfigError(f"unknown arguments {rest} (use --section.key=value; see the docstring)")
    t0 = time.time()
    from distill.dist.env import print0, read_env
    from distill.models.builtin import _FileLock
    from distill.models.load import resolve_builtin

    env = read_env(argv)
    out_dir = Path(cfg.run.out_dir)
    # Teacher/student first (cached; several ranks wait on one lock), then the corpus.
    student, teacher = resolve_builtin(cfg.model, out_dir)
    cfg.model.student, cfg.model.teacher = student, teacher
    if not cfg.data.path:
        work = Path(cfg.model.builtin_dir or out_dir / "builtin")
        with _FileLock(work / ".corpus.lock"):
            cfg.data.path = str(harvest_corpus(teacher, work, cfg.harvest))
    from distill.trainer import Trainer

    trainer = Trainer(cfg, argv=argv).setup()
    result = trainer.train()
    hist = trainer.history
    if env.rank == 0 and hist:
        k = max(1, len(hist) // 10)
        first = sum(r["loss"] for r in hist[:k]) / k
        last = sum(r["loss"] for r in hist[-k:]) / k
        ckpts = sorted(p.name for p in trainer.ckpt_dir.glob("step_*"))
        print0(f"[knowdist] done in {time.time() - t0:.0f}s: student loss {first:.3f} -> {last:.3f} "
               f"(mean of first/last {k} steps) | run {out_dir} | metrics {out_dir / 'metrics.jsonl'} | "
               f"checkpoint {trainer.ckpt_dir / ckpts[-1] if ckpts else '-'} | student {result.get('export', '-')} | "
               f"teacher {teacher} | corpus {cfg.data.path}")
    return 0


if __name__ == "__main__":
    from distill.errors import run_cli

    sys.exit(run_cli(main, "knowdist.py"))
