"""Offline top-k teacher cache for token-level KD (KnowDist), and the ``cache`` teacher backend.

    # build (the training config and overrides, so that the examples are tokenised as the run will):
    python -m distill.knowdist.topk_cache --config launchers/configs/X_knowdist.yaml --kd.topk=64 [--out DIR]
    # several GPUs: one process per GPU, each builds every world_size-th shard (no process group)
    torchrun --nproc_per_node 8 -m distill.knowdist.topk_cache --config FILE --kd.topk=64
    # then train from it (the teacher is not loaded):
    deepspeed launchers/knowdist.py --config FILE --kd.topk=64 --kd.teacher_backend=cache

The build runs the co-located teacher (the ``colocated`` backend, one copy per process, its
``rows`` path: the decoder's final hidden states at the supervised positions, the head a chunk at a
time) over the training dataset built by the trainer's own dataset factory (``data.name``, so the
same tokenisation, truncation and ``data.limit``), and stores per example the
:class:`~distill.losses.teacher_output.TopKTeacher` at that example's supervised positions (shifted labels
!= -100), at ``kd.temperature``, ``k = kd.topk``, over the tokenizer's real vocabulary. Training
from it gives the online top-k's losses (tests/knowdist/test_topk_cache.py), up to the teacher's
float rounding on other padding.

Layout of the folder (``kd.cache_dir``, "" = ``<run.out_dir>/teacher_topk``)::

    manifest.json            what the cache is for (KEY_FIELDS: tokenizer fingerprint, vocab, k,
                             temperature, teacher and its weights' fingerprint, data settings,
                             n_examples, fingerprint of the tokenised examples); "complete": true and
                             the shard list (name, first example, count, rows, bytes) once all exist
    shard-00000.safetensors  examples [0, S): ids int32 [P, k], logprobs float32 [P, k], tail_mass
                             float32 [P], offsets int64 [S+1] (example first+j has the rows
                             offsets[j]:offsets[j+1], in the order of its positions)

Every file is written to a temporary name and renamed. The manifest (complete: false) is written
before the first shard, so an interrupted build resumes (shards present are kept) and a build for
other settings into the same folder is refused; a rerun on a complete cache with the same manifest
does nothing (the teacher is not loaded).

The backend (``kd.teacher_backend=cache``) checks the manifest against the run when the trainer builds
it, before step 1: a missing, incomplete or damaged cache, or one whose KEY_FIELDS differ, is a
one-line :class:`TopKCacheError` naming the file and the field. Batches say which examples they hold
(``example_index``, from the sft dataset; ``pack_index`` when packed): ``rows(batch, index)`` gives
their rows in :func:`distill.losses.lean.supervised_rows` order (row-major over the batch, examples
laid out by the collate or by packing), ``__call__(batch)`` the ``[B, L, k]`` layout of
``kd.path=logits`` with a filler at unsupervised positions. The rows are read from the shards'
memory maps (nothing is loaded whole) and their ids are checked on the CPU where they enter (in
range, distinct), before they are moved to the device.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from array import array
from pathlib import Path

import torch

from distill.config import ConfigError, RunConfig
from distill.errors import UserError
from distill.fileio import atomic_write_bytes, atomic_write_text, is_temporary, size_problem
from distill.losses.teacher_output import TopKTeacher
from distill.data.registry import dataset_factory
from distill.teacher.base import BackendContext, TeacherBackend
from distill.teacher.registry import teacher_factory

FORMAT = "distill-knowdist-topk-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_EXAMPLES = 2048  # examples per shard file
# Manifest fields that must equal the run's (dotted: nested in the manifest), checked in this order.
KEY_FIELDS = ("format", "format_version", "tokenizer", "vocab_size", "k", "temperature", "teacher", "teacher_weights",
              "data.name", "data.path", "data.format", "data.split", "data.prompt_field", "data.response_field",
              "data.max_len", "data.add_eos", "data.limit", "n_examples", "examples_fingerprint")
IGNORE_INDEX = -100


class TopKCacheError(UserError, ValueError):
    """A top-k cache that is missing, incomplete, damaged or built for another run (names the file)."""


def cache_dir(cfg: RunConfig) -> Path:
    """``kd.cache_dir``, or ``<run.out_dir>/teacher_topk`` when it is empty."""
    return Path(cfg.kd.cache_dir) if cfg.kd.cache_dir else Path(cfg.run.out_dir) / "teacher_topk"


def shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


def examples_fingerprint(dataset) -> str:
    """sha256 (16 hex) of every example's ``input_ids`` and ``labels``, in dataset order."""
    h = hashlib.sha256()
    for i in range(len(dataset)):
        it = dataset[i]
        ids, labels = it["input_ids"], it["labels"]
        h.update(array("q", (len(ids), len(labels))).tobytes())
        h.update(array("q", ids).tobytes())
        h.update(array("q", labels).tobytes())
    return h.hexdigest()[:16]


