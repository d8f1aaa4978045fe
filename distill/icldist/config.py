"""The ICLDist run configuration (``launchers/icldist.py``): defaults <- ``--config`` YAML <- ``--a.b=v``.

The training sections are the core trainer's own (:class:`distill.config.RunConfig`: ``run``,
``model``, ``train``, ``kd``, ``deepspeed``, ``checkpoint``, ``log``), so a KnowDist YAML's training
knobs read the same here. ICLDist adds ``prompts`` (:class:`distill.icldist.prompts.PromptConfig`),
``teacher`` (service / cache / top-k), ``icl`` (label-level KD) and ``report`` (SentiBench after
training). Every default is the built-in tiny CPU run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from distill.config import (
    CheckpointSection,
    ConfigError,
    check_sentibench_tasks,
    DataSection,
    DeepSpeedSection,
    KDSection,
    LogSection,
    ModelSection,
    RunConfig,
    RayTeacherSection,
    VLLMSection,
    RunSection,
    TrainSection,
)
from distill.config import EvalSection as TrainerEvalSection
from distill.icldist.prompts import PromptConfig

STAGES = ("all", "prompts", "cache", "train", "eval")


# The teacher service (its Ray fields are the trainer's: RayTeacherSection), or the cache read instead of
# it, and what is asked of it. (No docstring: --help would print it as the section's note.)
@dataclass
class TeacherSection(RayTeacherSection):
    source: str = "online"  # "online": the teacher service during training; "cache": read cache_dir (no teacher running)
    dtype: str = "auto"  # teacher weights: auto | bfloat16 | float16 | float32
    k: int = 64  # top-k kept per target position
    prefetch: int = 2  # batches whose top-k is requested ahead of the one being trained
    cache_dir: str = ""  # teacher top-k cache ("" = <out_dir>/teacher_cache)
    shard_size: int = 256  # prompts per cache shard file
    max_new_tokens: int = 48  # fine-grained answers: teacher generation budget (tokens; first line kept)
    request_size: int = 32  # prompts per service request
    engine: str = "hf"  # hf (our HF engine: in this process with ray_address=local, else the Ray service) | vllm (a vLLM engine in each rank's process; the Ray keys are not used)
    vllm: VLLMSection = field(default_factory=lambda: VLLMSection(gpu_memory_utilization=0.3))  # engine=vllm: its settings


@dataclass
class ICLSection:
    classification: str = "label"  # "label": KL over the label words (any tokenizers); "token": top-k KD at the answer token (one vocabulary)
    label_kd_weight: float = 1.0  # weight of the label-level KL (classification prompts)
    max_len: int = 512  # prompt + answer, tokens; prompts lose tokens from the left beyond it


@dataclass
class ReportSection:
    enabled: bool = True  # evaluate the exported student on SentiBench after training
    tasks: str = "all"  # tasks ("all" includes the held-out ones, which the report marks)
    shots: int = 4  # demonstrations per prompt (the paper's protocol)
    seeds: list[int] = field(default_factory=lambda: [42])  # demonstration seeds (paper: 42, 52, 62)
    limit: int = 8  # test sentences per task (0 = all)
    batch_size: int = 8  # sequences per evaluation forward
    teacher: bool = False  # also evaluate the teacher with the same settings, for the table and plot


def _run_default() -> RunSection:
    return RunSection(out_dir="runs/icldist")


def _train_default() -> TrainSection:
    return TrainSection(steps=30, micro_batch=8, lr=1e-3, warmup_steps=3)


def _kd_default() -> KDSection:
    return KDSection(kind="forward_kl", ce_weight=0.5, kd_weight=1.0, teacher_backend="icldist", topk=64)


def _model_default() -> ModelSection:
    # The built-in tiny models are cached where launchers/knowdist.py keeps them, so the two stages
    # share one teacher (and a second run skips its training).
    return ModelSection(builtin_dir="runs/knowdist/builtin")


def _ds_default() -> DeepSpeedSection:
    return DeepSpeedSection()


@dataclass
class ICLDistConfig:
    run: RunSection = field(default_factory=_run_default)
    model: ModelSection = field(default_factory=_model_default)  # model.student = the KnowDist export (or builtin)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    icl: ICLSection = field(default_factory=ICLSection)
    train: TrainSection = field(default_factory=_train_default)
    kd: KDSection = field(default_factory=_kd_default)  # kind/temperature/weights of the token-level KD and CE
    deepspeed: DeepSpeedSection = field(default_factory=_ds_default)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    report: ReportSection = field(default_factory=ReportSection)

    def trainer_config(self) -> RunConfig:
        """The core trainer's RunConfig for this run (the data come from the ICLDist prompt set)."""
        kd = dataclasses.replace(self.kd, teacher_backend="icldist", topk=self.teacher.k)
        return RunConfig(
            run=self.run, model=self.model, data=DataSection(name="icldist", max_len=self.icl.max_len),
            train=self.train, kd=kd, deepspeed=self.deepspeed, checkpoint=self.checkpoint, log=self.log,
            eval=TrainerEvalSection(),
        )

    def validate(self) -> None:
        self.prompts.validate("prompts")
        t = self.teacher
        if t.source not in ("online", "cache"):
            raise ConfigError(f"teacher.source={t.source!r}: must be 'online' or 'cache'")
        if t.engine not in ("hf", "vllm"):
            raise ConfigError(f"teacher.engine={t.engine!r}: hf | vllm")
        t.vllm.validate("teacher.vllm")
        if t.engine == "vllm" and t.quantization:
            raise ConfigError(f"teacher.quantization={t.quantization} with teacher.engine=vllm: bitsandbytes weights are "
                              f"our HF engine's; give vLLM a quantized checkpoint")
        for name in ("replicas", "shards", "k", "shard_size", "max_new_tokens", "request_size", "max_batch_tokens"):
            if getattr(t, name) < 1:
                raise ConfigError(f"teacher.{name}={getattr(t, name)} must be >= 1")
        if t.prefetch < 0:
            raise ConfigError(f"teacher.prefetch={t.prefetch} must be >= 0")
        for name in ("max_restarts", "max_retries"):
            if getattr(t, name) < 0:
                raise ConfigError(f"teacher.{name}={getattr(t, name)} must be >= 0 (0 = none)")
        if t.num_gpus not in (-1, 0, 1):
            raise ConfigError(f"teacher.num_gpus={t.num_gpus}: -1 (auto), 0 (CPU) or 1 GPU per shard actor "
                              f"(a teacher larger than one GPU uses teacher.shards)")
        if t.quantization not in ("", "8bit", "4bit"):
            raise ConfigError(f"teacher.quantization={t.quantization!r}: one of '', '8bit', '4bit'")
        if self.icl.classification not in ("label", "token"):
            raise ConfigError(f"icl.classification={self.icl.classification!r}: 'label' or 'token'")
        if self.icl.label_kd_weight < 0:
            raise ConfigError(f"icl.label_kd_weight={self.icl.label_kd_weight} must be >= 0")
        if self.icl.max_len < 32:
            raise ConfigError(f"icl.max_len={self.icl.max_len} tokens is too short for a prompt (>= 32)")
        if self.kd.kd_weight == 0 and self.icl.label_kd_weight == 0:
            raise ConfigError("kd.kd_weight=0 and icl.label_kd_weight=0: nothing is learnt from the teacher; give one "
                              "of them a weight > 0 (kd.kd_weight=0 alone trains on the label-level KL and the CE)")
        if self.kd.on_policy.fraction:
            raise ConfigError(f"kd.on_policy.fraction={self.kd.on_policy.fraction}: on-policy distillation is a KnowDist "
                              f"setting (launchers/knowdist.py); ICLDist trains on its prompt set's answers")
        if self.kd.kind == "none":
            raise ConfigError("kd.kind=none: ICLDist distils from the teacher; pick a divergence (forward_kl, ...)")
        if self.model.teacher == "":
            raise ConfigError("model.teacher is empty: ICLDist needs a teacher (\"builtin\", a folder or a hub name)")
        if self.report.limit < 0 or self.report.shots < 0:
            raise ConfigError(f"report: limit={self.report.limit} and shots={self.report.shots} must be >= 0")
        if self.report.batch_size < 1 or not self.report.seeds:
            raise ConfigError(f"report: batch_size={self.report.batch_size} must be >= 1 and seeds={self.report.seeds} "
                              f"must name at least one seed")
        if self.kd.teacher_backend != "icldist":
            # trainer_config() sets it: another value would be ignored without a word
            raise ConfigError(f"kd.teacher_backend={self.kd.teacher_backend!r}: ICLDist's teacher is the icldist "
                              f"backend, chosen by teacher.source (online | cache); leave kd.teacher_backend unset")
        check_sentibench_tasks(self.report.tasks, "report.tasks")  # also read by --stage eval, report.enabled or not
        self.trainer_config().validate(stage_names=("icldist",))
