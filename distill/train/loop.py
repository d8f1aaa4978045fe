"""The training loop: handed its parts, it runs optimizer steps until the schedule ends or a stop.

The step: the rank's ``grad_accum`` micro-batches are drawn first, their response tokens counted and
all-reduced once (the normaliser N of the whole optimizer step), then each micro-batch runs the
teacher (no grad) -> the student -> the objective (sum / N) -> backward; the engine applies AdamW at
the window's end. One more all-reduce carries the logged sums: what the objective reported it
optimised (its total and named parts, :class:`~distill.losses.objective.LossOutput`), the token
counts, the callbacks' sums and the stop flag. With a lean head (``kd.path=lean``) the supervised rows
are chosen first and the loss is computed inside the student's lm_head forward
(:mod:`distill.losses.lean`); otherwise the objective runs on the models' full logits.

The loop reads no config and no registry: :func:`distill.train.build.build_trainer` turns a run
config into its parts (docs/architecture.md).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.data.batching import batch_tokens, model_inputs
from distill.dist import env as distenv
from distill.dist.env import print0
from distill.dist.stop import launcher_chain, watch_for_stop
from distill.losses.lean import supervised_rows
from distill.losses.objective import count_targets
from distill.progress import is_terminal
from distill.losses.teacher_output import TopKTeacher
from distill.train.batches import to_device
from distill.train.callbacks import StallWatch
from distill.train.checkpoint import list_checkpoints

REQUEUE_EXIT = 75  # exit status of a run stopped (signal, launcher gone) after its checkpoint (EX_TEMPFAIL)
STALL_STEPS = 5  # consecutive steps with a zero gradient norm or an unmoved loss before the one warning


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the run stopped before writing anything poisoned."""


@dataclass
class LoopSettings:
    """``total_steps`` optimizer steps; a progress line every ``log_every`` steps (and the last), a
    tqdm bar on a terminal with ``progress_bar``; a checkpoint every ``checkpoint_every`` steps (0:
    only the last); ``prefetch_depth`` micro-batches the teacher's prefetch runs ahead (0: none), not
    into the next step without ``prefetch_across_steps`` (on-policy: its batches exist only once the
    student has written them, after this step's update);
    ``vocab_size`` and ``teacher_name`` check a backend's unchecked top-k ids."""

    total_steps: int
    log_every: int = 1
    progress_bar: bool = True
    checkpoint_every: int = 0
    prefetch_depth: int = 1
    prefetch_across_steps: bool = True
    vocab_size: int = 0
    teacher_name: str = "teacher"