def _local_path(p: str) -> str:
    """An existing path made absolute (a hub name as given)."""
    return str(Path(p).expanduser().resolve()) if p and Path(p).expanduser().exists() else p


def _teacher_weights(teacher: str) -> str:
    from distill.models.fingerprint import weights_fingerprint

    return hashlib.sha256(json.dumps(weights_fingerprint(teacher), sort_keys=True).encode()).hexdigest()[:16]


def run_key(cfg: RunConfig, *, teacher_path: str, tokenizer, vocab_size: int, dataset) -> dict:
    """The manifest's KEY_FIELDS for this run (``data`` nested)."""
    from distill.models.fingerprint import tokenizer_fingerprint

    d = cfg.data
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
            "vocab_size": int(vocab_size), "k": int(cfg.kd.topk), "temperature": float(cfg.kd.temperature),
            "teacher": _local_path(teacher_path), "teacher_weights": _teacher_weights(teacher_path),
            "data": {"name": d.name, "path": _local_path(d.path), "format": d.format, "split": d.split,
                     "prompt_field": d.prompt_field, "response_field": d.response_field, "max_len": d.max_len,
                     "add_eos": d.add_eos, "limit": d.limit},
            "n_examples": len(dataset), "examples_fingerprint": examples_fingerprint(dataset)}


def _field(m: dict, dotted: str):
    for part in dotted.split("."):
        m = m.get(part) if isinstance(m, dict) else None
    return m


def _read_manifest(path: Path) -> dict:
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TopKCacheError(f"{path}: unreadable ({type(e).__name__}: {e}); delete the folder and rebuild the "
                             f"cache (python -m distill.knowdist.topk_cache --config ...)") from None
    if not isinstance(m, dict):
        raise TopKCacheError(f"{path}: not a top-k cache manifest (a JSON object); delete the folder and rebuild it")
    return m


def check_key(path: Path, have: dict, want: dict, remedy: str) -> None:
    """The first KEY_FIELD where the manifest ``have`` differs from the run's ``want``: one line."""
    for f in KEY_FIELDS:
        a, b = _field(have, f), _field(want, f)
        if a != b:
            raise TopKCacheError(f"{path}: field '{f}' is {a!r} in the cache, {b!r} for this run: the cache was "
                                 f"built for another teacher, tokenizer, k, temperature or data; {remedy}")


def _build_env():
    """(DistEnv, device) of a build process: one per GPU under torchrun / deepspeed, no process group."""
    from distill.dist.env import read_env

    env = read_env([])
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return env, torch.device("cuda", torch.cuda.current_device())
    return env, torch.device("cpu")


def _say(msg: str) -> None:
    print(f"[topk_cache] {msg}", file=sys.stderr, flush=True)


def check_cache_config(cfg: RunConfig) -> None:
    """The run can build a top-k cache: a teacher and ``kd.topk`` >= 1, else a one-line ConfigError."""
    k = cfg.kd
    if k.kind == "none" or k.topk < 1:
        raise ConfigError(f"the top-k cache needs a teacher and kd.topk >= 1 (kd.kind={k.kind}, kd.topk={k.topk}): "
                          f"set --kd.topk=K (the k the training run uses)")


