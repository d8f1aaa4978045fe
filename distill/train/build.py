"""The run builder: a run config (and a stage's parts) in, a :class:`~distill.train.loop.Trainer` out.

:func:`build_trainer` does, in this order, on every rank: the process group; the run folder (its lock,
a used folder refused, an unfinished save removed) before any model is loaded; the tokenizer, with
every rank checked to run the same code, config and tokenizer; the dataset (a malformed record fails
before any model is loaded) and its batches; the student and its engine; the teacher; the objective;
the run files; the callbacks; a resume. A stage (ICLDist, several teachers) hands in a
:class:`StageParts` that builds its own dataset, teacher, objective and callbacks; what it leaves to
the default comes from the registries (``data.name``, ``kd.teacher_backend``) and ``cfg.kd``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from distill.config import ConfigError, RunConfig, dump_yaml, to_dict
from distill.data.registry import dataset_factory
from distill.dist import env as distenv
from distill.dist.env import print0
from distill.fileio import os_error_text
from distill.teacher.base import BackendContext
from distill.teacher.registry import teacher_factory
from distill.train.batches import Schedule, StepBatches
from distill.train.callbacks import Callback, EvalCallback, ExportCallback
from distill.train.checkpoint import RUN_FOLDER_FIX, Checkpointer, seed_all
from distill.train.loop import LoopSettings, Trainer
from distill.train.outputs import RunLog, RunOutputs
from distill.runinfo import versions


@dataclass
class Student:
    """The trained model as a stage's callbacks may use it: its engine (forward under ZeRO-3 gathers),
    its lean head (None on the logits path) and this rank's device."""

    engine: Any
    lean_head: Any
    device: torch.device


class StageParts:
    """What a stage builds for the run; every default is the core run's (``data.name`` and
    ``kd.teacher_backend`` from their registries, DistillObjective from ``cfg.kd``). Each method is
    called once, on every rank, in the order listed; ``ctx`` is the run's BackendContext."""

    def dataset(self, cfg: RunConfig, tokenizer, ctx: BackendContext):
        """The training dataset, or None for the registered ``data.name``."""
        return None

    def prepare_student(self, model: torch.nn.Module, ctx: BackendContext) -> None:
        """Called before the engine is built: modules attached to the student here (the multi-teacher
        attention gate) are optimised, partitioned and checkpointed with it."""

    def student_state_dict(self, sd: dict) -> dict:
        """The gathered state dict -> the exported / evaluated model's (drops attached modules)."""
        return sd

    def teacher(self, cfg: RunConfig, ctx: BackendContext):
        """The teacher backend, or None for the registered ``kd.teacher_backend`` (at its placement)."""
        return None

    def objective(self, cfg: RunConfig, ctx: BackendContext, teacher):
        """The loss, or None for the DistillObjective of ``cfg.kd``."""
        return None

    def prefetch_depth(self, teacher) -> int:
        """Micro-batches the teacher's prefetch runs ahead (0: none)."""
        return 1

    def callbacks(self, cfg: RunConfig, ctx: BackendContext, student: Student) -> list[Callback]:
        """The stage's callbacks (before the run's evaluation and export)."""
        return []


def build_trainer(cfg: RunConfig, *, argv: list[str] | None = None, stage: StageParts | None = None) -> Trainer:
    """The run's Trainer with every part built (see the module docstring); a build that fails lets go
    of the run folder's lock."""
    # 2026-11: DeepSpeed 0.19 calls torch.distributed's all_gather_into_tensor/reduce_scatter_tensor,
    # which torch 2.13 flags as deprecated on every call; the calls are correct, the noise is not.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    use_ds = cfg.deepspeed.engine == "deepspeed"
    env = distenv.read_env(argv)
    if not use_ds and env.world_size > 1:
        raise ConfigError(
            f"deepspeed.engine=torch is single-process, but WORLD_SIZE={env.world_size}: use deepspeed.engine=deepspeed")
    cfg.check_machine()  # nccl / fp16 / flash-attn / triton this machine cannot run: one line, before anything starts
    env = distenv.init_distributed(cfg.deepspeed.dist_backend, use_deepspeed=use_ds, argv=argv)
    seed_all(cfg.train.seed + env.rank)
    ckpt = Checkpointer(cfg, env)
    try:
        # A used run folder, before any model is loaded: rank 0 decides from the file system and every
        # rank raises the same error (the broadcast is also the barrier after rank 0's moves).
        problem = distenv.broadcast_object0(ckpt.prepare_folder0() if env.is_main else None)
        if problem:
            raise ConfigError(problem)
        return _build(cfg, env, ckpt, stage or StageParts())
    except BaseException:
        ckpt.release_folder()
        raise


