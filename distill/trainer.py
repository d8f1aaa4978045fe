"""One trainer for SFT and token-level KD: DeepSpeed ZeRO-3 (or a plain torch engine), co-located or
remote teachers, global token normalisation, atomic checkpoints, resume, export.

What varies is registered, not copied:

* teacher backends (``register_teacher_backend(name)``): turn a batch into teacher logits
  ``[B, L, V]`` or a :class:`~distill.losses.teacher_output.TopKTeacher` ``[B, L, k]`` aligned with the
  batch's ``input_ids`` positions; ``rows(batch, index)`` gives the teacher at the flat supervised
  positions only (``kd.path=lean``). Optional ``prefetch(batch)`` is called exactly once per
  micro-batch, ahead of its use (async backends start the request there); ``close()`` at the end. Built in: ``colocated`` (the teacher lives in this process,
  partitioned by an inference-only ZeRO-3 engine or replicated per rank: ``teacher.placement``) and
  ``ray`` (a Ray service shared by all ranks, serving top-k; ``teacher.placement=ray``).
* datasets (``register_dataset(name)``): ``factory(cfg, tokenizer, ctx)`` returns an object with
  ``__len__`` and ``__getitem__`` -> dict with ``input_ids`` and ``labels`` lists (plus any
  pass-through keys, e.g. ``example_id``) and optionally ``collate(items) -> batch``. Built in:
  ``sft`` (:mod:`distill.data.sft`).
* a stage's :class:`TrainerHooks` (``Trainer(cfg, hooks=...)``): its objective, prefetch depth and
  logged device sums (ICLDist).

The step: the rank's ``grad_accum`` micro-batches are drawn first, their response tokens counted
and all-reduced once (the normaliser N of the whole optimizer step), then each micro-batch runs
the teacher (no grad) -> the student -> the objective (sum / N) -> backward; the engine applies AdamW
at the window's end. One more all-reduce carries the logged sums. With ``kd.path=lean`` (default)
the supervised rows are chosen first and the loss is computed inside the student's lm_head forward
from their hidden states (:mod:`distill.losses.lean`); ``kd.path=logits`` runs the objective on the
models' full logits.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from distill.config import ConfigError, RunConfig, dump_yaml, flatten, to_dict
from distill.dist import env as distenv
from distill.dist.env import print0
from distill.dist.stop import launcher_chain, watch_for_stop
from distill.errors import UserError
from distill.fileio import atomic_write_text, folder_problem, fsync_dir, os_error_text, sha256_file
from distill.progress import is_terminal
from distill.runinfo import versions
from distill.losses.teacher_output import TopKTeacher

# ------------------------------------------------------------------------------------------------
# Registries


TEACHER_BACKENDS: dict[str, Callable] = {}
# Built-in backends with heavy imports, registered when a run names them: name -> module.
LAZY_BACKENDS = {"ray": "distill.teacher.ray_backend", "cache": "distill.knowdist.topk_cache"}
DATASETS: dict[str, Callable] = {}


def register_teacher_backend(name: str):
    """Decorator: ``factory(cfg: RunConfig, ctx: BackendContext) -> TeacherBackend``."""

    def deco(factory):
        TEACHER_BACKENDS[name] = factory
        return factory

    return deco


def register_dataset(name: str):
    """Decorator: ``factory(cfg: RunConfig, tokenizer, ctx: BackendContext) -> dataset``."""

    def deco(factory):
        DATASETS[name] = factory
        return factory

    return deco


@dataclasses.dataclass
class BackendContext:
    """What a backend or dataset factory may need from the trainer."""

    env: Any  # distill.dist.env.DistEnv
    device: torch.device  # this rank's device
    tokenizer: Any  # the shared tokenizer
    vocab_size: int  # the tokenizer's real vocabulary
    student_path: str  # resolved student folder/name
    teacher_path: str  # resolved teacher folder/name ("" for SFT)
    ds_config: dict | None  # the student's resolved DeepSpeed config (None on the torch engine)
    out_dir: Path  # run folder
    hooks: "TrainerHooks | None" = None  # the stage's plug-ins (Trainer(cfg, hooks=...))
    teacher_placement: str = "replicated"  # resolved teacher.placement (never auto): partitioned | replicated | ray
    dataset: Any = None  # the run's training dataset, once built (teacher backends are built after it)


class TeacherBackend:
    """Base class. ``softcap``: final-logit softcap the objective must still apply to what
    ``__call__`` returns (None when the logits are already capped, as HF Gemma-2 forwards are)."""

    softcap: float | None = None
    # True when the backend's top-k ids are valid by construction (or checked where they enter);
    # otherwise the trainer checks every TopKTeacher it returns (TopKTeacher.check) before the loss.
    topk_ids_checked: bool = False

    def prefetch(self, batch: dict) -> None:  # noqa: D401 - optional hook
        """Start work for ``batch`` (CPU tensors + pass-through keys); called once, ahead of use."""

    def __call__(self, batch: dict):
        raise NotImplementedError

    def rows(self, batch: dict, index: torch.Tensor):
        """The teacher at the flat positions ``index`` [N] of the batch only (``kd.path=lean``): a
        TopKTeacher ``[N, k]``, a :class:`~distill.losses.lean.HiddenTeacher` or logits ``[N, V]``.
        This default indexes what ``__call__`` returns; backends that can skip the other positions
        override it (``colocated`` does)."""
        from distill.losses.lean import topk_rows

        out = self(batch)
        if isinstance(out, TopKTeacher):
            return topk_rows(out, index)
        return out.reshape(-1, out.shape[-1]).index_select(0, index)

    def close(self) -> None:
        pass


class TrainerHooks:
    """What a stage plugs into the trainer beyond its registered dataset and teacher backend
    (ICLDist does: distill.icldist.stage). Pass an instance as ``Trainer(cfg, hooks=...)``; factories
    reach it as ``ctx.hooks``. Every method has the core behaviour as its default.

    * ``objective(trainer)``: the loss object, or None for the core :class:`DistillObjective` from
      ``cfg.kd``. It provides ``ignore_index``, ``lean_request(index, targets, teacher_rows, norm)`` /
      ``lean_output(loss, request)`` (``kd.path=lean``) and ``__call__(logits, teacher_out, labels,
      norm)`` (``kd.path=logits``), each returning a :class:`~distill.losses.objective.LossOutput`.
    * ``prefetch_depth``: micro-batches the teacher backend's ``prefetch`` runs ahead (0: none).
    * ``step_sums()``: named device scalars the hooks accumulated during the step; they ride the
      step's one all-reduce (no extra host sync) and come back summed over ranks to
      ``end_step(record, sums)``, which adds logged values to the step's record; ``line_extra(record)``
      is appended to the step's progress line.
    * ``prepare_student(trainer, model)``: called once the student is loaded, before its engine is
      built: modules attached to it here (distill.multiteacher's gate) are optimised, partitioned and
      checkpointed with it; ``student_state_dict(sd)`` then turns the gathered state dict into the
      exported / evaluated model's (e.g. drops those modules' keys).
    * ``state_dict()`` / ``load_state_dict(state)``: the hooks' own state (same on every rank), saved
      by rank 0 in each checkpoint (``hooks_state.pt``, when not empty) and loaded on resume.
    """

    prefetch_depth: int = 1

    def prepare_student(self, trainer: "Trainer", model: torch.nn.Module) -> None:
        pass

    def student_state_dict(self, sd: dict) -> dict:
        return sd

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def line_extra(self, record: dict) -> str:
        return ""

    def objective(self, trainer: "Trainer"):
        return None

    def begin_step(self) -> None:
        pass

    def step_sums(self) -> dict[str, torch.Tensor]:
        return {}

    def end_step(self, record: dict, sums: dict[str, float]) -> None:
        pass


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the run stopped before writing anything poisoned."""


# ------------------------------------------------------------------------------------------------
# Built-in teacher backend and dataset