def build_topk_cache(cfg: RunConfig, out: str | Path | None = None, *, batch_size: int = 0,
                     shard_examples: int = SHARD_EXAMPLES) -> Path:
    """Build (or finish) the top-k cache of ``cfg``'s teacher over ``cfg``'s training data in ``out``
    (default :func:`cache_dir`); a no-op when it is complete for the same manifest. ``batch_size``:
    examples per teacher forward (0 = ``train.micro_batch``). Under ``RANK``/``WORLD_SIZE`` (torchrun)
    each process builds shards ``rank, rank + world, ...``; the last to finish marks it complete."""
    from distill.models import load as ml

    check_cache_config(cfg)
    out = Path(out) if out else cache_dir(cfg)
    env, device = _build_env()
    student_path, teacher_path = ml.resolve_builtin(cfg.model, cfg.run.out_dir)
    tok_name = cfg.model.tokenizer or student_path
    tokenizer = ml.load_tokenizer(tok_name, trust_remote_code=cfg.model.trust_remote_code,
                                  what="tokenizer folder (model.tokenizer)" if cfg.model.tokenizer
                                  else "student folder (model.student)")
    vocab = cfg.model.vocab_size or len(tokenizer)
    ctx = BackendContext(env=env, device=device, tokenizer=tokenizer, vocab_size=vocab, student_path=student_path,
                         teacher_path=teacher_path, ds_config=None, out_dir=Path(cfg.run.out_dir))
    dataset = _build_dataset(cfg, tokenizer, ctx)
    key = run_key(cfg, teacher_path=teacher_path, tokenizer=tokenizer, vocab_size=vocab, dataset=dataset)
    n = len(dataset)
    n_shards = max(1, math.ceil(n / shard_examples))
    if _open_manifest(out, key, shard_examples):
        return out
    if env.world_size == 1:  # an interrupted build's temporaries (with several processes: theirs may be live)
        for f in out.iterdir():
            if is_temporary(f.name):
                f.unlink(missing_ok=True)

    mine = [s for s in range(n_shards) if s % env.world_size == env.rank and not (out / shard_name(s)).is_file()]
    if mine:
        _build_shards(cfg, ctx, dataset, out, mine, key, batch_size=batch_size or cfg.train.micro_batch,
                      shard_examples=shard_examples)
    built = {"device": device.type, "teacher_dtype": cfg.model.teacher_dtype, "dtype": cfg.model.dtype,
             "teacher_quantization": getattr(getattr(cfg, "teacher", None), "quantization", ""),
             "batch_size": batch_size or cfg.train.micro_batch}
    return _finalize(out, key, n_shards, shard_examples, built)


def _build_dataset(cfg: RunConfig, tokenizer, ctx: BackendContext):
    """The run's training dataset (``data.name``'s factory); one the sft collate or packing batches."""
    dataset = dataset_factory(cfg.data.name)(cfg, tokenizer, ctx)
    if getattr(dataset, "collate", None) is not None:
        raise ConfigError(f"data.name={cfg.data.name!r} builds its own batches; the top-k cache serves datasets "
                          f"batched by the sft collate or by packing (e.g. data.name=sft)")
    return dataset


def _open_manifest(out: Path, key: dict, shard_examples: int) -> bool:
    """Check ``out``'s manifest against the run (or write a new, incomplete one); True when the cache is
    already complete for this run, so there is nothing to build."""
    mpath = out / MANIFEST
    remedy = f"build into another folder (--out) or delete {out}"
    if not mpath.is_file():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(mpath, json.dumps({**key, "complete": False, "shard_examples": shard_examples}, indent=1))
        return False
    have = _read_manifest(mpath)
    check_key(mpath, have, key, remedy)
    if have.get("shard_examples") != shard_examples:
        raise TopKCacheError(f"{mpath}: field 'shard_examples' is {have.get('shard_examples')!r} in the cache, "
                             f"{shard_examples} for this build; rerun with --shard-examples="
                             f"{have.get('shard_examples')} or {remedy}")
    if not have.get("complete"):
        return False
    why = _shards_problem(out, have)
    if why:
        raise TopKCacheError(f"{why}: the top-k cache is damaged; delete {out} and rebuild it")
    _say(f"{out} is complete for this run ({key['n_examples']} examples, {have.get('n_rows')} rows, k={key['k']}, "
         f"T={key['temperature']:g}): nothing to do")
    return True