def _build(cfg: RunConfig, env, ckpt: Checkpointer, stage: StageParts) -> Trainer:
    from distill.models import load as ml

    device = torch.device(env.device)
    on_gpu = device.type == "cuda"
    student_path, teacher_path = ml.resolve_builtin(cfg.model, ckpt.out_dir)
    if cfg.kd.kind == "none":
        teacher_path = ""
    tokenizer = ml.load_tokenizer(cfg.model.tokenizer or student_path, trust_remote_code=cfg.model.trust_remote_code,
                                  what="tokenizer folder (model.tokenizer)" if cfg.model.tokenizer
                                  else "student folder (model.student)")
    vocab_size = cfg.model.vocab_size or len(tokenizer)
    _check_ranks_agree(cfg, env, tokenizer)
    ds_config = None
    if cfg.deepspeed.engine == "deepspeed":
        from distill.dist.ds_config import build_ds_config

        ds_config = build_ds_config(cfg, env.world_size, on_gpu=on_gpu)
    zero_stage = ds_config["zero_optimization"]["stage"] if ds_config else 0
    ctx = BackendContext(env=env, device=device, tokenizer=tokenizer, vocab_size=vocab_size, student_path=student_path,
                         teacher_path=teacher_path, ds_config=ds_config, out_dir=ckpt.out_dir)
    # Data first: a malformed record fails before any model is loaded.
    dataset = stage.dataset(cfg, tokenizer, ctx)
    if dataset is None:
        dataset = dataset_factory(cfg.data.name)(cfg, tokenizer, ctx)
    ctx.dataset = dataset
    schedule = Schedule(*cfg.train.schedule_for(len(dataset), env.world_size))
    if len(dataset) < schedule.global_batch:
        t = cfg.train
        raise ConfigError(
            f"the dataset has {len(dataset)} examples, fewer than one optimizer step needs: micro_batch={t.micro_batch} "
            f"x grad_accum={t.grad_accum} x world_size={env.world_size} = {schedule.global_batch}")
    batches = StepBatches(dataset, _collate_for(cfg, dataset, tokenizer, on_gpu), schedule, seed=cfg.train.seed,
                          micro_batch=cfg.train.micro_batch, grad_accum=cfg.train.grad_accum, rank=env.rank,
                          world_size=env.world_size)
    model, lean_head = _load_student(cfg, ctx, zero_stage, on_gpu)
    stage.prepare_student(model, ctx)  # before the engine: what it attaches is trained
    engine = _engine(cfg, model, schedule.total_steps, ds_config)
    rollout = _rollout(cfg, engine, model, tokenizer, schedule, device, student_path)
    batches.rollout = rollout
    teacher = None
    if cfg.kd.kind != "none":
        teacher = stage.teacher(cfg, ctx) or _core_teacher(cfg, ctx, zero_stage)
    objective = stage.objective(cfg, ctx, teacher) or _core_objective(cfg, vocab_size, teacher)
    ckpt.engine, ckpt.ds_config, ckpt.versions = engine, ds_config, _write_run_files(cfg, env, ckpt, ds_config)
    ckpt.global_batch, ckpt.steps_per_epoch, ckpt.total_steps = schedule.global_batch, schedule.steps_per_epoch, \
        schedule.total_steps
    callbacks = [*([rollout] if rollout else []), *stage.callbacks(cfg, ctx, Student(engine, lean_head, device))]
    ckpt.extra_state = lambda: {k: v for cb in callbacks for k, v in cb.state_dict().items()}
    ckpt.load_extra_state = lambda state: [cb.load_state_dict(state) for cb in callbacks]
    step = ckpt.resume(cfg.checkpoint.resume) if cfg.checkpoint.resume else 0
    from distill.reporting import Reporter

    log = RunLog(ckpt.out_dir / "metrics.jsonl", ckpt, Reporter(cfg, ckpt.out_dir) if env.is_main else Reporter())
    outputs = RunOutputs(cfg, env=env, device=device, engine=engine, model_config=model.config,
                         generation_config=getattr(model, "generation_config", None), tokenizer=tokenizer,
                         student_path=student_path, teacher_path=teacher_path, out_dir=ckpt.out_dir, checkpointer=ckpt,
                         log=log, student_state_dict=stage.student_state_dict)
    callbacks = [*callbacks, EvalCallback(outputs, every=cfg.eval.every, at_end=cfg.eval.at_end)]
    if cfg.checkpoint.export:
        callbacks.append(ExportCallback(outputs))
    caps = {"student": ml.final_logit_softcap(model.config),
            "teacher": ml.final_logit_softcap(teacher.config) if hasattr(teacher, "config") else None}
    print0(f"[trainer] engine={engine.kind} zero_stage={zero_stage} world={env.world_size} "
           f"device={device} student={student_path} teacher={teacher_path or '-'} vocab={vocab_size} "
           f"examples={len(dataset)} global_batch={schedule.global_batch} steps={schedule.total_steps} "
           f"(from step {step}) softcaps={caps} objective={objective!r}")
    settings = LoopSettings(total_steps=schedule.total_steps, log_every=cfg.log.every,
                            progress_bar=cfg.log.progress_bar, checkpoint_every=cfg.checkpoint.every,
                            prefetch_depth=stage.prefetch_depth(teacher), prefetch_across_steps=rollout is None,
                            vocab_size=vocab_size,
                            teacher_name=f"teacher backend {cfg.kd.teacher_backend!r}")
    return Trainer(env=env, engine=engine, batches=batches, teacher=teacher, objective=objective, lean_head=lean_head,
                   checkpointer=ckpt, log=log, callbacks=callbacks, settings=settings, outputs=outputs, start_step=step)


