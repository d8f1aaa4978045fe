"""Checkpoints and the run folder: atomic saves with a manifest, resume (also at another world size),
the run folder's lock and preparation, and the one-line stop of a run whose files cannot be written.

The :class:`Checkpointer` is built by :mod:`distill.train.build` before any model is loaded (it takes
the folder's lock and refuses a used or locked folder), gets the engine and the schedule once they
exist, and is handed to the loop, which calls :meth:`Checkpointer.save`. Files of a checkpoint
``step_N/``: ``engine/`` (the engine's own files), ``rng_rank{r}.pt``, ``config.yaml``,
``ds_config.json``, ``versions.json``, ``hooks_state.pt`` (the callbacks' state, when any) and, written
last, ``trainer_state.json`` (step, schedule, world size, the manifest of every file).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from distill.config import ConfigError, RunConfig, dump_yaml, flatten, to_dict
from distill.dist import env as distenv
from distill.dist.env import print0
from distill.errors import UserError
from distill.fileio import atomic_write_text, folder_problem, fsync_dir, os_error_text, sha256_file, size_problem
from distill.runinfo import versions

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
        why = size_problem(f, want["size"], "the save wrote")
        if why:
            return why
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


def failed_write(write: Callable[[], Any], folder: Path) -> str | None:
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




class Checkpointer:
    """The run's checkpoint folder and run files (see the module docstring).

    ``extra_state()`` / ``load_extra_state(state)``: the callbacks' own state, saved by rank 0 as
    ``hooks_state.pt`` when not empty and loaded on resume."""

    def __init__(self, cfg: RunConfig, env):
        self.cfg = cfg
        self.env = env
        self.out_dir = Path(cfg.run.out_dir)
        self.ckpt_dir = _ckpt_dir(cfg)
        self.own_steps: set[int] = set()  # checkpoint steps of this run: the only ones keep_last may prune
        self._folder_lock = None
        self.engine: Any = None  # set by the builder once the engine exists
        self.ds_config: dict | None = None
        self.versions: dict | None = None
        self.global_batch = self.steps_per_epoch = self.total_steps = 0
        self.extra_state: Callable[[], dict] = dict
        self.load_extra_state: Callable[[dict], None] = lambda state: None

    def release_folder(self) -> None:
        """Lets go of the run folder's lock (the kernel also does on any exit)."""
        lock = getattr(self, "_folder_lock", None)
        if lock is not None:
            lock.release()

    def prepare_folder0(self) -> str | None:
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
        # a setting added to the schema after the checkpoint was written, and left at its default, is
        # the behaviour the checkpoint trained with: not a change
        default = flatten(to_dict(type(self.cfg)()))
        added = {k for k in new.keys() - old.keys() if k in default and new[k] == default[k]}
        diff = sorted(k for k in old.keys() | new.keys()
                      if old.get(k) != new.get(k) and k != "checkpoint.resume" and k not in added)
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

    def save(self, step: int, last_metrics: dict | None = None) -> Path:
        """Atomic: every rank writes into ``.tmp-step_N``; rank 0 adds trainer_state.json (with the
        manifest: size, optionally sha256, of every file) and renames. ``keep_last`` prunes only this
        run's checkpoints (``own_steps``). A write that fails (a full disk, a read-only or vanished
        folder) stops every rank with one line naming the file and the last intact checkpoint
        (:meth:`_save_failed`); nothing finished is touched."""
        name = f"{CKPT_PREFIX}{step:08d}"
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".tmp-{name}"
        why = None
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            why = failed_write(lambda: tmp.mkdir(parents=True), tmp)
        why = _first_error_all_ranks(why)  # also the barrier before the ranks write
        if why is None:
            why = _first_error_all_ranks(failed_write(lambda: self._save_rank_files(tmp), tmp))
        if why is None and self.env.is_main:
            why = failed_write(lambda: self._finish_save0(tmp, final, step, last_metrics), tmp)
        why = distenv.broadcast_object0(why)  # the barrier after rank 0's rename
        if why is not None:
            self._save_failed(why, tmp, step)
        return final

    def _save_rank_files(self, tmp: Path) -> None:
        self.engine.save(tmp / "engine")
        torch.save(_rng_state(), tmp / f"rng_rank{self.env.rank}.pt")

    def _finish_save0(self, tmp: Path, final: Path, step: int, last_metrics: dict | None) -> None:
        """Rank 0: the run's files and trainer_state.json into ``tmp``, then the rename to ``final``."""
        name = final.name
        dump_yaml(self.cfg, tmp / "config.yaml")
        if self.ds_config is not None:
            (tmp / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
        (tmp / "versions.json").write_text(json.dumps(self.versions or versions(), indent=2))
        extra = self.extra_state()
        if extra:
            torch.save(extra, tmp / "hooks_state.pt")
        spe, gb = self.steps_per_epoch, self.global_batch
        state = {"step": step, "total_steps": self.total_steps, "world_size": self.env.world_size,
                 "global_batch": gb, "steps_per_epoch": spe,
                 "data_position": {"epoch": step // spe, "batch_in_epoch": step % spe, "examples_seen": step * gb},
                 "engine": self.engine.kind, "config_class": f"{type(self.cfg).__module__}:{type(self.cfg).__qualname__}",
                 "last_metrics": last_metrics,
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
        self.own_steps.add(step)
        own = [p for p in list_checkpoints(self.ckpt_dir) if _checkpoint_step(p) in self.own_steps]
        for old in own[:-self.cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(f"{UNIVERSAL_PREFIX}{old.name}"), ignore_errors=True)  # its universal copy
        print0(f"[trainer] checkpoint {final}")

    def _save_failed(self, why: str, tmp: Path, step: int) -> None:
        """Every rank, after a failed save: rank 0 removes the unfinished ``tmp`` (it holds disk space;
        where it cannot, the next start does) and names the newest intact checkpoint; all raise the
        same RunWriteError."""
        msg = None
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            left = (f"the unfinished {tmp.name} is left (the next start removes it)" if tmp.exists()
                    else f"the unfinished {tmp.name} was removed")
            msg = self.write_stop0(f"checkpoint at step {step} not saved", why, left)
        raise RunWriteError(distenv.broadcast_object0(msg))

    def write_stop0(self, what: str, why: str, note: str = "", *, export_to: Path | None = None) -> str:
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

    def append_metrics0(self, path: Path, rec: dict) -> None:
        """Rank 0: one metrics.jsonl record; a failed write stops the run in one line."""

        def write():
            with open(path, "a") as fh:
                fh.write(json.dumps(rec, default=str) + "\n")

        why = failed_write(write, path.parent)
        if why is not None:
            raise RunWriteError(self.write_stop0(f"metrics of step {rec.get('step', '?')} not written", why))

    def resume(self, spec: str) -> int:
        """Load the newest intact checkpoint (``latest``) or the one named. A damaged one (its files
        differ from its manifest, or the engine cannot load it) is named in a warning and the next
        older is tried; none left is a CheckpointError naming the damaged file."""
        if spec in _RESUME_LATEST:
            ckpts = list_checkpoints(self.ckpt_dir)
            if not ckpts:
                print0(f"[trainer] resume: no checkpoint in {self.ckpt_dir}; starting fresh")
                return 0
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
        step = int(json.loads((path / "trainer_state.json").read_text())["step"])
        if path.parent.resolve() == self.ckpt_dir.resolve():
            # the continued run's checkpoints are this run's: keep_last prunes them, not newer ones
            self.own_steps |= {s for s in map(_checkpoint_step, list_checkpoints(self.ckpt_dir)) if s <= step}
        if self.env.is_main:
            _truncate_metrics(self.out_dir / "metrics.jsonl", step)
        distenv.barrier()
        print0(f"[trainer] resumed from {path} at step {step}")
        return step

    def _load_checkpoint(self, path: Path) -> str | None:
        """Engine, optimizer and RNG state from ``path``; the reason (naming the file where it can) when
        any rank fails, None when all loaded. A batch-layout mismatch is an error, not damage.

        Another world size with the same global batch resumes exactly: the data order depends only on
        the global batch and the step (:class:`distill.train.batches.StepBatches`), and a ZeRO-1/2/3 checkpoint's
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
                self.load_extra_state(torch.load(path / "hooks_state.pt", weights_only=False))
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