def _build_shards(cfg: RunConfig, ctx: BackendContext, dataset, out: Path, mine: list[int], key: dict, *,
                  batch_size: int, shard_examples: int) -> None:
    """Run the co-located teacher over the examples of shards ``mine`` and write each shard."""
    n = len(dataset)
    teacher = teacher_factory("colocated")(cfg, ctx)
    bar = None
    if cfg.log.progress_bar and ctx.env.rank == 0:
        from distill.progress import progress

        total = sum(min(n, (s + 1) * shard_examples) - s * shard_examples for s in mine)
        bar = progress(total, "teacher top-k", unit="ex", dynamic_ncols=True, mininterval=1.0)
    t0 = time.time()
    for s in mine:
        lo, hi = s * shard_examples, min(n, (s + 1) * shard_examples)
        per = _teacher_rows(teacher, dataset, range(lo, hi), batch_size, ctx, bar)
        _write_shard(out / shard_name(s), per, lo, key)
    teacher.close()
    if bar:
        bar.close()
    _say(f"rank {ctx.env.rank}: {len(mine)} shard(s) of {out} written in {time.time() - t0:.0f} s")


def _teacher_rows(teacher, dataset, examples: range, batch_size: int, ctx: BackendContext, bar) -> list[TopKTeacher]:
    """The teacher's top-k at the supervised positions of each example of ``examples``, in that order."""
    from distill.data.sft import collate
    from distill.losses.lean import supervised_rows

    lo = examples.start
    per: list[TopKTeacher | None] = [None] * len(examples)
    # longest first, similar lengths together: little padding per forward
    order = sorted(examples, key=lambda i: -len(dataset[i]["input_ids"]))
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        batch = collate([dataset[i] for i in idx], ctx.tokenizer.pad_token_id)
        index, _ = supervised_rows(batch["labels"], IGNORE_INDEX)
        dev = {kk: (v.to(ctx.device) if isinstance(v, torch.Tensor) else v) for kk, v in batch.items()}
        t = teacher.rows(dev, index.to(ctx.device)).to("cpu")
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
        start = 0
        for i, c in zip(idx, counts):
            per[i - lo] = t[start:start + c]
            start += c
        if bar:
            bar.update(len(idx))
    return per


def _write_shard(path: Path, per: list[TopKTeacher], first: int, key: dict) -> None:
    from safetensors.torch import save

    counts = [p.ids.shape[0] for p in per]
    offsets = torch.zeros(len(per) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    tensors = {"ids": torch.cat([p.ids.to(torch.int32) for p in per]).contiguous(),
               "logprobs": torch.cat([p.logprobs.to(torch.float32) for p in per]).contiguous(),
               "tail_mass": torch.cat([p.tail_mass.to(torch.float32) for p in per]).contiguous(),
               "offsets": offsets}
    meta = {"first": str(first), "count": str(len(per)), "k": str(key["k"]), "temperature": repr(key["temperature"])}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def _shard_entries(out: Path, n_shards: int) -> list[dict] | None:
    """Every shard's manifest entry, None while one is missing."""
    from safetensors import safe_open

    entries = []
    for s in range(n_shards):
        f = out / shard_name(s)
        if not f.is_file():
            return None
        with safe_open(str(f), "pt") as h:
            meta = h.metadata() or {}
            rows = h.get_slice("ids").get_shape()[0]
        entries.append({"file": f.name, "first": int(meta["first"]), "count": int(meta["count"]), "rows": rows,
                        "bytes": f.stat().st_size})
    return entries


def _finalize(out: Path, key: dict, n_shards: int, shard_examples: int, built: dict) -> Path:
    entries = _shard_entries(out, n_shards)
    if entries is None:
        _say(f"{out}: other processes are still writing shards; the last to finish marks the cache complete")
        return out
    manifest = {**key, "complete": True, "shard_examples": shard_examples, "n_rows": sum(e["rows"] for e in entries),
                "shards": entries,  # "built": how (informational, not checked)
                "built": {**built, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__}}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))  # written last: marks complete
    _say(f"{out} complete: {key['n_examples']} examples, {manifest['n_rows']} rows, k={key['k']}, "
         f"T={key['temperature']:g}, {sum(e['bytes'] for e in entries) / 2**20:.1f} MiB in {n_shards} shard(s)")
    return out


