"""The engine seam: one interface over a DeepSpeed engine and a plain torch engine.

The trainer calls, per micro-batch, ``forward`` -> ``backward(loss)`` -> ``step()``; the engine
applies the optimizer at the end of each accumulation window. The loss handed to ``backward`` is
already divided by the number of response tokens of the WHOLE optimizer step (all micro-batches,
all ranks), so the gradient wanted is the plain SUM of the micro-batch gradients over micro-batches
and ranks. The plain engine does exactly that. DeepSpeed divides each micro-batch loss by the
accumulation steps and AVERAGES gradients over data-parallel ranks; :class:`DeepSpeedEngine`
undoes both (``scale_wrt_gas=False`` and ``loss * world_size``), so both engines give sum / N.

Frozen teachers get :class:`TeacherEngine`: under ZeRO-3 an inference-only DeepSpeed engine (no
optimizer, no gradients; parameters partitioned and gathered layer by layer during the forward),
otherwise the module itself on the device. Its forward always runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch


def make_lr_lambda(total_steps: int, warmup: int, schedule: str, min_ratio: float):
    """LR multiplier at optimizer step s (0-based): linear warmup, then cosine to ``min_ratio``."""

    def f(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        if schedule == "constant" or total_steps <= warmup:
            return 1.0
        p = min(1.0, (s - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))

    return f


def build_optimizer(params, train_cfg, *, cpu_adam: bool = False):
    kw = dict(lr=train_cfg.lr, betas=tuple(train_cfg.adam_betas), eps=train_cfg.adam_eps,
              weight_decay=train_cfg.weight_decay)
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # offloaded optimizer states need it

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
    params = list(params)
    # One fused kernel per step on CUDA and on CPU (torch >= 2.4 has both; HF Trainer's default since
    # torch 2.8): torch's default on CPU is a per-parameter loop whose temporaries (sqrt, div of each
    # [V, H] embedding) made it 8x slower than the fused step, ~25% of a few-supervised-rows KD step
    # on a 2-core CPU (docs/trainer.md, "Where a step's time goes").
    fused = bool(params) and params[0].device.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, fused=fused, **kw)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2; the same norm, the same factor), except that on the CPU
    the gradients are only rewritten when the factor is below 1: reading the norm there costs no
    device sync, and torch multiplies every gradient by the clamped factor even when it is 1 (a
    read-and-write pass over all of them, ~2% of a few-rows KD step on a 2-core CPU)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or any(g.device.type != "cpu" for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = max_norm / (total + 1e-6)  # as torch: 1e-6 keeps a zero norm finite
    if not float(coef) >= 1.0:  # NaN (a non-finite norm) multiplies too, as in torch
        for g in grads:
            g.mul_(coef)
    return total


class Engine:
    """Interface. ``module`` is the wrapped model (HF ``PreTrainedModel`` or a DeepSpeed module)."""

    module: torch.nn.Module
    kind = "?"

    def forward(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> bool:
        """Call after every micro-batch; True when the optimizer ran (end of the window)."""
        raise NotImplementedError

    def grad_norm(self) -> float | None:
        """Global gradient norm before clipping of the last optimizer step (None if unknown)."""
        return None

    def lr(self) -> float:
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        raise NotImplementedError

    def gather_state_dict(self) -> dict | None:
        """Full model state dict on rank 0 (None on other ranks). Collective under ZeRO-3."""
        raise NotImplementedError

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    @contextlib.contextmanager
    def generation(self):
        """The student as a plain model to sample from: eval mode, no gradients; the train mode is
        restored after. Under ZeRO-3 (:class:`DeepSpeedEngine`) every rank must enter it together."""
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                yield self.module
        finally:
            self.module.train(was_training)


class TorchEngine(Engine):
    """Plain single-process engine: AdamW, LambdaLR schedule, clipping, accumulation."""

    kind = "torch"

    def __init__(self, model, train_cfg, total_steps: int):
        self.module = model
        self.optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], train_cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, make_lr_lambda(total_steps, train_cfg.warmup_steps, train_cfg.schedule, train_cfg.min_lr_ratio))
        self.gas, self.clip = train_cfg.grad_accum, train_cfg.grad_clip
        self._micro = 0
        self._gnorm = None

    def backward(self, loss):
        loss.backward()

    def step(self) -> bool:
        self._micro += 1
        if self._micro % self.gas:
            return False
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.clip if self.clip > 0 else float("inf")
        self._gnorm = clip_grad_norm(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def grad_norm(self):
        return None if self._gnorm is None else float(self._gnorm)

    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def save(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_model

        # save_model stores tied parameters (lm_head tied to embed_tokens) once; save_file refuses them
        save_model(self.module, str(folder / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   folder / "optim.pt")

    def load(self, folder):
        from safetensors.torch import load_model

        load_model(self.module, str(folder / "model.safetensors"), strict=True)
        st = torch.load(folder / "optim.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        # A checkpoint is written between optimizer steps, so the next micro-batch starts a new step
        # whatever the saved count was: taking it modulo another grad_accum (a resume with another
        # micro_batch x grad_accum split of the same global batch) would step mid-batch.
        self._micro = 0

    def gather_state_dict(self):
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}


class DeepSpeedEngine(Engine):
    """A DeepSpeed engine (ZeRO 0-3) with the trainer's AdamW and warmup/cosine schedule."""

    kind = "deepspeed"

    def __init__(self, model, train_cfg, total_steps: int, ds_config: dict):
        import deepspeed

        from distill.dist.ds_config import offloads_optimizer

        params = [p for p in model.parameters() if p.requires_grad]
        opt = build_optimizer(params, train_cfg, cpu_adam=offloads_optimizer(ds_config))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, make_lr_lambda(total_steps, train_cfg.warmup_steps, train_cfg.schedule, train_cfg.min_lr_ratio))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
        self.module = self.engine.module
        self.world = self.engine.dp_world_size if hasattr(self.engine, "dp_world_size") else int(os.environ.get("WORLD_SIZE", 1))
        self.stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))

    def forward(self, **inputs):
        return self.engine(**inputs)

    def backward(self, loss):
        # DeepSpeed averages gradients over data-parallel ranks: multiply by their number so the
        # result is the SUM; and do not let it divide by the accumulation steps.
        self.engine.backward(loss * self.world, scale_wrt_gas=False)

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    def grad_norm(self):
        g = self.engine.get_global_grad_norm()
        if g is None:
            return None
        return float(g.item() if isinstance(g, torch.Tensor) else g)

    def lr(self):
        return self.engine.get_lr()[0]

    def save(self, folder):
        self.engine.save_checkpoint(str(folder), tag="engine", save_latest=False)

    def load(self, folder, *, universal: bool = False):
        """``folder`` as saved (same data-parallel world), or, with ``universal``, the output of
        :func:`to_universal` (any world size: each rank slices its partition from whole tensors)."""
        cfg = self.engine._config
        # 2026-12, DeepSpeed 0.19.8: `checkpoint.load_universal` is read only inside load_checkpoint, so it is set
        # for this one load instead of in the ds_config: the engine was built before the resume
        # knew which kind of checkpoint it would get.
        before = cfg.load_universal_checkpoint
        cfg.load_universal_checkpoint = universal
        try:
            path, _ = self.engine.load_checkpoint(str(folder), tag="engine", load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        finally:
            cfg.load_universal_checkpoint = before
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")

    def gather_state_dict(self):
        if self.stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()  # collective; full dict on rank 0
            return sd if self.engine.global_rank == 0 else None
        if self.engine.global_rank != 0:
            return None
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def train(self):
        self.engine.train()

    def eval(self):
        self.engine.eval()

    @contextlib.contextmanager
    def generation(self):
        """Under ZeRO-3 the partitioned weights are gathered ONCE for the whole block and ZeRO's
        per-module hooks are lifted (DeepSpeed's ``unwrap_model_for_generation``), so sampling token by
        token does not gather every layer for every token; leaving the block re-partitions them (the
        memory of the full weights is returned). A collective: every rank enters it, even one with
        nothing to generate. ZeRO 0-2 hold whole weights: the module as it is."""
        if self.stage != 3:
            with super().generation() as module:
                yield module
            return
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        with unwrap_model_for_generation(self.engine), super().generation() as module:
            yield module


def to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's universal checkpoint (``deepspeed.checkpoint.ds_to_universal``) of the engine
    folder ``src`` (``save`` output: ``src/engine/*``) written to ``dst/engine/``: per parameter the
    whole fp32 weight, Adam ``exp_avg`` and ``exp_avg_sq`` (``dst/engine/zero/<name>/*.pt``) merged
    from every rank's ZeRO partition, plus the step / lr-scheduler / param-group state. ``src`` is only
    read. One process, no workers (the extraction is I/O-bound and rank 0 converts while the others
    wait); DeepSpeed's progress lines go to this process's stdout. ``inject_missing_state``: a ZeRO-1/2
    checkpoint of a model without tensor or pipeline parallelism carries no ``universal_checkpoint_info``
    (Megatron's models set it), and the version-only record the converter injects is the complete
    description of a data-parallel-only model; ZeRO-3 checkpoints do not need it."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main

    main(argparse.Namespace(input_folder=str(src / "engine"), output_folder=str(dst / "engine"),
                            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                            inject_missing_state=True))


class TeacherEngine:
    """A frozen model for inference: ZeRO-3 partitioned (inference-only engine) or plain."""

    def __init__(self, model, *, ds_config: dict | None = None):
        model.eval()
        model.requires_grad_(False)
        self.engine = None
        if ds_config is not None:
            import deepspeed

            # No optimizer: DeepSpeed builds a ZeRO-3 parameter partitioner and forward hooks only
            # (the reference-model pattern of TRL/OpenRLHF); nothing is allocated for gradients.
            self.engine, *_ = deepspeed.initialize(model=model, config=ds_config)
            self.engine.eval()
            self.module = self.engine.module
        else:
            self.module = model

    @torch.no_grad()
    def forward(self, **inputs):
        if self.engine is not None:
            return self.engine(**inputs)
        return self.module(**inputs)

    @torch.no_grad()
    def final_hidden(self, **inputs) -> torch.Tensor:
        """The decoder's last hidden states ``[B, L, H]`` (after its final norm), no lm_head.

        Under ZeRO-3 the decoder's own module hooks gather and release each layer as it runs.
        """
        return self.module.get_decoder()(**inputs)[0]

    @contextlib.contextmanager
    def output_head(self):
        """``(weight [V, H], bias or None)`` of the lm_head, whole for the duration of the block.

        Under ZeRO-3 the partitioned weight (tied to the embedding or not) is all-gathered once by
        ``deepspeed.zero.GatheredParameters`` and released on exit; otherwise it is the module's own.
        """
        head = self.module.get_output_embeddings()
        bias = getattr(head, "bias", None)
        if self.engine is None:
            yield head.weight, bias
            return
        import deepspeed

        params = [head.weight] + ([bias] if bias is not None else [])
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield head.weight, bias