@register_teacher_backend("colocated")
class ColocatedTeacher(TeacherBackend):
    """The frozen teacher in this process: full logits (or top-k when ``kd.topk`` > 0).

    ``ctx.teacher_placement`` (``teacher.placement``, resolved by the trainer): ``partitioned``, an
    inference-only DeepSpeed ZeRO-3 engine over the ranks (no optimizer, no gradients; every
    micro-batch gathers its layers); ``replicated``, a copy per rank, in ``model.teacher_dtype`` or
    bitsandbytes 8-bit / 4-bit weights (``teacher.quantization``). Forward under ``torch.no_grad()``.
    Its top-k comes from ``torch.topk`` over the real vocabulary: valid ids by construction.
    """

    topk_ids_checked = True

    def __init__(self, cfg: RunConfig, ctx: BackendContext):
        from distill.dist.engine import TeacherEngine
        from distill.models import load as ml

        on_gpu = ctx.device.type == "cuda"
        tdtype = cfg.model.teacher_dtype_name()
        zero3 = None
        if ctx.teacher_placement == "partitioned":
            if ctx.ds_config is None:
                raise ConfigError("teacher.placement=partitioned needs deepspeed.engine=deepspeed (the teacher is a "
                                  "ZeRO-3 inference engine); use teacher.placement=replicated")
            from distill.dist.ds_config import teacher_ds_config

            zero3 = teacher_ds_config(ctx.ds_config, ml.resolve_dtype(tdtype, on_gpu))
        elif ctx.teacher_placement != "replicated":
            raise ConfigError(f"the colocated teacher backend holds a partitioned or replicated teacher, not "
                              f"teacher.placement={ctx.teacher_placement}")
        self.placement = ctx.teacher_placement
        ml.check_teacher_tokenizer(ctx.teacher_path, ctx.tokenizer, student_name=ctx.student_path,
                                   trust_remote_code=cfg.model.trust_remote_code)
        model = ml.load_causal_lm(
            ctx.teacher_path, dtype=ml.resolve_dtype(tdtype, on_gpu), attn=ml.resolve_attn(cfg.model.attn, on_gpu),
            device=str(ctx.device), trust_remote_code=cfg.model.trust_remote_code, zero3_config=zero3,
            quantization=cfg.teacher.quantization, what="teacher folder (model.teacher)")
        ml.check_embedding_rows(model.config, ctx.vocab_size, f"teacher {ctx.teacher_path}")
        self.config = model.config
        self.softcap = None  # HF forwards apply final_logit_softcapping themselves
        self.engine = TeacherEngine(model, ds_config=zero3)
        self.topk = cfg.kd.topk
        self.temperature = cfg.kd.temperature
        self.vocab_size = ctx.vocab_size
        self.chunk_rows = cfg.kd.chunk_tokens or None
        self.scale, self.cap = ml.logit_transform(model)
        self._head_checked = False

    @torch.no_grad()
    def __call__(self, batch):
        if self.topk:
            return self.topk_on_supervised(batch)
        return self.engine.forward(**model_inputs(batch), use_cache=False).logits

    @torch.no_grad()
    def rows(self, batch, index):
        """``kd.path=lean``: the decoder's final hidden states at the flat positions ``index`` only;
        with ``kd.topk`` their TopKTeacher ``[N, k]`` (the head a chunk at a time), else a
        HiddenTeacher whose head the student's loss applies inside its own chunk loop. Neither the
        teacher's [tokens x V] logits nor fp32 copies of them exist."""
        from distill.losses.lean import HiddenTeacher

        hidden = self.engine.final_hidden(**model_inputs(batch), use_cache=False)
        self._check_head_once(batch, hidden)
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        if self.topk:
            return self._topk_of_rows(flat)
        return HiddenTeacher(flat, self.engine.output_head, self.scale, self.cap)

    @torch.no_grad()
    def topk_on_supervised(self, batch, ignore_index: int = -100):
        """``kd.path=logits`` with ``kd.topk``: TopKTeacher ``[B, L, k]`` computed only at the
        positions whose next token is supervised (the objective's shifted labels); other rows hold a
        filler (ids 0..k-1, uniform) that the objective masks out."""
        labels = batch["labels"]
        sup = torch.zeros_like(labels, dtype=torch.bool)
        sup[:, :-1] = labels[:, 1:] != ignore_index
        hidden = self.engine.final_hidden(**model_inputs(batch), use_cache=False)
        self._check_head_once(batch, hidden)
        t = self._topk_of_rows(hidden[sup])
        B, L = labels.shape
        k, dev = self.topk, hidden.device
        out_ids = torch.arange(k, dtype=torch.int32, device=dev).expand(B, L, k).clone()
        out_lp = torch.full((B, L, k), -math.log(k), dtype=torch.float32, device=dev)
        out_tail = torch.zeros((B, L), dtype=torch.float32, device=dev)
        out_ids[sup], out_lp[sup], out_tail[sup] = t.ids.to(torch.int32), t.logprobs, t.tail_mass
        return TopKTeacher(ids=out_ids, logprobs=out_lp, tail_mass=out_tail, temperature=self.temperature)

    def _topk_of_rows(self, rows: torch.Tensor) -> TopKTeacher:
        """TopKTeacher ``[N, k]`` of hidden ``rows [N, H]`` at the temperature of use over the
        tokenizer's real vocabulary; the lm_head runs on ``chunk`` rows at a time (about 32 MiB of
        fp32 logits), inside one gather of the head under ZeRO-3."""
        from distill.losses.divergences import default_chunk_tokens

        k, T, vocab = self.topk, self.temperature, self.vocab_size
        chunk = self.chunk_rows or default_chunk_tokens(vocab)
        parts = []
        with self.engine.output_head() as (weight, bias):
            for i in range(0, rows.shape[0], chunk):
                parts.append(TopKTeacher.from_logits(self._logits(rows[i:i + chunk], weight, bias), k, temperature=T,
                                                     vocab_size=vocab))
        if not parts:
            empty = rows.new_zeros((0, k))
            return TopKTeacher(ids=empty.to(torch.int32), logprobs=empty.float(), tail_mass=rows.new_zeros(0).float(),
                               temperature=T)
        return TopKTeacher(ids=torch.cat([p.ids for p in parts]), logprobs=torch.cat([p.logprobs for p in parts]),
                           tail_mass=torch.cat([p.tail_mass for p in parts]), temperature=T)

    def _check_head_once(self, batch, hidden) -> None:
        """Once: the model's own forward at the last position equals lm_head(final hidden) as
        computed here (scale, softcap), so an architecture that post-processes its logits differently
        is refused, not mis-distilled."""
        if self._head_checked:
            return
        own = self.engine.forward(**model_inputs(batch), use_cache=False, logits_to_keep=1).logits[:, -1].float()
        with self.engine.output_head() as (weight, bias):
            self._check_head(own, hidden, weight, bias)

    def _logits(self, h, weight, bias):
        x = torch.nn.functional.linear(h, weight, bias)
        if self.scale != 1.0:
            x = x * self.scale
        if self.cap is not None:
            x = torch.tanh(x / self.cap) * self.cap
        return x

    def _check_head(self, own, hidden, weight, bias) -> None:
        """Once: the model's own forward (``own``: last position only) equals lm_head(final hidden) as
        computed here, so an architecture that post-processes its logits differently is refused, not
        mis-distilled."""
        mine = self._logits(hidden[:, -1], weight, bias).float()
        tol = 1e-3 if weight.dtype == torch.float32 else 5e-2
        err = float((own - mine).abs().max())
        if err > tol * max(1.0, float(own.abs().max())):
            raise RuntimeError(
                f"teacher {type(self.engine.module).__name__}: its logits differ from lm_head(final hidden) "
                f"(max |diff| {err:.3g}); the chunked teacher head cannot reproduce this architecture's "
                f"head: use kd.topk=0 and kd.path=logits (full logits of the model's own forward)")
        self._head_checked = True


@register_dataset("sft")
def _sft_dataset(cfg: RunConfig, tokenizer, ctx: BackendContext):
    from distill.data.sft import SFTDataset, read_records

    d = cfg.data
    if not d.path:
        from distill.data.sft import DataError

        raise DataError("data.path is empty: give a JSONL/JSON/Parquet file, a folder of them, or a datasets name")
    recs = read_records(d.path, d.format, prompt_field=d.prompt_field, response_field=d.response_field,
                        split=d.split, limit=d.limit, allow_partial=d.allow_partial)
    return SFTDataset(recs, tokenizer, d.max_len, d.add_eos)


# ------------------------------------------------------------------------------------------------
# Helpers


_FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                 "max_length_k")


def _local_world(env) -> int:
    """Ranks on this node: the launcher's LOCAL_WORLD_SIZE (torchrun, deepspeed), SLURM's tasks per
    node, else all ranks (one node)."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        v = os.environ.get(var, "").split("(")[0]
        if v.isdigit() and int(v) > 0:
            return min(int(v), env.world_size)
    return env.world_size


def model_inputs(batch: dict) -> dict:
    """The forward's inputs of a batch: ``input_ids`` and, when the batch has them, ``attention_mask``
    (absent in packed batches: transformers then keeps packed examples apart from the
    ``position_ids``, distill.data.packing) and flash-attention's varlen bounds of packed batches."""
    return {k: batch[k] for k in _FORWARD_KEYS if batch.get(k) is not None}


def batch_tokens(batch: dict) -> int | torch.Tensor:
    """Real (non-pad) tokens of a batch: ``n_tokens`` of a packed batch, else the attention mask's sum."""
    return batch["n_tokens"] if "n_tokens" in batch else batch["attention_mask"].sum()


def _rng_state() -> dict:
    st = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        st["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "numpy" in st:
        import numpy as np

        np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


CKPT_PREFIX = "step_"
_RESUME_LATEST = ("latest", "auto", "true", "True")  # checkpoint.resume values meaning "the newest in dir"


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from (incomplete, damaged, or of another batch layout)."""


class RunWriteError(UserError):
    """A file of the run could not be written (a checkpoint, metrics.jsonl, the export): a full disk,
    a read-only or vanished folder. The message names the file and the newest intact checkpoint."""


def _checkpoint_step(p: Path) -> int | None:
    """N of a ``step_N`` folder name, None for any other name (``.tmp-step_N``, ``replaced-step_N-...``)."""
    tail = p.name[len(CKPT_PREFIX):]
    return int(tail) if p.name.startswith(CKPT_PREFIX) and tail.isdigit() else None


def _checkpoint_dirs(ckpt_dir: Path) -> list[Path]:
    """Every ``step_N`` folder, complete or not, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    out = [p for p in ckpt_dir.iterdir() if p.is_dir() and _checkpoint_step(p) is not None]
    return sorted(out, key=_checkpoint_step)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints (a ``trainer_state.json`` inside), oldest first."""
    return [p for p in _checkpoint_dirs(ckpt_dir) if (p / "trainer_state.json").is_file()]




def _manifest(folder: Path, *, sha256: bool) -> dict:
    """``{relative path: {"size": bytes[, "sha256": hex]}}`` of every file in ``folder`` but trainer_state.json."""
    out = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if f.is_file() and rel != "trainer_state.json":
            out[rel] = {"size": f.stat().st_size, **({"sha256": sha256_file(f)} if sha256 else {})}
    return out


def _verify_checkpoint(path: Path, *, sha256: bool) -> str | None:
    """Why ``path`` cannot be resumed from ("<file>: <reason>"), None when its files match its manifest.

    Sizes are always checked (one stat per file, cheap for multi-GB checkpoints); hashes only with
    ``sha256`` and only where the save recorded them. A checkpoint written before manifests existed
    (no ``files`` in trainer_state.json) cannot be verified here: only the engine's load can fail."""
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{state_file}: unreadable ({type(e).__name__}: {e})"
    for rel, want in (state.get("files") or {}).items():
        f = path / rel
        try:
            size = f.stat().st_size
        except OSError:
            return f"{f}: missing"
        if size != want["size"]:
            return f"{f}: {size} bytes, the save wrote {want['size']}"
        if sha256 and "sha256" in want and sha256_file(f) != want["sha256"]:
            return f"{f}: sha256 differs from the one recorded at save"
    return None


def _probe_files(folder: Path) -> str | None:
    """After a failed load: the first file of ``folder`` that does not open ("<file>: <reason>"), so
    the message names it (torch.load / safetensors errors do not). Headers only (mmap), cheap."""
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            if f.stat().st_size == 0:
                return f"{f}: empty (0 bytes)"
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), "pt") as h:
                    h.keys()
            elif f.suffix in (".pt", ".bin", ".pth"):
                torch.load(f, map_location="cpu", weights_only=False, mmap=True)
            elif f.suffix == ".json":
                json.loads(f.read_text())
        except Exception as e:  # noqa: BLE001 - any failure to open is the answer
            return f"{f}: unreadable ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
    return None