def _shards_problem(out: Path, manifest: dict) -> str | None:
    """Why the shards of a complete manifest cannot be read ("<file>: <reason>"), None when they can."""
    for e in manifest.get("shards") or []:
        why = size_problem(out / e["file"], e["bytes"], "the manifest says")
        if why:
            return why
    if not manifest.get("shards"):
        return f"{out / MANIFEST}: field 'shards' is empty"
    return None


# ------------------------------------------------------------------------------------------------
# Reading: the `cache` teacher backend


class TopKCache:
    """A complete cache folder checked against ``want`` (KEY_FIELDS); ``example(i)`` -> (ids, logprobs,
    tail_mass) CPU tensors of example i's rows, sliced from the shard's memory map."""

    _DTYPES = {"ids": "I32", "logprobs": "F32", "tail_mass": "F32", "offsets": "I64"}

    def __init__(self, root: str | Path, want: dict):
        from safetensors import safe_open

        self.root = Path(root)
        mpath = self.root / MANIFEST
        build = f"python -m distill.knowdist.topk_cache --config <this run's config> <its overrides> --out {self.root}"
        if not mpath.is_file():
            raise TopKCacheError(f"{mpath}: missing: kd.teacher_backend=cache needs the top-k cache built first "
                                 f"({build}), or kd.cache_dir pointing at it")
        m = _read_manifest(mpath)
        check_key(mpath, m, want, "build one for this run into another folder (the same command with --out NEW_DIR, "
                                  "then train with --kd.cache_dir=NEW_DIR), or train with the cache's settings")
        if not m.get("complete"):
            raise TopKCacheError(f"{mpath}: field 'complete' is false: the build did not finish; rerun it ({build}; it "
                                 f"resumes)")
        why = _shards_problem(self.root, m)
        if why:
            raise TopKCacheError(f"{why}: the top-k cache is damaged; delete {self.root} and rebuild it ({build})")
        self.manifest = m
        self.k, self.temperature, self.vocab_size = int(m["k"]), float(m["temperature"]), int(m["vocab_size"])
        self.shard_examples = int(m["shard_examples"])
        self.handles, self.offsets = [], []
        for s, e in enumerate(m["shards"]):
            f = self.root / e["file"]
            try:
                h = safe_open(str(f), "pt")
                for name, dt in self._DTYPES.items():
                    got = h.get_slice(name).get_dtype()
                    if got != dt:
                        raise TopKCacheError(f"{f}: tensor '{name}' is {got}, the cache format stores {dt}; rebuild it")
                off = h.get_tensor("offsets")
            except TopKCacheError:
                raise
            except Exception as ex:  # noqa: BLE001 - a header safetensors cannot parse, a missing tensor
                raise TopKCacheError(f"{f}: unreadable ({type(ex).__name__}: {ex}); delete {self.root} and rebuild "
                                     f"it ({build})") from None
            if e["first"] != s * self.shard_examples or len(off) != e["count"] + 1 or int(off[-1]) != e["rows"]:
                raise TopKCacheError(f"{f}: its offsets do not match the manifest's entry {e}; rebuild the cache")
            self.handles.append(h)
            self.offsets.append(off.tolist())

    def __len__(self) -> int:
        return int(self.manifest["n_examples"])

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, j = divmod(int(i), self.shard_examples)
        a, b = self.offsets[s][j], self.offsets[s][j + 1]
        h = self.handles[s]
        return h.get_slice("ids")[a:b], h.get_slice("logprobs")[a:b], h.get_slice("tail_mass")[a:b]