def _collate_for(cfg: RunConfig, dataset, tokenizer, on_gpu: bool):
    """The dataset's own collate, else packing (``data.packing``) or the padding collate of distill.data.sft."""
    own = getattr(dataset, "collate", None)
    pad = tokenizer.pad_token_id
    if cfg.data.packing:
        if own is not None:
            raise ConfigError(f"data.packing=true: the {cfg.data.name!r} dataset builds its own batches "
                              f"(per-example teacher positions); packing serves datasets without a collate, e.g. sft")
        from distill.data.packing import flash_attn_kwargs, pack_collate
        from distill.models.load import resolve_attn

        # flash-attention's varlen path needs the sequence bounds of a multi-row packed batch spelled out
        flash = resolve_attn(cfg.model.attn, on_gpu) == "flash_attention_2"
        max_len = cfg.data.max_len

        def packed(items):
            batch = pack_collate(items, pad, max_len)
            return batch | flash_attn_kwargs(batch) if flash and batch["input_ids"].shape[0] > 1 else batch

        return packed
    if own is not None:
        return own
    from distill.data.sft import collate

    return lambda items: collate(items, pad)


def _load_student(cfg: RunConfig, ctx: BackendContext, zero_stage: int, on_gpu: bool):
    """The student model and, with ``kd.path=lean``, its lean head (installed before the engine: ZeRO-3
    registers its gather/release hooks on this same module)."""
    from distill.models import load as ml

    path = ctx.student_path
    model = ml.load_causal_lm(
        path, dtype=ml.resolve_dtype(cfg.model.dtype, on_gpu), attn=ml.resolve_attn(cfg.model.attn, on_gpu),
        device=str(ctx.device), trust_remote_code=cfg.model.trust_remote_code,
        zero3_config=ctx.ds_config if zero_stage == 3 else None, grad_checkpointing=cfg.model.grad_checkpointing,
        what="student folder (model.student)")
    ml.check_embedding_rows(model.config, ctx.vocab_size, f"student {path}")
    if cfg.kd.path != "lean":
        return model, None
    from distill.losses.lean import install_lean_head

    scale, cap = ml.logit_transform(model)
    if scale != 1.0 or cap is not None:
        raise ConfigError(
            f"student {path}: its forward rescales or softcaps the logits after lm_head (scale "
            f"{scale:g}, softcap {cap}); kd.path=lean computes the loss inside lm_head: use kd.path=logits")
    return model, install_lean_head(model, f"student {path} (kd.path=lean)")