# Free bytes under which a failed write whose error does not say why (torch.save reports a full disk
# as "RuntimeError: ... unexpected pos", safetensors as "SafetensorError: ... os error 28") is taken
# for a full disk; a write that fails with more room left is not ours to explain and keeps its traceback.
FULL_DISK_BYTES = 16 << 20


def _failed_write(write: Callable[[], Any], folder: Path) -> str | None:
    """Run ``write``; ``"<path>: <reason>"`` when it failed for lack of space or permission (an
    OSError, or a library's error on a file system with no room left), None when it succeeded.
    Any other exception propagates."""
    try:
        write()
        return None
    except OSError as e:
        return f"{e.filename or folder}: {os_error_text(e)}"
    except Exception as e:  # noqa: BLE001 - re-raised below unless the disk is full
        text = str(e).strip()
        free = _free_bytes(folder)
        if (free is not None and free < FULL_DISK_BYTES) or "os error 28" in text or "No space left" in text:
            first = text.splitlines()[0][:160] if text else ""
            return (f"{folder}: no space left on device (ENOSPC; {free} bytes free; "
                    f"{type(e).__name__}: {first})")
        raise


def _free_bytes(folder: Path) -> int | None:
    """Free bytes of the file system holding ``folder`` (or its nearest existing parent); None if unknown."""
    try:
        return shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.exists())).free
    except (OSError, StopIteration):
        return None


class StallWatch:
    """Watches for a run that trains nothing: ``n`` optimizer steps in a row whose gradient norm is 0
    or whose loss did not move (relative change <= 1e-7) give one warning, once per run."""

    def __init__(self, n: int):
        self.n = n
        self.prev: float | None = None  # the previous step's loss
        self.count = 0  # steps in the current run of such steps
        self.first = 0  # its first step
        self.all_zero = self.all_still = True  # every step of it had a zero norm / an unmoved loss
        self.warned = False

    def update(self, step: int, loss: float, grad_norm: float | None) -> str | None:
        """Step ``step``'s numbers; the warning text the first time the streak reaches ``n``, else None."""
        zero = grad_norm is not None and grad_norm == 0.0
        still = self.prev is not None and abs(loss - self.prev) <= 1e-7 * max(1.0, abs(loss))
        self.prev = loss
        if not (zero or still):
            self.count = 0
            return None
        if self.count == 0:
            # the streak's first step is compared with the step before it, which may have moved: its
            # own "still" counts only when the streak is that one step
            self.first, self.all_zero, self.all_still = step, zero, still
        else:
            self.all_zero &= zero
            self.all_still = still if self.count == 1 else self.all_still and still
        self.count += 1
        if self.warned or self.count < self.n:
            return None
        self.warned = True
        what = " and ".join(x for x, on in (("the gradient norm was 0", self.all_zero),
                                            (f"the loss did not move from {loss:.6g}", self.all_still)) if on) or \
            "the gradient norm was 0 or the loss did not move"
        return (f"steps {self.first}-{step}: {what} ({self.n} steps in a row): nothing is being trained. Likely causes: "
                f"a learning rate of 0, every student parameter frozen (requires_grad=False), or every label masked "
                f"(-100, no response token in the batches); check the schedule, the model set-up and the data")


def _first_error_all_ranks(why: str | None) -> str | None:
    """The first rank's failure (None when every rank succeeded), the same on every rank."""
    whys = distenv.all_gather_object(why)
    return next((w if r == 0 else f"rank {r}: {w}" for r, w in enumerate(whys) if w), None)


RUN_FOLDER_FIX = "pick another --run.out_dir (or make this one a writable folder)"


def checkpoint_folder_words(cfg: RunConfig) -> tuple[str, str]:
    """(what, fix) naming the checkpoint folder in a message: checkpoint.dir, or its default."""
    if cfg.checkpoint.dir:
        return "checkpoint folder (checkpoint.dir)", "pick another --checkpoint.dir (or make this one a writable folder)"
    return ("checkpoint folder (checkpoint.dir, default <run.out_dir>/checkpoints)",
            "move what is there, or give --checkpoint.dir or another --run.out_dir")


def _folder_write_problem(cfg: RunConfig) -> str | None:
    """Why the run folder or the checkpoint folder of ``cfg`` cannot be written (None when they
    can), without writing anything."""
    out = Path(cfg.run.out_dir)
    ckpt = _ckpt_dir(cfg)
    return (folder_problem(out, "run folder (run.out_dir)", RUN_FOLDER_FIX, create=False)
            or folder_problem(ckpt, *checkpoint_folder_words(cfg), create=False))


def _aside(path: Path) -> Path:
    """``path`` or, when that exists, ``path-2``, ``path-3``, ...: a name nothing holds yet."""
    out, i = path, 1
    while out.exists():
        i += 1
        out = path.with_name(f"{path.name}-{i}")
    return out


# ------------------------------------------------------------------------------------------------
# The trainer


def _ckpt_dir(cfg) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.run.out_dir) / "checkpoints"


def _used_folder_refusal(cfg) -> str | None:
    """The refusal of a fresh run in a run folder that holds an earlier run's checkpoints, else None."""
    c, out_dir, ckpt_dir = cfg.checkpoint, Path(cfg.run.out_dir), _ckpt_dir(cfg)
    used = _checkpoint_dirs(ckpt_dir)
    if used and not c.resume and not c.overwrite:
        return (f"run folder {out_dir} already holds checkpoints of an earlier run ({ckpt_dir}, newest "
                f"{used[-1].name}): continue it with --resume, or start over with --checkpoint.overwrite=true "
                f"(moves the earlier run to {out_dir / 'previous-<time>'}), or pick another --run.out_dir")
    return None


def check_run_folder(cfg) -> None:
    """A stage calls this first, before building or loading any model (every rank looks at the same
    files; nothing is written): a run or checkpoint folder that cannot be written, a fresh run in a used
    folder, or a folder a live run holds, is refused at once rather than after minutes of preparation.
    The Trainer checks again when it takes the lock."""
    from distill.dist.lock import FolderLock

    refused = _folder_write_problem(cfg) or _used_folder_refusal(cfg) or FolderLock(cfg.run.out_dir).holder()
    if refused:
        raise ConfigError(refused)