def batch_examples(batch: dict, backend: str = "cache") -> list[int]:
    """The batch's example indices in the order of its flat positions: the collate's rows, or, when
    packed, by (row, offset) of ``pack_index``."""
    idx = batch.get("example_index")
    if idx is None:
        raise TopKCacheError(f"kd.teacher_backend={backend}: the batch carries no 'example_index' (the sft dataset's "
                             f"items have it); a dataset of another data.name must pass its example indices through")
    pack = batch.get("pack_index")
    order = range(len(idx)) if pack is None else sorted(range(len(idx)), key=lambda b: (pack[b][0], pack[b][1]))
    return [int(idx[b]) for b in order]


class CachedTopKTeacher(TeacherBackend):
    """``kd.teacher_backend=cache``: the teacher's top-k read from :func:`build_topk_cache`'s folder."""

    topk_ids_checked = True  # checked on the CPU in _gather, where they enter
    softcap = None

    def __init__(self, cfg: RunConfig, ctx: BackendContext):
        root = cache_dir(cfg)
        # the run's dataset: its fingerprint must be the cache's
        want = run_key(cfg, teacher_path=ctx.teacher_path, tokenizer=ctx.tokenizer, vocab_size=ctx.vocab_size,
                       dataset=ctx.dataset)
        self.cache = TopKCache(root, want)
        self.vocab_size = ctx.vocab_size
        self.topk, self.temperature = self.cache.k, self.cache.temperature
        if ctx.env.is_main:
            _say(f"teacher = {root} ({len(self.cache)} examples, {self.cache.manifest['n_rows']} rows, k={self.topk}, "
                 f"T={self.temperature:g}, teacher {self.cache.manifest['teacher']})")

    def _gather(self, batch: dict) -> TopKTeacher:
        """The batch's rows in supervised_rows order, on the CPU, ids checked."""
        examples = batch_examples(batch)
        parts = [self.cache.example(i) for i in examples]
        ids, lp, tail = (torch.cat([p[j] for p in parts]) for j in range(3))
        t = TopKTeacher(ids=ids, logprobs=lp, tail_mass=tail, temperature=self.temperature)
        return t.check(self.vocab_size, f"top-k cache {self.cache.root} (examples {examples[:8]})")

    def _count_check(self, t: TopKTeacher, n: int, batch: dict) -> None:
        if t.ids.shape[0] != n:
            raise TopKCacheError(f"{self.cache.root / MANIFEST}: the cache holds {t.ids.shape[0]} rows for examples "
                                 f"{batch_examples(batch)[:8]}, the batch has {n} supervised positions: the data "
                                 f"changed since the cache was built; rebuild it")

    @staticmethod
    def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True)
        return x.to(device)

    @torch.no_grad()
    def rows(self, batch: dict, index: torch.Tensor) -> TopKTeacher:
        t = self._gather(batch)
        self._count_check(t, int(index.shape[0]), batch)
        dev = index.device
        return TopKTeacher(ids=self._to(t.ids, dev), logprobs=self._to(t.logprobs, dev),
                           tail_mass=self._to(t.tail_mass, dev), temperature=t.temperature)

    @torch.no_grad()
    def __call__(self, batch: dict) -> TopKTeacher:
        """``kd.path=logits``: ``[B, L, k]`` at the batch's positions, the cached rows where the next
        token is supervised and a filler (ids 0..k-1, uniform, tail 0) elsewhere, which the
        objective masks out (as ColocatedTeacher.topk_on_supervised)."""
        from distill.losses.lean import supervised_rows

        labels = batch["labels"]
        index, _ = supervised_rows(labels.cpu(), IGNORE_INDEX)
        t = self._gather(batch)
        self._count_check(t, int(index.shape[0]), batch)
        B, L = labels.shape
        k = self.topk
        ids = torch.arange(k, dtype=torch.int32).expand(B * L, k).clone()
        lp = torch.full((B * L, k), -math.log(k), dtype=torch.float32)
        tail = torch.zeros(B * L, dtype=torch.float32)
        ids[index], lp[index], tail[index] = t.ids, t.logprobs, t.tail_mass
        dev = labels.device
        return TopKTeacher(ids=self._to(ids.reshape(B, L, k), dev), logprobs=self._to(lp.reshape(B, L, k), dev),
                           tail_mass=self._to(tail.reshape(B, L), dev), temperature=self.temperature)


# ------------------------------------------------------------------------------------------------
# CLI