def _rollout(cfg: RunConfig, engine, model, tokenizer, schedule: Schedule, device, student_path: str):
    """``kd.on_policy.fraction > 0``: the student's rollouts (distill.train.rollout), else None."""
    op = cfg.kd.on_policy
    if not op.fraction:
        return None
    from distill.train.rollout import Rollout

    eos = {tokenizer.eos_token_id} | set(_ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None)))
    eos.discard(None)
    if not eos:
        raise ConfigError(f"kd.on_policy: the student's tokenizer ({cfg.model.tokenizer or cfg.model.student}) has no "
                          f"end-of-sequence token, so a generated response could not end; set one in its tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    if op.engine == "vllm":
        from distill.train.rollout import VLLMSampler

        sampler = VLLMSampler(engine, lambda: _rollout_engine(cfg, student_path), sync_every=op.sync_every,
                              temperature=op.temperature, top_p=op.top_p, eos_ids=sorted(eos))
        how = f"a vLLM engine per rank, weights copied every {op.sync_every} step(s)"
    else:
        from distill.train.rollout import StudentSampler

        sampler = StudentSampler(engine, batch_size=op.batch_size or cfg.train.micro_batch, temperature=op.temperature,
                                 top_p=op.top_p, eos_ids=sorted(eos), pad_id=pad, device=device)
        how = "the live student"
    r = Rollout(sampler, fraction=op.fraction, max_new_tokens=op.max_new_tokens, max_len=cfg.data.max_len,
                seed=cfg.train.seed, global_batch=schedule.global_batch, device=device)
    print0(f"[trainer] on-policy: the student writes {r.per_step} of the {schedule.global_batch} responses of each "
           f"step (kd.on_policy.fraction={op.fraction}; up to {op.max_new_tokens} tokens, temperature "
           f"{op.temperature:g}, top_p {op.top_p:g}; {how}); those rows train on the divergence alone")
    return r


def _rollout_engine(cfg: RunConfig, student_path: str):
    """This rank's vLLM engine for ``kd.on_policy.engine=vllm``: the student's architecture and tokenizer,
    in ``model.dtype`` (fp32 on a CPU); its weights are replaced by the trained ones at the first step."""
    from distill.teacher.vllm_engine import VLLMEngine

    op = cfg.kd.on_policy
    settings = op.vllm if op.vllm.max_model_len else dataclasses.replace(op.vllm, max_model_len=cfg.data.max_len)
    return VLLMEngine(student_path, settings, dtype=cfg.model.dtype, seed=cfg.train.seed, key="kd.on_policy.engine")


def _ids(value) -> list:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _engine(cfg: RunConfig, model, total_steps: int, ds_config: dict | None):
    if ds_config is not None:
        from distill.dist.engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg.train, total_steps, ds_config)
    from distill.dist.engine import TorchEngine

    return TorchEngine(model, cfg.train, total_steps)


def _core_teacher(cfg: RunConfig, ctx: BackendContext, zero_stage: int):
    """``kd.teacher_backend`` from the registry; the core ``colocated`` teacher where
    ``teacher.placement`` says (``ray`` switches to the Ray backend)."""
    name = cfg.kd.teacher_backend
    if name == "colocated":
        ctx.teacher_placement, why = teacher_placement(cfg, ctx, zero_stage)
        print0(f"[trainer] teacher placement={ctx.teacher_placement}"
               f"{' ' + cfg.teacher.quantization if cfg.teacher.quantization else ''}: {why}")
        if ctx.teacher_placement in ("ray", "vllm"):
            name = ctx.teacher_placement
    return teacher_factory(name)(cfg, ctx)