class Trainer:
    """``Trainer(cfg).setup()`` then ``.train()``; ``.export()`` writes the HF folder."""

    def __init__(self, cfg: RunConfig, *, argv: list[str] | None = None, hooks: TrainerHooks | None = None):
        self.cfg = cfg
        self.argv = argv
        self.hooks = hooks or TrainerHooks()
        self.step = 0  # optimizer steps done
        self.out_dir = Path(cfg.run.out_dir)
        self.ckpt_dir = _ckpt_dir(cfg)
        self.teacher: TeacherBackend | None = None
        self._prefetched: set[tuple[int, int]] = set()
        self.history: list[dict] = []
        self._stop_signals: list[str] = []  # why train() was asked to stop: a signal's name, a launcher gone
        self._launchers = launcher_chain()  # deepspeed's launch.py and CLI above this rank (if any): watched by train()
        self._stall = StallWatch(self.STALL_STEPS)

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        """Builds the run (:meth:`_setup`); a setup that fails lets go of the run folder's lock."""
        try:
            return self._setup()
        except BaseException:
            self._release_folder()
            raise

    def _release_folder(self) -> None:
        lock = getattr(self, "_folder_lock", None)
        if lock is not None:
            lock.release()

    def _setup(self) -> "Trainer":
        import warnings

        # 2026-11: DeepSpeed 0.19 calls torch.distributed's all_gather_into_tensor/reduce_scatter_tensor,
        # which torch 2.13 flags as deprecated on every call; the calls are correct, the noise is not.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        cfg = self.cfg
        use_ds = cfg.deepspeed.engine == "deepspeed"
        env = distenv.read_env(self.argv)
        if not use_ds and env.world_size > 1:
            raise ConfigError(
                f"deepspeed.engine=torch is single-process, but WORLD_SIZE={env.world_size}: use deepspeed.engine=deepspeed")
        cfg.check_machine()  # nccl / fp16 / flash-attn / triton this machine cannot run: one line, before anything starts
        self.env = distenv.init_distributed(cfg.deepspeed.dist_backend, use_deepspeed=use_ds, argv=self.argv)
        self.device = torch.device(self.env.device)
        on_gpu = self.device.type == "cuda"
        seed_all(cfg.train.seed + self.env.rank)

        # A used run folder, before any model is loaded: rank 0 decides from the file system and every
        # rank raises the same error (the broadcast is also the barrier after rank 0's moves).
        self.own_steps: set[int] = set()  # checkpoint steps of this run: the only ones keep_last may prune
        problem = self._prepare_run_folder0() if self.env.is_main else None
        problem = distenv.broadcast_object0(problem)
        if problem:
            raise ConfigError(problem)

        from distill.models import load as ml

        student_path, teacher_path = ml.resolve_builtin(cfg.model, self.out_dir)
        if cfg.kd.kind == "none":
            teacher_path = ""
        self.student_path, self.teacher_path = student_path, teacher_path
        tok_name = cfg.model.tokenizer or student_path
        self.tokenizer = ml.load_tokenizer(tok_name, trust_remote_code=cfg.model.trust_remote_code,
                                           what="tokenizer folder (model.tokenizer)" if cfg.model.tokenizer
                                           else "student folder (model.student)")
        self.vocab_size = cfg.model.vocab_size or len(self.tokenizer)
        self._check_ranks_agree()

        self.ds_config = None
        if use_ds:
            from distill.dist.ds_config import build_ds_config

            self.ds_config = build_ds_config(cfg, self.env.world_size, on_gpu=on_gpu)
        stage = self.ds_config["zero_optimization"]["stage"] if self.ds_config else 0

        ctx = BackendContext(env=self.env, device=self.device, tokenizer=self.tokenizer, vocab_size=self.vocab_size,
                             student_path=student_path, teacher_path=teacher_path, ds_config=self.ds_config,
                             out_dir=self.out_dir, hooks=self.hooks)
        self.ctx = ctx
        # Data first: a malformed record fails before any model is loaded.
        if cfg.data.name not in DATASETS:
            raise ConfigError(f"data.name={cfg.data.name!r} is not registered; known: {sorted(DATASETS)}")
        self.dataset = DATASETS[cfg.data.name](cfg, self.tokenizer, ctx)
        ctx.dataset = self.dataset
        self.collate_fn = getattr(self.dataset, "collate", None)
        pad = self.tokenizer.pad_token_id
        if cfg.data.packing:
            if self.collate_fn is not None:
                raise ConfigError(f"data.packing=true: the {cfg.data.name!r} dataset builds its own batches "
                                  f"(per-example teacher positions); packing serves datasets without a collate, e.g. sft")
            from distill.data.packing import flash_attn_kwargs, pack_collate

            # flash-attention's varlen path needs the sequence bounds of a multi-row packed batch spelled out
            flash = ml.resolve_attn(cfg.model.attn, on_gpu) == "flash_attention_2"
            max_len = cfg.data.max_len

            def packed(items):
                batch = pack_collate(items, pad, max_len)
                return batch | flash_attn_kwargs(batch) if flash and batch["input_ids"].shape[0] > 1 else batch

            self.collate_fn = packed
        elif self.collate_fn is None:
            from distill.data.sft import collate

            self.collate_fn = lambda items: collate(items, pad)
        t = cfg.train
        n = len(self.dataset)
        self.global_batch, self.steps_per_epoch, self.total_steps = t.schedule_for(n, self.env.world_size)
        if n < self.global_batch:
            raise ConfigError(
                f"the dataset has {n} examples, fewer than one optimizer step needs: micro_batch={t.micro_batch} "
                f"x grad_accum={t.grad_accum} x world_size={self.env.world_size} = {self.global_batch}")

        model = ml.load_causal_lm(
            student_path, dtype=ml.resolve_dtype(cfg.model.dtype, on_gpu), attn=ml.resolve_attn(cfg.model.attn, on_gpu),
            device=str(self.device), trust_remote_code=cfg.model.trust_remote_code,
            zero3_config=self.ds_config if stage == 3 else None, grad_checkpointing=cfg.model.grad_checkpointing,
            what="student folder (model.student)")
        ml.check_embedding_rows(model.config, self.vocab_size, f"student {student_path}")
        self.lean = cfg.kd.path == "lean"
        if self.lean:
            from distill.losses.lean import install_lean_head

            scale, cap = ml.logit_transform(model)
            if scale != 1.0 or cap is not None:
                raise ConfigError(
                    f"student {student_path}: its forward rescales or softcaps the logits after lm_head (scale "
                    f"{scale:g}, softcap {cap}); kd.path=lean computes the loss inside lm_head: use kd.path=logits")
            # before the engine is built: ZeRO-3 registers its gather/release hooks on this same module
            self.student_head = install_lean_head(model, f"student {student_path} (kd.path=lean)")
        self.hooks.prepare_student(self, model)  # before the engine: what it attaches is trained
        self.model_config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        student_cap = None  # HF forwards apply final_logit_softcapping themselves
        if use_ds:
            from distill.dist.engine import DeepSpeedEngine

            self.engine = DeepSpeedEngine(model, t, self.total_steps, self.ds_config)
        else:
            from distill.dist.engine import TorchEngine

            self.engine = TorchEngine(model, t, self.total_steps)

        if cfg.kd.kind != "none":
            name = cfg.kd.teacher_backend
            if name == "colocated":  # the core teacher: where it lives is teacher.placement
                ctx.teacher_placement, why = self._teacher_placement(stage)
                print0(f"[trainer] teacher placement={ctx.teacher_placement}"
                       f"{' ' + cfg.teacher.quantization if cfg.teacher.quantization else ''}: {why}")
                if ctx.teacher_placement == "ray":
                    name = "ray"
            if name not in TEACHER_BACKENDS and name in LAZY_BACKENDS:
                importlib.import_module(LAZY_BACKENDS[name])  # registers it
            if name not in TEACHER_BACKENDS:
                raise ConfigError(f"kd.teacher_backend={name!r} is not registered; known: {sorted(TEACHER_BACKENDS)}")
            self.teacher = TEACHER_BACKENDS[name](cfg, ctx)

        from distill.losses.objective import DistillObjective

        k = cfg.kd
        self.objective = self.hooks.objective(self) or DistillObjective(
            kind=k.kind if k.kind != "none" else "forward_kl", beta=k.beta, alpha=k.alpha, temperature=k.temperature,
            ce_weight=k.ce_weight, kd_weight=k.kd_weight if k.kind != "none" else 0.0, impl=k.impl,
            chunk_tokens=k.chunk_tokens or None, vocab_size=self.vocab_size,
            student_softcap=student_cap, teacher_softcap=getattr(self.teacher, "softcap", None))
        self._write_run_files()
        if cfg.checkpoint.resume:
            self._resume(cfg.checkpoint.resume)
        from distill.reporting import Reporter

        self.reporter = Reporter(cfg, self.out_dir) if self.env.is_main else Reporter()  # log.report_to
        caps = {"student": ml.final_logit_softcap(self.model_config),
                "teacher": ml.final_logit_softcap(self.teacher.config) if hasattr(self.teacher, "config") else None}
        print0(f"[trainer] engine={self.engine.kind} zero_stage={stage} world={self.env.world_size} "
               f"device={self.device} student={student_path} teacher={teacher_path or '-'} vocab={self.vocab_size} "
               f"examples={n} global_batch={self.global_batch} steps={self.total_steps} "
               f"(from step {self.step}) softcaps={caps} objective={self.objective!r}")
        return self

    def _teacher_placement(self, stage: int) -> tuple[str, str]:
        """``teacher.placement`` resolved, with the reason: ``auto`` is decided on rank 0 from the
        memory model (:func:`distill.dist.plan.auto_placement`, the two models' config.json shapes)
        and broadcast, so every rank builds the same teacher."""
        tc = self.cfg.teacher
        if tc.placement != "auto":
            return tc.placement, "teacher.placement"
        decision = None
        if self.env.is_main:
            from distill.dist import plan

            gpu_mem = tc.gpu_mem_gb * plan.GB or plan.rank_memory(self.device, _local_world(self.env))
            t = self.cfg.train
            try:
                shapes = plan.load_shape(self.teacher_path), plan.load_shape(self.student_path)
            except plan.PlanError as e:
                shapes, why = None, f"auto: the shapes are unknown ({e})"
            if shapes is not None:
                decision = plan.auto_placement(
                    *shapes, world=self.env.world_size, gpus_per_node=_local_world(self.env), stage=stage,
                    gpu_mem=gpu_mem / plan.GB, seq=self.cfg.data.max_len, micro_batch=t.micro_batch,
                    grad_accum=t.grad_accum, quantization=tc.quantization, topk=self.cfg.kd.topk,
                    partitioned_ok=self.ds_config is not None)
                decision = (decision[0], f"auto: {decision[1]}")
            else:  # no shapes, no model: what the job can hold with certainty is a partitioned teacher
                decision = ("partitioned" if self.ds_config is not None and not tc.quantization else "replicated",
                            f"{why}; chose the placement that needs the least memory")
        return distenv.broadcast_object0(decision)

    def _check_ranks_agree(self) -> None:
        """Before any model is loaded: every rank runs the same code, resolved config, world size and
        tokenizer, or all stop with one line naming the node and the difference (one gather)."""
        if not distenv.is_dist():
            return
        import hashlib
        import socket
        from importlib import metadata

        from distill.models.fingerprint import tokenizer_hash

        v = versions()
        code = v.get("git_sha") or f"distill {metadata.version('distill')}"
        mine = {"host": socket.gethostname(), "code": code, "world_size": self.env.world_size,
                "config": hashlib.sha256(json.dumps(to_dict(self.cfg), sort_keys=True, default=str).encode()).hexdigest(),
                "tokenizer": tokenizer_hash(self.tokenizer)}
        problem = distenv.ranks_disagree(distenv.all_gather_object(mine))
        if problem:
            raise ConfigError(problem)

    def _write_run_files(self) -> None:
        problem = None
        if self.env.is_main:
            self.versions = versions()
            path = self.out_dir / "config.yaml"
            try:
                dump_yaml(self.cfg, path)
                if self.ds_config is not None:
                    path = self.out_dir / "ds_config.json"
                    path.write_text(json.dumps(self.ds_config, indent=2))
                path = self.out_dir / "versions.json"
                path.write_text(json.dumps(self.versions, indent=2))
            except OSError as e:
                problem = f"cannot write {path} ({os_error_text(e)}): make room or move what is there, or {RUN_FOLDER_FIX}"
        problem = distenv.broadcast_object0(problem)  # every rank stops, not rank 0 alone
        if problem:
            raise ConfigError(problem)

    # -- data -------------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[dict]:
        """This rank's micro-batches (CPU) of optimizer step ``step`` (0-based); deterministic.
        The last result is cached: prefetching the next step's first micro-batch builds that step."""
        cached = getattr(self, "_mb_cache", None)
        if cached is not None and cached[0] == step:
            return cached[1]
        out = self._build_micro_batches(step)
        self._mb_cache = (step, out)
        return out

    def _build_micro_batches(self, step: int) -> list[dict]:
        t = self.cfg.train
        epoch, within = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(t.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.dataset), generator=g)
        idx = perm[within * self.global_batch:(within + 1) * self.global_batch].tolist()
        out = []
        for m in range(t.grad_accum):
            lo = (m * self.env.world_size + self.env.rank) * t.micro_batch
            out.append(self.collate_fn([self.dataset[i] for i in idx[lo:lo + t.micro_batch]]))
        return out

    def to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _prefetch(self, step: int, m: int, batch: dict | None = None) -> None:
        if self.teacher is None or (step, m) in self._prefetched or step >= self.total_steps:
            return
        if type(self.teacher).prefetch is TeacherBackend.prefetch:
            return  # the backend has no prefetch: do not build batches for nothing
        if batch is None:
            batch = self.micro_batches(step)[m]
        self._prefetched.add((step, m))
        self.teacher.prefetch(batch)

    # -- the step ---------------------------------------------------------------------------------
    def train_step(self, step: int, micro: list[dict] | None = None) -> dict:
        from distill.losses.objective import count_targets

        micro = self.micro_batches(step) if micro is None else micro
        ga = len(micro)
        n_local = sum(count_targets(b["labels"]) for b in micro)
        norm = distenv.all_reduce_sum(torch.tensor(float(n_local), device=self.device))
        # ce, kd, response tokens, tokens, and whether this rank was asked to stop (a signal or its launcher gone, distill/dist/stop.py):
        # all ranks learn it from the same all-reduce, so they stop at the same step with no extra sync.
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        self.hooks.begin_step()
        depth = self.hooks.prefetch_depth
        self.engine.train()
        for m, cpu_batch in enumerate(micro):
            if depth:
                # this micro-batch (if not yet), then `depth` ahead, across the step boundary
                self._prefetch(step, m, cpu_batch)
                for d in range(1, depth + 1):
                    s, mm = divmod(step * ga + m + d, ga)
                    self._prefetch(s, mm, micro[mm] if s == step else None)
            batch = self.to_device(cpu_batch)
            out = self._lean_loss(cpu_batch, batch, norm) if self.lean else self._logits_loss(batch, norm)
            self.engine.backward(out.loss)
            self.engine.step()
            sums[:4] += torch.stack([out.ce_sum.double(), out.kd_sum.double(), out.n_tokens.double(),
                                     torch.as_tensor(batch_tokens(batch), device=self.device).double()])
        self._prefetched = {k for k in self._prefetched if k[0] > step}
        extra = self.hooks.step_sums()
        if extra:
            sums = torch.cat([sums, torch.stack([v.to(self.device, torch.float64).reshape(()) for v in extra.values()])])
        # Read just before the reduce: a signal that came during this step's micro-batches stops the run
        # after this step (only one during the step's last lines waits for the next step).
        sums[4] = float(bool(self._stop_signals))
        distenv.all_reduce_sum(sums)
        ce, kd, ntok, tokens, stop, *rest = sums.tolist()  # the step's one host sync (logging, NaN check, stop)
        k = self.cfg.kd
        kd_scale = (k.kd_weight * k.temperature**2) if self.teacher is not None else 0.0
        loss = (k.ce_weight * ce + kd_scale * kd) / max(ntok, 1.0)
        rec = {"loss": loss, "ce": ce / max(ntok, 1.0), "kd": kd / max(ntok, 1.0), "response_tokens": int(ntok),
               "tokens": int(tokens), "grad_norm": self.engine.grad_norm(), "lr": self.engine.lr(),
               "stop_requested": stop > 0}
        self.hooks.end_step(rec, dict(zip(extra, rest)))
        return rec

    def _check_topk(self, teacher_out) -> None:
        if isinstance(teacher_out, TopKTeacher) and not self.teacher.topk_ids_checked:
            teacher_out.check(self.vocab_size, f"teacher backend {self.cfg.kd.teacher_backend!r}")

    def _lean_loss(self, cpu_batch: dict, batch: dict, norm):
        """``kd.path=lean``: supervised rows chosen from the CPU labels, the teacher at those rows,
        the loss computed inside the student's lm_head forward (distill.losses.lean)."""
        from distill.losses.lean import supervised_rows

        index, targets = supervised_rows(cpu_batch["labels"], self.objective.ignore_index)
        index = index.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        teacher_rows = self.teacher.rows(batch, index) if self.teacher is not None else None
        self._check_topk(teacher_rows)
        request = self.objective.lean_request(index, targets, teacher_rows, norm)
        with self.student_head.pending(request):
            loss = self.engine.forward(**model_inputs(batch), use_cache=False).logits
        return self.objective.lean_output(loss, request)

    def _logits_loss(self, batch: dict, norm):
        """``kd.path=logits``: the models' full logits, then the chunked objective."""
        teacher_out = self.teacher(batch) if self.teacher is not None else None
        self._check_topk(teacher_out)
        logits = self.engine.forward(**model_inputs(batch), use_cache=False).logits
        return self.objective(logits, teacher_out, batch["labels"], norm)

    # -- loop ---------------------------------------------------------------------------------------
    REQUEUE_EXIT = 75  # exit status of a run stopped (signal, launcher gone) after its checkpoint (EX_TEMPFAIL)
    STALL_STEPS = 5  # consecutive steps with a zero gradient norm or an unmoved loss before the one warning (StallWatch)

    def train(self) -> dict:
        """The training loop (:meth:`_train`); the run folder's lock is released when it ends, however."""
        try:
            return self._train()
        finally:
            self._release_folder()

    def _train(self) -> dict:
        cfg = self.cfg
        metrics_path = self.out_dir / "metrics.jsonl"
        # Preemption (SLURM --signal=B:USR1@N forwarded by slurm/*.sh, scancel, the time limit), Ctrl-C, or
        # the deepspeed launcher gone (distill.dist.stop): SIGUSR1, SIGTERM, SIGINT or the launcher watch
        # only sets a flag, read after each optimizer step; the run then checkpoints and exits with
        # REQUEUE_EXIT, and a resumed run continues from that step.
        stop_sigs = self._stop_signals
        unwatch = watch_for_stop(stop_sigs, self._launchers, announce=self.env.local_rank == 0)
        stopped = False
        bar = None
        if self.env.is_main and cfg.log.progress_bar and is_terminal():  # a redirected log gets the step lines only
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True, mininterval=1.0,
                       file=sys.stderr)
        t_start = time.time()
        step0 = self.step
        last = {}
        try:
            while self.step < self.total_steps:
                lr = self.engine.lr()
                t0 = time.time()
                rec = self.train_step(self.step)
                stop_requested = rec.pop("stop_requested", False)
                dt = time.time() - t0
                rec["lr"] = lr  # the rate this step used
                self.step += 1
                gn = rec["grad_norm"]
                if not math.isfinite(rec["loss"]) or (gn is not None and not math.isfinite(gn)):
                    good = list_checkpoints(self.ckpt_dir)
                    msg = (f"non-finite {'loss' if not math.isfinite(rec['loss']) else 'gradient norm'} at step "
                           f"{self.step} (loss={rec['loss']}, grad_norm={gn}); stopped without saving. Last good "
                           f"checkpoint: {good[-1] if good else 'none'}")
                    print0(f"[trainer] {msg}")
                    raise TrainingDiverged(msg)
                elapsed = time.time() - t_start
                rate = (self.step - step0) / max(elapsed, 1e-9)
                rec.update(step=self.step, tok_per_s=rec["tokens"] / max(dt, 1e-9),
                           eta_s=(self.total_steps - self.step) / max(rate, 1e-9), step_time_s=dt)
                last = rec
                self.history.append(rec)
                if self.env.is_main and (self.step % cfg.log.every == 0 or self.step == self.total_steps):
                    line = (f"step {self.step}/{self.total_steps} | loss {rec['loss']:.4f} | ce {rec['ce']:.4f} | "
                            f"kd {rec['kd']:.4f} | lr {lr:.2e} | gnorm {gn if gn is None else f'{gn:.3f}'} | "
                            f"tok/s {rec['tok_per_s']:.0f} | eta {_fmt_eta(rec['eta_s'])}"
                            f"{self.hooks.line_extra(rec)}")
                    (bar.write if bar else print)(line)
                    self._append_metrics0(metrics_path, rec)
                    self.reporter.log(rec, self.step)
                stall = self._stall.update(self.step, rec["loss"], gn)
                if stall and self.env.is_main:
                    (bar.write if bar else print)(f"[trainer] warning: {stall}")
                if bar:
                    bar.update(1)
                every = cfg.checkpoint.every
                if (every and self.step % every == 0) or self.step == self.total_steps:
                    self.save_checkpoint()
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.evaluate()
                if stop_requested and self.step < self.total_steps:
                    # ranks may get the signal steps apart: all stop at the first step any of them had it
                    if not (every and self.step % every == 0):
                        self.save_checkpoint()
                    stopped = True
                    break
        finally:
            unwatch()
            if bar:
                bar.close()
            if self.teacher is not None:
                self.teacher.close()
            if not cfg.eval.at_end or sys.exc_info()[0] is not None:
                self.reporter.close()  # else after the final evaluation below
        if stopped:
            name = stop_sigs[0] if stop_sigs else "a stop request on another rank"
            print0(f"[trainer] {name}: checkpoint at step {self.step}/{self.total_steps} saved; exiting with "
                   f"status {self.REQUEUE_EXIT} (requeue, then resume with checkpoint.resume=latest)")
            if cfg.eval.at_end:
                self.reporter.close()
            distenv.destroy()
            raise SystemExit(self.REQUEUE_EXIT)
        result = {"steps": self.step, "last": last, "out_dir": str(self.out_dir)}
        if cfg.eval.at_end:  # before the export, whose model card shows these scores
            result["eval"] = self.evaluate(final=True)
            self.reporter.close()
        if cfg.checkpoint.export:
            result["export"] = str(self.export())
        return result

    # -- checkpoints --------------------------------------------------------------------------------
    def _prepare_run_folder0(self) -> str | None:
        """Rank 0, before any model is loaded. Returns the refusal of a fresh run in a folder that
        holds checkpoints (None when the run may go on), else makes the folder ready: an unfinished
        save's ``.tmp-step_*`` removed, the earlier run moved to ``previous-<time>/``
        (``checkpoint.overwrite``), a log that no checkpoint continues kept beside. Nothing is deleted
        that a run finished."""
        from distill.dist.lock import FolderLock

        c = self.cfg.checkpoint
        problem = folder_problem(self.out_dir, "run folder (run.out_dir)", RUN_FOLDER_FIX)
        if problem:
            return problem
        self._folder_lock = FolderLock(self.out_dir)  # released when train() ends, or by the kernel on any exit
        held = self._folder_lock.acquire()
        if held:
            return held
        metrics = self.out_dir / "metrics.jsonl"
        used = _checkpoint_dirs(self.ckpt_dir)
        refused = _used_folder_refusal(self.cfg)
        if refused:
            return refused
        if c.resume:
            changed = self._config_changes0()
            if changed:
                return changed
        for tmp in sorted(self.ckpt_dir.glob(f".tmp-{CKPT_PREFIX}*")) if self.ckpt_dir.is_dir() else ():
            print0(f"[trainer] removing {tmp}: an unfinished checkpoint save (the run was killed while saving)")
            shutil.rmtree(tmp, ignore_errors=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if not c.resume and c.overwrite and (used or metrics.is_file()):
            aside = _aside(self.out_dir / f"previous-{stamp}")
            aside.mkdir(parents=True)
            moved = [x for x in (metrics, self.out_dir / "export", self.out_dir / "config.yaml",
                                 self.out_dir / "ds_config.json", self.out_dir / "versions.json") if x.exists()]
            for x in moved:
                os.replace(x, aside / x.name)
            if self.ckpt_dir.is_dir():
                # beside the checkpoint folder (same file system, a rename) when checkpoint.dir is elsewhere
                ck = aside if self.ckpt_dir.parent == self.out_dir else _aside(self.ckpt_dir.parent / f"previous-{stamp}")
                ck.mkdir(parents=True, exist_ok=True)
                os.replace(self.ckpt_dir, ck / self.ckpt_dir.name)
                moved.append(ck / self.ckpt_dir.name)
            fsync_dir(self.out_dir)
            print0(f"[trainer] checkpoint.overwrite: moved the earlier run ({', '.join(x.name for x in moved)}) to {aside}")
        elif metrics.is_file() and (not c.resume or (c.resume in _RESUME_LATEST and not list_checkpoints(self.ckpt_dir))):
            # No checkpoint continues this log (a fresh run, or --resume before the first save):
            # keep it beside and start a clean one, so no step is logged twice.
            os.replace(metrics, _aside(self.out_dir / f"metrics.{stamp}.jsonl"))
        # a checkpoint folder that cannot be written fails here, not at the first save after training
        return folder_problem(self.ckpt_dir, *checkpoint_folder_words(self.cfg))

    # Settings a resumed run may change freely: how it logs, evaluates, saves and lays out the same
    # global batch, how long it runs, and how often a dead Ray teacher actor is restarted. Everything
    # else defines the data order or the objective.
    HARMLESS_CHANGES = ("run.", "log.", "eval.", "report.", "checkpoint.", "train.steps", "train.epochs",
                        "train.micro_batch", "train.grad_accum", "teacher.max_restarts", "teacher.max_retries")

    def _config_changes0(self) -> str | None:
        """Rank 0, before anything is written: the resolved config against the config saved in the
        checkpoint to resume. A change to a setting that defines the data order or the objective is
        refused (one line naming the keys) unless ``checkpoint.allow_config_change``, which keeps the
        earlier segment's config as ``config.step_N.yaml``; harmless changes are listed in one line."""
        import yaml

        c = self.cfg.checkpoint
        if c.resume in _RESUME_LATEST:
            found = list_checkpoints(self.ckpt_dir)
            if not found:
                return None
            path = found[-1]
        else:
            path = Path(c.resume)
        saved_file = path / "config.yaml"
        if not saved_file.is_file():
            return None
        try:
            saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            return None  # a damaged checkpoint is named by the resume itself

        old, new = flatten(saved if isinstance(saved, dict) else {}), flatten(to_dict(self.cfg))
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k != "checkpoint.resume")
        harmless = [k for k in diff if k.startswith(self.HARMLESS_CHANGES)]
        serious = [k for k in diff if k not in harmless]
        shown = lambda keys: ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)  # noqa: E731
        if serious and not c.allow_config_change:
            return (f"resume from {path}: this run changes what defines the data order or the objective "
                    f"({shown(serious)}); resume with the checkpoint's settings, or pass "
                    f"--checkpoint.allow_config_change=true to continue with the new ones (the earlier config is "
                    f"kept as config.step_N.yaml), or start another --run.out_dir")
        if serious:
            keep = self.out_dir / f"config.step_{_checkpoint_step(path)}.yaml"
            shutil.copyfile(saved_file, keep)
            print0(f"[trainer] resume with changed settings (checkpoint.allow_config_change): {shown(serious)}; "
                   f"the earlier segment's config is {keep}")
        if harmless:
            print0(f"[trainer] resume: settings changed since {path.name}: {shown(harmless)}")
        return None

    def save_checkpoint(self) -> Path:
        """Atomic: every rank writes into ``.tmp-step_N``; rank 0 adds trainer_state.json (with the
        manifest: size, optionally sha256, of every file) and renames. ``keep_last`` prunes only this
        run's checkpoints (``own_steps``). A write that fails (a full disk, a read-only or vanished
        folder) stops every rank with one line naming the file and the last intact checkpoint
        (:meth:`_save_failed`); nothing finished is touched."""
        name = f"{CKPT_PREFIX}{self.step:08d}"
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".tmp-{name}"
        why = None
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            why = _failed_write(lambda: tmp.mkdir(parents=True), tmp)
        why = _first_error_all_ranks(why)  # also the barrier before the ranks write
        if why is None:
            why = _first_error_all_ranks(_failed_write(lambda: self._save_rank_files(tmp), tmp))
        if why is None and self.env.is_main:
            why = _failed_write(lambda: self._finish_save0(tmp, final), tmp)
        why = distenv.broadcast_object0(why)  # the barrier after rank 0's rename
        if why is not None:
            self._save_failed(why, tmp)
        return final

    def _save_rank_files(self, tmp: Path) -> None:
        self.engine.save(tmp / "engine")
        torch.save(_rng_state(), tmp / f"rng_rank{self.env.rank}.pt")

    def _finish_save0(self, tmp: Path, final: Path) -> None:
        """Rank 0: the run's files and trainer_state.json into ``tmp``, then the rename to ``final``."""
        name = final.name
        dump_yaml(self.cfg, tmp / "config.yaml")
        if self.ds_config is not None:
            (tmp / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
        (tmp / "versions.json").write_text(json.dumps(getattr(self, "versions", None) or versions(), indent=2))
        hooks_state = self.hooks.state_dict()
        if hooks_state:
            torch.save(hooks_state, tmp / "hooks_state.pt")
        state = {"step": self.step, "total_steps": self.total_steps, "world_size": self.env.world_size,
                 "global_batch": self.global_batch, "steps_per_epoch": self.steps_per_epoch,
                 "data_position": {"epoch": self.step // self.steps_per_epoch,
                                   "batch_in_epoch": self.step % self.steps_per_epoch,
                                   "examples_seen": self.step * self.global_batch},
                 "engine": self.engine.kind, "config_class": f"{type(self.cfg).__module__}:{type(self.cfg).__qualname__}",
                 "last_metrics": self.history[-1] if self.history else None,
                 "files": _manifest(tmp, sha256=self.cfg.checkpoint.sha256)}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))  # written last: marks complete
        if final.exists():
            # not this run's (a newer checkpoint skipped as damaged at resume, or of a run continued from
            # an earlier step): kept under another name, never deleted
            keep = _aside(self.ckpt_dir / f"replaced-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(final, keep)
            print0(f"[trainer] {final} existed (not written by this run): moved to {keep}")
        os.replace(tmp, final)
        fsync_dir(self.ckpt_dir)
        self.own_steps.add(self.step)
        own = [p for p in list_checkpoints(self.ckpt_dir) if _checkpoint_step(p) in self.own_steps]
        for old in own[:-self.cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(f"{UNIVERSAL_PREFIX}{old.name}"), ignore_errors=True)  # its universal copy
        print0(f"[trainer] checkpoint {final}")

    def _save_failed(self, why: str, tmp: Path) -> None:
        """Every rank, after a failed save: rank 0 removes the unfinished ``tmp`` (it holds disk space;
        where it cannot, the next start does) and names the newest intact checkpoint; all raise the
        same RunWriteError."""
        msg = None
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            left = (f"the unfinished {tmp.name} is left (the next start removes it)" if tmp.exists()
                    else f"the unfinished {tmp.name} was removed")
            msg = self._write_stop0(f"checkpoint at step {self.step} not saved", why, left)
        raise RunWriteError(distenv.broadcast_object0(msg))

    def _write_stop0(self, what: str, why: str, note: str = "", *, export_to: Path | None = None) -> str:
        """The one line of a run stopped by a failed write: what, why, the newest intact checkpoint and
        what to do (free space for a full disk, else make the folder writable; then resume, or export
        the checkpoint to ``export_to``)."""
        good = next((p for p in reversed(list_checkpoints(self.ckpt_dir))
                     if _verify_checkpoint(p, sha256=False) is None), None)
        full = "(ENOSPC" in why or "(EDQUOT" in why
        do = ("free space (or lower checkpoint.keep_last, or give --checkpoint.dir on another disk)" if full else
              "make the folder writable")
        if export_to is not None and good is not None:
            then = f"python -m distill.export --checkpoint {good} --out {export_to}"
        else:
            then = "continue from it with --resume" if good else "start the run again"
        return f"{what}: {why}; {note + '; ' if note else ''}last intact checkpoint: {good or 'none'}: {do}, then {then}"

    def _append_metrics0(self, path: Path, rec: dict) -> None:
        """Rank 0: one metrics.jsonl record; a failed write stops the run in one line."""

        def write():
            with open(path, "a") as fh:
                fh.write(json.dumps(rec, default=str) + "\n")

        why = _failed_write(write, path.parent)
        if why is not None:
            raise RunWriteError(self._write_stop0(f"metrics of step {self.step} not written", why))

    def _resume(self, spec: str) -> None:
        """Load the newest intact checkpoint (``latest``) or the one named. A damaged one (its files
        differ from its manifest, or the engine cannot load it) is named in a warning and the next
        older is tried; none left is a CheckpointError naming the damaged file."""
        if spec in _RESUME_LATEST:
            ckpts = list_checkpoints(self.ckpt_dir)
            if not ckpts:
                print0(f"[trainer] resume: no checkpoint in {self.ckpt_dir}; starting fresh")
                return
        else:
            path = Path(spec)
            if not (path / "trainer_state.json").is_file():
                raise CheckpointError(f"checkpoint.resume={spec}: {path} is not a complete checkpoint (no trainer_state.json)")
            ckpts = [path]
        bad = []
        for path in reversed(ckpts):
            # the manifest check on rank 0 (one verdict for all), then the load on every rank
            why = _verify_checkpoint(path, sha256=self.cfg.checkpoint.sha256) if self.env.is_main else None
            why = distenv.broadcast_object0(why) or self._load_checkpoint(path)
            if why is None:
                break
            bad.append(why)
            print0(f"[trainer] warning: checkpoint {path.name} is damaged: {why}; "
                   f"{'trying the one before' if path != ckpts[0] else 'no older checkpoint'}")
        else:
            older = f" (and {len(bad) - 1} older checkpoint(s) damaged too)" if len(bad) > 1 else ""
            raise CheckpointError(
                f"cannot resume: checkpoint {ckpts[-1]} is damaged: {bad[0]}{older}; restore the file, resume from "
                f"another folder with --checkpoint.resume=PATH, or start over with --checkpoint.overwrite=true")
        state = json.loads((path / "trainer_state.json").read_text())
        self.step = int(state["step"])
        if path.parent.resolve() == self.ckpt_dir.resolve():
            # the continued run's checkpoints are this run's: keep_last prunes them, not newer ones
            self.own_steps |= {s for s in map(_checkpoint_step, list_checkpoints(self.ckpt_dir)) if s <= self.step}
        if self.env.is_main:
            _truncate_metrics(self.out_dir / "metrics.jsonl", self.step)
        distenv.barrier()
        print0(f"[trainer] resumed from {path} at step {self.step}")

    def _load_checkpoint(self, path: Path) -> str | None:
        """Engine, optimizer and RNG state from ``path``; the reason (naming the file where it can) when
        any rank fails, None when all loaded. A batch-layout mismatch is an error, not damage.

        Another world size with the same global batch resumes exactly: the data order depends only on
        the global batch and the step (``_build_micro_batches``), and a ZeRO-1/2/3 checkpoint's
        per-rank optimizer partitions are re-cut by DeepSpeed's universal checkpoint, converted once
        into a sibling folder (:meth:`_universal_copy`). Rank r < saved world size takes
        ``rng_rank{r}.pt``; a rank beyond them is seeded with ``train.seed + rank + 1_000_003 * step``."""
        state = json.loads((path / "trainer_state.json").read_text())
        saved_engine = state.get("engine", self.engine.kind)
        if saved_engine != self.engine.kind:
            raise CheckpointError(
                f"{path}: written by the {saved_engine} engine, this run uses deepspeed.engine={self.engine.kind}; "
                f"resume with --deepspeed.engine={saved_engine}")
        if state["global_batch"] != self.global_batch:
            raise CheckpointError(_batch_mismatch(path, state, self.global_batch, self.env.world_size,
                                                  self.cfg.train.micro_batch, self.cfg.train.grad_accum))
        saved_world = int(state.get("world_size", self.env.world_size))
        engine_dir, universal = path / "engine", False
        if saved_world != self.env.world_size and self.engine.kind == "deepspeed" and self.engine.stage > 0:
            universal = True
            engine_dir, why = self._universal_copy(path, saved_world)
            if why:
                return why
        why = None
        try:
            if universal:
                self.engine.load(engine_dir, universal=True)
            else:
                self.engine.load(engine_dir)
            if (path / "hooks_state.pt").is_file():
                self.hooks.load_state_dict(torch.load(path / "hooks_state.pt", weights_only=False))
            rng = path / f"rng_rank{self.env.rank}.pt"
            if self.env.rank < saved_world:
                if rng.is_file():
                    _set_rng_state(torch.load(rng, weights_only=False))
            else:
                seed_all(self.cfg.train.seed + self.env.rank + 1_000_003 * int(state["step"]))
        except Exception as e:  # noqa: BLE001 - torch.load / safetensors / DeepSpeed: all mean "cannot load"
            msg = (str(e).strip().splitlines() or [""])[0]
            why = _probe_files(path) or f"{engine_dir}: the engine cannot load it ({type(e).__name__}: {msg})"
        if saved_world != self.env.world_size and why is None:
            rng_note = (f"; RNG of rank(s) >= {saved_world} seeded from train.seed + rank + 1_000_003 * step"
                        if self.env.world_size > saved_world else "")
            print0(f"[trainer] resume: {path.name} was saved by {saved_world} rank(s), this run has "
                   f"{self.env.world_size} (same global batch {self.global_batch}: the data order continues "
                   f"exactly){rng_note}")
        return _first_error_all_ranks(why)

    def _universal_copy(self, path: Path, saved_world: int) -> tuple[Path, str | None]:
        """``(folder to load, None)``, or ``(_, why)`` on failure, the same on every rank (collective).

        Rank 0 converts ``path/engine`` with DeepSpeed's ``ds_to_universal`` into the sibling
        ``universal-step_N/`` (or, when the checkpoint folder is not writable, into this run's checkpoint
        folder), building it as ``.tmp-universal-step_N`` and renaming it when complete; ``path`` is only
        read. A copy made earlier is reused when its ``source.json`` names this checkpoint's
        trainer_state.json (sha256), so a checkpoint replaced under the same name is converted again."""
        from distill.dist.engine import to_universal

        out, why = None, None
        if self.env.is_main:
            parent = path.parent if os.access(path.parent, os.W_OK) else self.ckpt_dir
            out = parent / f"{UNIVERSAL_PREFIX}{path.name}"
            source = {"checkpoint": str(path.resolve()), "trainer_state_sha256": sha256_file(path / "trainer_state.json"),
                      "saved_world_size": saved_world}
            try:
                cached = json.loads((out / "source.json").read_text()) if (out / "source.json").is_file() else None
                if cached and cached.get("trainer_state_sha256") == source["trainer_state_sha256"]:
                    print0(f"[trainer] resume: using the universal copy {out} of {path} (converted earlier)")
                else:
                    print0(f"[trainer] resume: {path} was saved by {saved_world} rank(s), this run has "
                           f"{self.env.world_size}: converting its ZeRO-{self.engine.stage} partitions with "
                           f"deepspeed.checkpoint.ds_to_universal into {out} (the checkpoint itself is not modified)")
                    t0 = time.time()
                    tmp = out.with_name(f".tmp-{out.name}")
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
                    to_universal(path / "engine", tmp)
                    atomic_write_text(tmp / "source.json", json.dumps(source, indent=2))  # written last: complete
                    shutil.rmtree(out, ignore_errors=True)
                    os.replace(tmp, out)
                    fsync_dir(parent)
                    print0(f"[trainer] resume: universal copy {out} written in {time.time() - t0:.1f} s")
            except Exception as e:  # noqa: BLE001 - a failed conversion is reported like a failed load
                msg = (str(e).strip().splitlines() or [""])[0]
                why = _probe_files(path) or (f"{path / 'engine'}: DeepSpeed's universal conversion failed "
                                             f"({type(e).__name__}: {msg})")
        out, why = distenv.broadcast_object0((out, why))
        return out, why

    # -- export / eval ------------------------------------------------------------------------------
    def gathered_state_dict(self) -> dict | None:
        sd = self.engine.gather_state_dict()
        return sd if sd is None else self.hooks.student_state_dict(sd)

    def export(self, out: str | Path | None = None) -> Path:
        from distill.models.export import card_metadata, export_hf

        out = Path(out) if out else self.out_dir / "export"
        sd = self.gathered_state_dict()
        why = None
        if self.env.is_main:
            info = json.dumps({"step": self.step, "student_init": self.student_path, "teacher": self.teacher_path,
                               "config": to_dict(self.cfg)}, indent=2)
            card = card_metadata(self.cfg, step=self.step, student=self.student_path, teacher=self.teacher_path,
                                 metrics_path=self.out_dir / "metrics.jsonl")
            why = _failed_write(lambda: export_hf(sd, self.model_config, self.tokenizer, out,
                                                  generation_config=self.generation_config,
                                                  extra_files={"distill_run.json": info}, card=card), out.parent)
            if why is not None:
                # export_hf writes a .tmp-<name>-<pid> folder and renames it: the partial one holds space
                for partial in out.parent.glob(f".tmp-{out.name}-{os.getpid()}"):
                    shutil.rmtree(partial, ignore_errors=True)
                why = self._write_stop0(f"student not exported to {out}", why, export_to=out)
            else:
                print0(f"[trainer] exported student to {out}")
        why = distenv.broadcast_object0(why)  # also the barrier after rank 0's export
        if why is not None:
            raise RunWriteError(why)
        return out

    def evaluate(self, final: bool = False) -> dict | None:
        """SentiBench (``eval.limit`` examples per task) with the gathered student: during training on
        each task's validation split where it has one (its test split otherwise), at the end
        (``final``) on the test split, then also written as ``<out_dir>/sentibench/results.json``
        (+ ``.md``, ``.png``; what ``sentibench plot`` reads).

        Rank 0 holds the gathered weights and scores every prompt alone (``local=True``: its runner
        calls no collective, so it cannot wait on ranks that are not evaluating); the other ranks wait
        at the barrier. Scores under N ranks equal 1 rank's
        (tests/trainer/test_dist.py::test_zero3_two_ranks_match_single_process)."""
        sd = self.gathered_state_dict()
        result = None
        if self.env.is_main:
            from transformers import AutoModelForCausalLM

            from distill.data.sentibench import resolve_tasks, task_file
            from distill.eval.sentibench import evaluate, write_results

            e = self.cfg.eval
            tasks = resolve_tasks(e.tasks)
            split = "test" if final else {t: "val" if task_file(t, "val").is_file() else "test" for t in tasks}
            model = AutoModelForCausalLM.from_config(self.model_config)
            load_state_dict_strict(model, sd, what=f"the gathered student of {self.student_path}")
            model.to(self.device).eval()
            run_name = self.cfg.run.name or self.out_dir.name
            result = evaluate(model, self.tokenizer, tasks=tasks, shots=e.shots, seeds=(42,), split=split,
                              limit=e.limit or None, batch_size=e.batch_size, local=True,
                              model_name=f"{run_name} (step {self.step})")
            self._append_metrics0(self.out_dir / "metrics.jsonl", {"step": self.step, "eval": result})
            self.reporter.log_eval(result, self.step)
            scores = {t: None if v.get("score") is None else round(float(v["score"]), 2)
                      for t, v in (result.get("tasks") or {}).items()}
            where = result["split"] if isinstance(result["split"], str) else "val where present, else test"
            print0(f"[trainer] eval at step {self.step} ({where} split): {scores}")
            del model
            if final:
                paths = write_results(result, self.out_dir / "sentibench")
                print0(f"[trainer] SentiBench results: {paths['json']} (sentibench plot {paths['json']} draws them)")
                if e.teacher and self.teacher_path:
                    self._evaluate_teacher0(result, tasks, split)
        distenv.barrier()
        return result

    def _evaluate_teacher0(self, student: dict, tasks, split) -> None:
        """Rank 0, with ``eval.teacher``: the teacher on the student's final slice, written as
        ``sentibench/teacher/results.json``; the student's results.md / .png then show both."""
        from distill.eval.report import plot_results, results_markdown
        from distill.eval.sentibench import evaluate, write_results
        from distill.models import load as ml

        e, m = self.cfg.eval, self.cfg.model
        on_gpu = self.device.type == "cuda"
        teacher = ml.load_causal_lm(self.teacher_path, dtype=ml.resolve_dtype(m.teacher_dtype_name(), on_gpu),
                                    attn=ml.resolve_attn(m.attn, on_gpu), device=str(self.device),
                                    trust_remote_code=m.trust_remote_code, what="teacher folder (model.teacher)")
        teacher.eval()
        # the student's tokenizer: token-level KD already requires the two to agree
        res = evaluate(teacher, self.tokenizer, tasks=tasks, shots=e.shots, seeds=(42,), split=split, limit=e.limit or None,
                       batch_size=e.batch_size, local=True, model_name=f"teacher {Path(str(self.teacher_path)).name}")
        del teacher
        out = self.out_dir / "sentibench"
        write_results(res, out / "teacher")
        (out / "results.md").write_text(results_markdown([student, res]), encoding="utf-8")
        plot_results([student, res], out / "results.png")
        t = res["overall"].get("score")
        print0(f"[trainer] teacher on the same slice: overall {None if t is None else round(float(t), 2)} "
               f"({out / 'teacher' / 'results.json'}; {out / 'results.png'} shows both)")


def load_state_dict_strict(model: torch.nn.Module, sd: dict, *, what: str) -> None:
    """``model.load_state_dict(sd, strict=True)`` but for the two ways a gathered state dict may
    legitimately differ from ``model.state_dict()``: a key absent because it is a tied alias of a
    present one (``lm_head.weight`` of a ``tie_word_embeddings`` model, dropped by savers that store
    shared storage once) is filled from that key, and a non-persistent buffer of the model (rebuilt
    from the config at construction) is dropped. Any other missing or unexpected key, or tied aliases
    with different values, is a one-line error naming the keys and the model config."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    alias_of = {n: names for names in groups.values() if len(names) > 1 for n in names}
    non_persistent = {f"{mod}.{b}" if mod else b for mod, m in model.named_modules(remove_duplicate=False)
                      for b in m._non_persistent_buffers_set}
    expected = list(model.state_dict())
    sd = {k: v for k, v in sd.items() if k not in non_persistent}
    conflicts = []
    for k in expected:
        present = [a for a in alias_of.get(k, ()) if a in sd]
        if k not in sd and present:
            sd[k] = sd[present[0]]
        elif k in sd and any(sd[a] is not sd[k] and not torch.equal(sd[a], sd[k]) for a in present if a != k):
            conflicts.append(k)
    keys = set(expected)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in keys]
    if missing or unexpected or conflicts:
        def few(names):
            return f"{len(names)} {names[:4]}{' ...' if len(names) > 4 else ''}"

        c = model.config
        shape = ", ".join(f"{f}={getattr(c, f, None)}" for f in ("model_type", "hidden_size", "num_hidden_layers",
                                                                 "vocab_size", "tie_word_embeddings"))
        parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                 f"tied in the model but different {few(conflicts)}" if conflicts else ""]
        raise RuntimeError(f"{what}: state dict does not fit {type(model).__name__}({shape}): "
                           f"{'; '.join(x for x in parts if x)}")
    model.load_state_dict(sd, strict=True)
    model.tie_weights()  # a no-op when the aliases share one Parameter, as from_config builds them


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records of steps after ``step`` (written after the checkpoint by a run that was killed)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if rec.get("step", 0) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in keep))


UNIVERSAL_PREFIX = "universal-"  # universal-step_N/: DeepSpeed universal copy of step_N for another world size


def _batch_mismatch(path: Path, state: dict, global_batch: int, world: int, micro: int, accum: int) -> str:
    """One line: the checkpoint's global batch differs from this run's, and a layout that keeps it.

    The rule: a run continues only with the global batch it was saved with (micro_batch x grad_accum x
    world_size). The step counter, the LR schedule and the data order (an epoch permutation cut into
    global batches) are all counted in global batches, so another global batch would replay or skip
    examples and stretch the schedule; any world size whose layout keeps the product resumes exactly."""
    want = int(state["global_batch"])
    per_rank = want // world if want % world == 0 else None
    if per_rank is None:
        hint = f"a world size that divides {want}"
    elif per_rank % micro == 0:
        hint = f"--train.micro_batch={micro} --train.grad_accum={per_rank // micro}"
    else:
        hint = f"--train.micro_batch={per_rank} --train.grad_accum=1 (or any micro_batch x grad_accum = {per_rank})"
    return (f"{path}: saved with global batch {want} ({state.get('world_size', '?')} rank(s)), this run has "
            f"{global_batch} (micro_batch {micro} x grad_accum {accum} x world_size {world}); a run resumes only "
            f"with its global batch: on {world} rank(s) use {hint}")
