"""The ICLDist run configuration (``launchers/icldist.py``): defaults <- ``--config`` YAML <- ``--a.b=v``.

Sections: ``run`` (where, seed), ``prompts`` (:class:`distill.icldist.prompts.PromptConfig`),
``teacher`` (model, online service or cache, top-k), ``student`` (init), ``loss``, ``train`` (the core
trainer's knobs), ``eval`` (the SentiBench report). Every default is the built-in tiny CPU run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distill.config import ConfigError
from distill.icldist.prompts import PromptConfig

STAGES = ("all", "prompts", "cache", "train", "eval")


@dataclass
class RunSection:
    out_dir: str = "runs/icldist"  # run folder: prompts, teacher cache, checkpoints, export, report
    seed: int = 0  # student init, data order
    workdir: str = ""  # built-in teacher/student cache ("" = <out_dir>/../builtin, shared with knowdist)


@dataclass
class TeacherSection:
    model: str = "builtin"  # "builtin" (tiny, trained here), a local HF folder, or a hub name
    source: str = "online"  # "online": the Ray teacher service during training; "cache": read cache_dir
    ray_address: str = ""  # existing Ray cluster (HOST:PORT or "auto"); "" = private loopback Ray on 127.0.0.2; "local" = in-process, no Ray
    ray_node_ip: str = "127.0.0.2"  # address of the private Ray node when ray_address is ""
    replicas: int = 1  # teacher copies serving requests
    shards: int = 1  # pipeline stages (actors) per copy, for teachers larger than one GPU
    num_gpus: float = -1.0  # GPUs per shard actor (-1 = 1 when the cluster has GPUs, else 0)
    dtype: str = "auto"  # teacher weights: auto | bfloat16 | float16 | float32
    quantization: str = ""  # "" | "8bit" | "4bit" (bitsandbytes, CUDA only)
    max_batch_tokens: int = 16384  # tokens per teacher forward batch (padded)
    k: int = 64  # top-k kept per target position
    prefetch: int = 2  # batches whose top-k is requested ahead of the one being trained
    cache_dir: str = ""  # teacher top-k cache ("" = <out_dir>/teacher_cache)
    shard_size: int = 256  # prompts per cache shard file
    max_new_tokens: int = 96  # fine-grained answers: teacher generation length (tokens)
    request_size: int = 32  # prompts per service request


@dataclass
class StudentSection:
    model: str = ""  # student init: the KnowDist export folder, any HF causal LM; "" = built-in tiny student
    size: str = "student"  # built-in student size (distill.models.tiny.SIZES) when model is ""


@dataclass
class LossSection:
    classification: str = "label"  # "label": KL over label words (any tokenizers); "token": top-k KD at the answer token (one vocabulary)
    kind: str = "forward_kl"  # token-level divergence (distill.losses kinds)
    beta: float = 0.5  # jsd mixture weight
    alpha: float = 0.1  # skew KL weight
    temperature: float = 1.0  # softens both sides; KD terms are scaled by T^2
    kd_weight: float = 1.0  # weight of the token-level KD (fine-grained answers)
    label_kd_weight: float = 1.0  # weight of the label-level KL (classification)
    ce_weight: float = 0.5  # weight of the gold CE (classification: the gold label; fine-grained: the teacher's answer)


@dataclass
class TrainSection:
    steps: int = 40  # optimizer steps (0 = one epoch over the prompt set)
    micro_batch: int = 8  # sequences per rank per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # AdamW peak learning rate
    warmup: int = 4  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay
    max_seq_len: int = 768  # prompt + answer, tokens (longer prompts lose demonstrations from the front)
    zero_stage: int = 3  # DeepSpeed ZeRO stage under the deepspeed launcher
    ds_config: str = ""  # ds_configs/*.json ("" = the trainer's default for zero_stage)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    grad_clip: float = 1.0  # max gradient norm
    save_every: int = 0  # checkpoint every N steps (0 = at the end only)
    keep_last: int = 2  # checkpoints kept
    log_every: int = 1  # steps between log lines
    resume: bool = False  # continue from the last checkpoint in out_dir


@dataclass
class EvalSection:
    enabled: bool = True  # evaluate the exported student on SentiBench after training
    tasks: str = "all"  # tasks to evaluate ("all" includes the held-out ones)
    shots: int = 4  # demonstrations (the paper's protocol)
    seeds: list[int] = field(default_factory=lambda: [42])  # demonstration seeds (paper: 42, 52, 62)
    limit: int = 20  # test sentences per task (0 = all)
    batch_size: int = 8  # evaluation batch size
    max_new_tokens: int = 0  # fine-grained generation length (0 = the protocol's 150)
    teacher: bool = False  # also evaluate the teacher (same settings) for comparison


@dataclass
class ICLDistConfig:
    run: RunSection = field(default_factory=RunSection)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def validate(self) -> None:
        self.prompts.validate("prompts")
        t = self.teacher
        if t.source not in ("online", "cache"):
            raise ConfigError(f"teacher.source={t.source!r}: must be 'online' or 'cache'")
        for name in ("replicas", "shards", "k", "shard_size", "max_new_tokens", "request_size"):
            if getattr(t, name) < 1:
                raise ConfigError(f"teacher.{name}={getattr(t, name)} must be >= 1")
        if t.prefetch < 0:
            raise ConfigError(f"teacher.prefetch={t.prefetch} must be >= 0")
        if t.quantization not in ("", "8bit", "4bit"):
            raise ConfigError(f"teacher.quantization={t.quantization!r}: one of '', '8bit', '4bit'")
        if self.loss.classification not in ("label", "token"):
            raise ConfigError(f"loss.classification={self.loss.classification!r}: 'label' or 'token'")
        if self.loss.temperature <= 0:
            raise ConfigError(f"loss.temperature={self.loss.temperature} must be > 0")
        tr = self.train
        if tr.micro_batch < 1 or tr.grad_accum < 1 or tr.steps < 0:
            raise ConfigError(
                f"train: micro_batch={tr.micro_batch}, grad_accum={tr.grad_accum} must be >= 1 and steps={tr.steps} >= 0"
            )
        if tr.max_seq_len < 32:
            raise ConfigError(f"train.max_seq_len={tr.max_seq_len} is too short for a prompt (>= 32)")
        if self.eval.limit < 0 or self.eval.shots < 0:
            raise ConfigError(f"eval: limit={self.eval.limit} and shots={self.eval.shots} must be >= 0")