class Trainer:
    """The loop over optimizer steps. ``train()`` runs it; ``train_step(step)`` runs one step and
    returns its record. Parts: ``engine`` (distill.dist.engine), ``batches`` (step -> this rank's CPU
    micro-batches), ``teacher`` (a distill.teacher.base.TeacherBackend or None), ``objective`` (a
    DistillObjective-like loss), ``lean_head`` (the student's LeanHead, None on the logits path),
    ``checkpointer`` (distill.train.checkpoint), ``log`` (distill.train.outputs.RunLog),
    ``callbacks`` and, for :meth:`export` / :meth:`evaluate`, ``outputs``."""

    REQUEUE_EXIT = REQUEUE_EXIT
    STALL_STEPS = STALL_STEPS

    def __init__(self, *, env, engine, batches, teacher, objective, lean_head, checkpointer, log, callbacks,
                 settings: LoopSettings, outputs=None, start_step: int = 0):
        self.env, self.device = env, torch.device(env.device)
        self.engine, self.batches, self.teacher, self.objective = engine, batches, teacher, objective
        self.lean_head, self.checkpointer, self.log = lean_head, checkpointer, log
        self.callbacks, self.settings, self.outputs = list(callbacks), settings, outputs
        self.total_steps = settings.total_steps
        self.step = start_step  # optimizer steps done
        self.history: list[dict] = []
        self._prefetched: set[tuple[int, int]] = set()
        self._stop_signals: list[str] = []  # why train() was asked to stop: a signal's name, a launcher gone
        self._launchers = launcher_chain()  # deepspeed's launch.py and CLI above this rank (if any): watched by train()
        self._stall = StallWatch(self.STALL_STEPS)

    @property
    def out_dir(self) -> Path:
        return self.checkpointer.out_dir

    @property
    def ckpt_dir(self) -> Path:
        return self.checkpointer.ckpt_dir

    def micro_batches(self, step: int) -> list[dict]:
        return self.batches(step)

    def to_device(self, batch: dict) -> dict:
        return to_device(batch, self.device)

    # -- the step -----------------------------------------------------------------------------------
    def _prefetch(self, step: int, m: int, batch: dict | None = None) -> None:
        if self.teacher is None or (step, m) in self._prefetched or step >= self.total_steps:
            return
        if not self.teacher.prefetches:
            return  # the backend has no prefetch: do not build batches for nothing
        if batch is None:
            batch = self.batches(step)[m]
        self._prefetched.add((step, m))
        self.teacher.prefetch(batch)

    def train_step(self, step: int, micro: list[dict] | None = None) -> dict:
        micro = self.batches(step) if micro is None else micro
        ga, depth = len(micro), self.settings.prefetch_depth
        n_local = sum(count_targets(b["labels"]) for b in micro)
        norm = distenv.all_reduce_sum(torch.tensor(float(n_local), device=self.device))
        for cb in self.callbacks:
            cb.begin_step(step, self.engine.lr())
        logged: dict[str, torch.Tensor] = {}  # the objective's named sums over the step's micro-batches
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)  # response tokens, tokens, stop
        self.engine.train()
        for m, cpu_batch in enumerate(micro):
            if depth:
                # this micro-batch (if not yet), then `depth` ahead, across the step boundary
                self._prefetch(step, m, cpu_batch)
                for d in range(1, depth + 1):
                    s, mm = divmod(step * ga + m + d, ga)
                    if s == step or self.settings.prefetch_across_steps:
                        self._prefetch(s, mm, micro[mm] if s == step else None)
            batch = self.to_device(cpu_batch)
            out = self._lean_loss(cpu_batch, batch, norm) if self.lean_head is not None else self._logits_loss(batch, norm)
            self.engine.backward(out.loss)
            self.engine.step()
            for name, v in out.logged().items():
                v = v.detach().double().reshape(())
                logged[name] = logged[name] + v if name in logged else v
            counts[:2] += torch.stack([out.n_tokens.double(), torch.as_tensor(batch_tokens(batch), device=self.device).double()])
        self._prefetched = {k for k in self._prefetched if k[0] > step}
        extra = {}
        for cb in self.callbacks:
            extra.update(cb.step_sums())
        # Read just before the reduce: a signal that came during this step's micro-batches stops the run
        # after this step (only one during the step's last lines waits for the next step).
        counts[2] = float(bool(self._stop_signals))
        sums = torch.cat([counts, torch.stack(list(logged.values())).to(self.device)] +
                         ([torch.stack([v.to(self.device, torch.float64).reshape(()) for v in extra.values()])]
                          if extra else []))
        distenv.all_reduce_sum(sums)
        ntok, tokens, stop, *rest = sums.tolist()  # the step's one host sync (logging, NaN check, stop)
        per_token = {name: v / max(ntok, 1.0) for name, v in zip(logged, rest[:len(logged)])}
        rec = {**per_token, "response_tokens": int(ntok), "tokens": int(tokens), "grad_norm": self.engine.grad_norm(),
               "lr": self.engine.lr(), "stop_requested": stop > 0}
        extra_sums = dict(zip(extra, rest[len(logged):]))
        for cb in self.callbacks:
            cb.end_step(rec, extra_sums)
        return rec

    def _check_topk(self, teacher_out) -> None:
        if isinstance(teacher_out, TopKTeacher) and not self.teacher.topk_ids_checked:
            teacher_out.check(self.settings.vocab_size, self.settings.teacher_name)

    def _lean_loss(self, cpu_batch: dict, batch: dict, norm):
        """Lean: supervised rows chosen from the CPU labels, the teacher at those rows, the loss
        computed inside the student's lm_head forward (distill.losses.lean)."""
        index, targets = supervised_rows(cpu_batch["labels"], self.objective.ignore_index)
        extra = {}
        if any(cpu_batch.get("on_policy") or ()):  # rows the student wrote: the divergence only, no CE
            written = torch.tensor(cpu_batch["on_policy"], dtype=torch.bool)
            extra["ce_rows"] = (~written)[index // cpu_batch["labels"].shape[1]].to(self.device, non_blocking=True)
        index = index.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        teacher_rows = self.teacher.rows(batch, index) if self.teacher is not None else None
        self._check_topk(teacher_rows)
        request = self.objective.lean_request(index, targets, teacher_rows, norm, **extra)
        with self.lean_head.pending(request):
            loss = self.engine.forward(**model_inputs(batch), use_cache=False).logits
        return self.objective.lean_output(loss, request)

    def _logits_loss(self, batch: dict, norm):
        """Logits: the models' full logits, then the chunked objective."""
        teacher_out = self.teacher(batch) if self.teacher is not None else None
        self._check_topk(teacher_out)
        logits = self.engine.forward(**model_inputs(batch), use_cache=False).logits
        return self.objective(logits, teacher_out, batch["labels"], norm)

    # -- the loop -------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Steps until the schedule's end (then the callbacks' end: evaluation, export) or a stop
        request (a checkpoint, then SystemExit(REQUEUE_EXIT)). The run folder's lock is released
        when it ends, however."""
        try:
            stopped = self._loop()
            if stopped:
                self._exit_for_requeue()
            result = {"steps": self.step, "last": self.history[-1] if self.history else {}, "out_dir": str(self.out_dir)}
            for cb in self.callbacks:
                cb.on_train_end(self.step, result)
            return result
        finally:
            self.log.close()
            for cb in self.callbacks:
                cb.close()
            self.checkpointer.release_folder()

    def _loop(self) -> bool:
        """The steps; True when a stop request ended them early (after its checkpoint)."""
        # Preemption (SLURM --signal=B:USR1@N forwarded by slurm/*.sh, scancel, the time limit), Ctrl-C, or
        # the deepspeed launcher gone (distill.dist.stop): SIGUSR1, SIGTERM, SIGINT or the launcher watch
        # only sets a flag, read after each optimizer step; the run then checkpoints and exits with
        # REQUEUE_EXIT, and a resumed run continues from that step.
        unwatch = watch_for_stop(self._stop_signals, self._launchers, announce=self.env.local_rank == 0)
        bar = None
        if self.env.is_main and self.settings.progress_bar and is_terminal():  # a redirected log gets the step lines only
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True, mininterval=1.0,
                       file=sys.stderr)
        say = bar.write if bar else print
        t_start, step0 = time.time(), self.step
        try:
            while self.step < self.total_steps:
                lr, t0 = self.engine.lr(), time.time()
                rec = self.train_step(self.step)
                stop_requested = rec.pop("stop_requested", False)
                dt = time.time() - t0
                rec["lr"] = lr  # the rate this step used
                self.step += 1
                self._check_finite(rec)
                rate = (self.step - step0) / max(time.time() - t_start, 1e-9)
                rec.update(step=self.step, tok_per_s=rec["tokens"] / max(dt, 1e-9),
                           eta_s=(self.total_steps - self.step) / max(rate, 1e-9), step_time_s=dt)
                self.history.append(rec)
                self._log_step(rec, say)
                if bar:
                    bar.update(1)
                every = self.settings.checkpoint_every
                if (every and self.step % every == 0) or self.step == self.total_steps:
                    self.save_checkpoint()
                for cb in self.callbacks:
                    cb.after_step(self.step)
                if stop_requested and self.step < self.total_steps:
                    # ranks may get the signal steps apart: all stop at the first step any of them had it
                    if not (every and self.step % every == 0):
                        self.save_checkpoint()
                    return True
            return False
        finally:
            unwatch()
            if bar:
                bar.close()
            if self.teacher is not None:
                self.teacher.close()

    def _check_finite(self, rec: dict) -> None:
        gn = rec["grad_norm"]
        if math.isfinite(rec["loss"]) and (gn is None or math.isfinite(gn)):
            return
        good = list_checkpoints(self.ckpt_dir)
        msg = (f"non-finite {'loss' if not math.isfinite(rec['loss']) else 'gradient norm'} at step "
               f"{self.step} (loss={rec['loss']}, grad_norm={gn}); stopped without saving. Last good "
               f"checkpoint: {good[-1] if good else 'none'}")
        print0(f"[trainer] {msg}")
        raise TrainingDiverged(msg)

    def _log_step(self, rec: dict, say) -> None:
        gn = rec["grad_norm"]
        if self.env.is_main and (self.step % self.settings.log_every == 0 or self.step == self.total_steps):
            extra = "".join(cb.line_extra(rec) for cb in self.callbacks)
            say(f"step {self.step}/{self.total_steps} | loss {rec['loss']:.4f} | ce {rec['ce']:.4f} | "
                f"kd {rec['kd']:.4f} | lr {rec['lr']:.2e} | gnorm {gn if gn is None else f'{gn:.3f}'} | "
                f"tok/s {rec['tok_per_s']:.0f} | eta {_fmt_eta(rec['eta_s'])}{extra}")
            self.log.step(rec, self.step)
        stall = self._stall.update(self.step, rec["loss"], gn)
        if stall and self.env.is_main:
            say(f"[trainer] warning: {stall}")

    def _exit_for_requeue(self) -> None:
        name = self._stop_signals[0] if self._stop_signals else "a stop request on another rank"
        print0(f"[trainer] {name}: checkpoint at step {self.step}/{self.total_steps} saved; exiting with "
               f"status {REQUEUE_EXIT} (requeue, then resume with checkpoint.resume=latest)")
        self.log.close()  # before the process group goes
        for cb in self.callbacks:
            cb.close()
        self.checkpointer.release_folder()
        distenv.exit_process(REQUEUE_EXIT)

    # -- what the run leaves ----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        return self.checkpointer.save(self.step, self.history[-1] if self.history else None)

    def gathered_state_dict(self) -> dict | None:
        return self.outputs.gathered_state_dict()

    def export(self, out: str | Path | None = None) -> Path:
        return self.outputs.export(self.step, out)

    def evaluate(self, final: bool = False) -> dict | None:
        return self.outputs.evaluate(self.step, final)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