def _core_objective(cfg: RunConfig, vocab_size: int, teacher):
    from distill.losses.objective import DistillObjective

    k = cfg.kd
    return DistillObjective(
        kind=k.kind if k.kind != "none" else "forward_kl", beta=k.beta, alpha=k.alpha, temperature=k.temperature,
        ce_weight=k.ce_weight, kd_weight=k.kd_weight if k.kind != "none" else 0.0, impl=k.impl,
        chunk_tokens=k.chunk_tokens or None, vocab_size=vocab_size,
        student_softcap=None,  # HF forwards apply final_logit_softcapping themselves
        teacher_softcap=getattr(teacher, "softcap", None))


def local_world(env) -> int:
    """Ranks on this node: the launcher's LOCAL_WORLD_SIZE (torchrun, deepspeed), SLURM's tasks per
    node, else all ranks (one node)."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        v = os.environ.get(var, "").split("(")[0]
        if v.isdigit() and int(v) > 0:
            return min(int(v), env.world_size)
    return env.world_size


def teacher_placement(cfg: RunConfig, ctx: BackendContext, zero_stage: int) -> tuple[str, str]:
    """``teacher.placement`` resolved, with the reason: ``auto`` is decided on rank 0 from the
    memory model (:func:`distill.train.placement.auto_placement`, the two models' config.json shapes)
    and broadcast, so every rank builds the same teacher."""
    tc, env = cfg.teacher, ctx.env
    if tc.placement != "auto":
        return tc.placement, "teacher.placement"
    decision = None
    if env.is_main:
        from distill.train import placement as plan

        gpu_mem = tc.gpu_mem_gb * plan.GB or plan.rank_memory(ctx.device, local_world(env))
        t = cfg.train
        try:
            shapes = plan.load_shape(ctx.teacher_path), plan.load_shape(ctx.student_path)
        except plan.PlanError as e:
            shapes, why = None, f"auto: the shapes are unknown ({e})"
        if shapes is not None:
            decision = plan.auto_placement(
                *shapes, world=env.world_size, gpus_per_node=local_world(env), stage=zero_stage,
                gpu_mem=gpu_mem / plan.GB, seq=cfg.data.max_len, micro_batch=t.micro_batch,
                grad_accum=t.grad_accum, quantization=tc.quantization, topk=cfg.kd.topk,
                partitioned_ok=ctx.ds_config is not None)
            decision = (decision[0], f"auto: {decision[1]}")
        else:  # no shapes, no model: what the job can hold with certainty is a partitioned teacher
            decision = ("partitioned" if ctx.ds_config is not None and not tc.quantization else "replicated",
                        f"{why}; chose the placement that needs the least memory")
    return distenv.broadcast_object0(decision)


def _check_ranks_agree(cfg: RunConfig, env, tokenizer) -> None:
    """Before any model is loaded: every rank runs the same code, resolved config, world size and
    tokenizer, or all stop with one line naming the node and the difference (one gather)."""
    if not distenv.is_dist():
        return
    from importlib import metadata

    from distill.models.fingerprint import tokenizer_hash

    code = versions().get("git_sha") or f"distill {metadata.version('distill')}"
    mine = {"host": socket.gethostname(), "code": code, "world_size": env.world_size,
            "config": hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest(),
            "tokenizer": tokenizer_hash(tokenizer)}
    problem = distenv.ranks_disagree(distenv.all_gather_object(mine))
    if problem:
        raise ConfigError(problem)


def _write_run_files(cfg: RunConfig, env, ckpt: Checkpointer, ds_config: dict | None) -> dict | None:
    """Rank 0: config.yaml, ds_config.json and versions.json in the run folder (every rank stops
    with rank 0's one line when it cannot write them); the versions, recorded again in each checkpoint."""
    problem = found = None
    if env.is_main:
        found = versions()
        path = ckpt.out_dir / "config.yaml"
        try:
            dump_yaml(cfg, path)
            if ds_config is not None:
                path = ckpt.out_dir / "ds_config.json"
                path.write_text(json.dumps(ds_config, indent=2))
            path = ckpt.out_dir / "versions.json"
            path.write_text(json.dumps(found, indent=2))
        except OSError as e:
            problem = f"cannot write {path} ({os_error_text(e)}): make room or move what is there, or {RUN_FOLDER_FIX}"
    problem = distenv.broadcast_object0(problem)  # every rank stops, not rank 0 alone
    if problem:
        raise ConfigError(problem)
    return found
