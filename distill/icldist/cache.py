"""Offline teacher targets: the teacher's top-k for a whole prompt set in sharded safetensors files.

Layout of a cache folder::

    manifest.json            what the cache is for (teacher and its weights, k, temperature, vocabulary,
                             tokenizer, prompt set, ...); "complete": true once every shard exists
    shard-00000.safetensors  prompts [0, S): ids int32 [P, k], logprobs [P, k], tail_mass fp32 [P],
                             pos_offsets int64 [n+1], answer_ids int32, answer_offsets int64 [n+1]
    shard-00000.json         the shard's index entry (range, positions, sha256), written after it
    index.json               every shard's entry, written when the cache is complete

The top-k is the teacher's distribution at the run's ``kd.temperature`` over the tokenizer's real
vocabulary. Shards are written by rename and count as done once their entry exists and the sha256
matches, so a rerun after ``kill -9`` resumes. Reading refuses, in one line naming the first
differing field, a cache built for another run or incomplete; ids are checked when a shard is first
loaded. See docs/icldist.md, section "Teacher signal: online or cached", for the fields, the weights
fingerprint (:func:`distill.models.fingerprint.weights_fingerprint`) and the refused older formats.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from distill.errors import UserError
from distill.fileio import atomic_write_bytes, atomic_write_text, is_temporary, sha256_file
from distill.losses.teacher_output import TopKTeacher

# 2: top-k at the run's temperature over the real vocabulary; manifest records temperature and vocab_size.
FORMAT_VERSION = 2
# The teacher's fingerprint: what its answers (and so the cached targets) depend on.
ANSWER_FIELDS = ("teacher", "teacher_weights", "teacher_dtype", "teacher_quantization", "tokenizer_hash",
                 "max_new_tokens", "prompt_set_hash")
# Manifest fields that must match between the cache and the run reading or extending it.
KEY_FIELDS = ("teacher", "k", "temperature", "vocab_size", "tokenizer_hash", "prompt_set_hash", "n_prompts",
              "shard_size", "max_len", "teacher_weights", "teacher_dtype", "teacher_quantization", "max_new_tokens")
# Why a field must match, where the generic message does not say enough.
_WHY = {
    "temperature": "a top-k teacher is valid only at the temperature it was taken at",
    "vocab_size": "the top-k is taken over the teacher tokenizer's real vocabulary",
    "max_len": "prompts longer than icl.max_len lose tokens from the left, so the target positions differ",
    "teacher_weights": "the teacher's weight files, config.json or index changed since",
    "teacher_dtype": "the teacher's top-k and answers depend on the dtype it ran in",
    "teacher_quantization": "the teacher's top-k and answers depend on its quantization",
    "max_new_tokens": "the teacher's answers to fine-grained prompts were generated with this budget",
}


class CacheMismatch(UserError, ValueError):
    """The cache on disk was built for another teacher, k, temperature, tokenizer or prompt set, or in
    another format."""


class CacheIncomplete(UserError, RuntimeError):
    """Some shards are missing (the cache stage did not finish)."""


class CacheMissing(UserError, FileNotFoundError):
    """No cache at the folder the run reads (no manifest.json)."""


@dataclass
class CachedTarget:
    """One prompt's teacher signal: top-k ``[P, k]`` at its target positions (+ the teacher answer)."""

    topk: TopKTeacher
    answer_ids: list[int]




def _write_json_atomic(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def _first_difference(field: str, have, want) -> tuple[str, object, object]:
    """The first differing (dotted) field of two values, nested dicts compared key by key down to the
    innermost dict (a weight file's ``{"bytes", "mtime_ns"}`` is shown whole)."""
    nested = any(isinstance(v, dict) for d in (have, want) if isinstance(d, dict) for v in d.values())
    if isinstance(have, dict) and isinstance(want, dict) and nested:
        for k in list(want) + [k for k in have if k not in want]:
            if have.get(k) != want.get(k):
                return _first_difference(f"{field}.{k}", have.get(k), want.get(k))
    return field, have, want


def _mismatch(what: str, field: str, have, want, remedy: str) -> str:
    """``<what> ... with field=have, but this run needs field=want (why). <remedy>``: one line."""
    base = field.split(".")[0]
    why = f" ({_WHY[base]})" if base in _WHY else ""
    return f"{what} with {field}={have!r}, but this run needs {field}={want!r}{why}{remedy}"


def _mismatch_message(root: Path, field: str, have, want) -> str:
    return _mismatch(f"teacher cache {root} was built", field, have, want,
                     ". Point teacher.cache_dir at another folder (or delete this one) and rerun --stage cache.")


def _unfingerprinted_message(root: Path, field: str) -> str:
    return (
        f"teacher cache {root} records no {field}: it was written before the cache fingerprinted the teacher "
        f"(weights, dtype, quantization, max_new_tokens) and icl.max_len, so it may not match this run; rebuild it: "
        f"delete {root} and run `python launchers/icldist.py --stage cache` (same config), or point "
        f"teacher.cache_dir elsewhere."
    )


def _answers_mismatch_message(path: Path, field: str, have, want) -> str:
    return _mismatch(f"teacher answers {path} were generated", field, have, want,
                     f"; delete {path} (the answers are generated again) or use another run.out_dir.")


def check_answers(path: Path, header: dict | None, want: dict) -> None:
    """Refuse an answers file whose recorded fingerprint (its first line) differs from ``want``."""
    have = (header or {}).get("fingerprint")
    if not isinstance(have, dict):
        raise CacheMismatch(
            f"teacher answers {path} record no teacher fingerprint (written before the answers file recorded "
            f"which teacher produced it), so they may be another teacher's; delete {path} (the answers are "
            f"generated again) or use another run.out_dir."
        )
    for key in ANSWER_FIELDS:
        if key in want and have.get(key) != want[key]:
            raise CacheMismatch(_answers_mismatch_message(path, *_first_difference(key, have.get(key), want[key])))


def _format1_message(root: Path) -> str:
    return (
        f"teacher cache {root} is format 1: its top-k was taken at temperature 1 over every lm_head row "
        f"(padded ones included) and it records no temperature, while format {FORMAT_VERSION} takes it at "
        f"kd.temperature over the tokenizer's real vocabulary; rebuild it: delete {root} and run "
        f"`python launchers/icldist.py --stage cache` (same config), or point teacher.cache_dir elsewhere."
    )


def check_manifest(root: Path, have: dict, want: dict) -> None:
    """Refuse a manifest of another format, or whose key fields differ from ``want``'s."""
    # The format first: a format-1 manifest lacks the temperature, and "temperature=None" says less.
    version = have.get("format_version")
    if version == 1:
        raise CacheMismatch(_format1_message(root))
    if version != FORMAT_VERSION:
        raise CacheMismatch(_mismatch_message(root, "format_version", version, FORMAT_VERSION))
    for key in KEY_FIELDS:
        if key in want and key not in have:
            raise CacheMismatch(_unfingerprinted_message(root, key))
        if key in want and have.get(key) != want[key]:
            raise CacheMismatch(_mismatch_message(root, *_first_difference(key, have.get(key), want[key])))


def shard_name(s: int) -> str:
    return f"shard-{s:05d}"


class CacheWriter:
    """Writes shards of a cache folder; refuses a folder that holds a different cache."""

    def __init__(self, root: str | os.PathLike, manifest: dict):
        missing = [f for f in KEY_FIELDS if f not in manifest]
        if missing:
            raise ValueError(f"teacher cache {root}: the manifest lacks {missing} (every key field is recorded)")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest = {**manifest, "format_version": FORMAT_VERSION}
        path = self.root / "manifest.json"
        if path.exists():
            try:
                have = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise CacheMismatch(f"teacher cache {path}: unreadable manifest ({e}); delete the folder") from e
            check_manifest(self.root, have, self.manifest)
            self.manifest["complete"] = bool(have.get("complete"))
        else:
            self.manifest["complete"] = False
            _write_json_atomic(path, self.manifest)
        self.n_shards = -(-self.manifest["n_prompts"] // self.manifest["shard_size"])
        self._clean()

    def _clean(self) -> None:
        """Remove temporaries and shards without a valid entry (an interrupted write)."""
        done = self.done_shards()
        for f in self.root.iterdir():
            if is_temporary(f.name):
                f.unlink()
            elif f.name.startswith("shard-") and f.suffix == ".safetensors":
                s = int(f.stem.split("-")[1])
                if s not in done:
                    f.unlink()

    def shard_range(self, s: int) -> tuple[int, int]:
        size = self.manifest["shard_size"]
        return s * size, min((s + 1) * size, self.manifest["n_prompts"])

    def done_shards(self) -> set[int]:
        done = set()
        for entry in self.root.glob("shard-*.json"):
            try:
                meta = json.loads(entry.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                continue
            f = self.root / meta.get("file", "")
            if f.is_file() and f.stat().st_size == meta.get("bytes") and sha256_file(f) == meta.get("sha256"):
                done.add(int(meta["shard"]))
        return done

    def write_shard(self, s: int, targets: Sequence[CachedTarget]) -> dict:
        from safetensors.torch import save

        start, end = self.shard_range(s)
        if len(targets) != end - start:
            raise ValueError(f"shard {s}: expected {end - start} prompts, got {len(targets)}")
        k, temperature = self.manifest["k"], float(self.manifest["temperature"])
        for i, t in enumerate(targets):
            if t.topk.ids.ndim != 2 or t.topk.k != k:
                raise ValueError(f"shard {s}, prompt {start + i}: top-k shape {tuple(t.topk.ids.shape)}, want [P, {k}]")
            if t.topk.temperature != temperature:
                raise ValueError(f"shard {s}, prompt {start + i}: top-k at temperature {t.topk.temperature}, "
                                 f"but the cache is at temperature {temperature}")
        pos = torch.tensor([0] + [int(t.topk.ids.shape[0]) for t in targets]).cumsum(0)
        ans = torch.tensor([0] + [len(t.answer_ids) for t in targets]).cumsum(0)
        tails = [
            t.topk.tail_mass if t.topk.tail_mass is not None else (1 - t.topk.logprobs.float().exp().sum(-1)).clamp(0, 1)
            for t in targets
        ]
        tensors = {
            "ids": torch.cat([t.topk.ids.to(torch.int32) for t in targets]).contiguous(),
            "logprobs": torch.cat([t.topk.logprobs for t in targets]).contiguous(),
            "tail_mass": torch.cat([x.float() for x in tails]).contiguous(),
            "pos_offsets": pos.to(torch.int64),
            "answer_ids": torch.tensor([a for t in targets for a in t.answer_ids], dtype=torch.int32),
            "answer_offsets": ans.to(torch.int64),
        }
        name = shard_name(s)
        final = self.root / f"{name}.safetensors"
        atomic_write_bytes(final, save(tensors, metadata={"start": str(start), "end": str(end)}))
        meta = {
            "shard": s, "file": final.name, "start": start, "end": end, "positions": int(pos[-1]),
            "bytes": final.stat().st_size, "sha256": sha256_file(final),
        }
        _write_json_atomic(self.root / f"{name}.json", meta)
        return meta

    def finalize(self) -> None:
        done = self.done_shards()
        missing = sorted(set(range(self.n_shards)) - done)
        if missing:
            raise CacheIncomplete(f"teacher cache {self.root}: shards {missing[:10]} missing; rerun --stage cache")
        entries = [json.loads((self.root / f"{shard_name(s)}.json").read_text(encoding="utf-8")) for s in range(self.n_shards)]
        _write_json_atomic(self.root / "index.json", {"shards": entries})
        self.manifest["complete"] = True
        _write_json_atomic(self.root / "manifest.json", self.manifest)


class TeacherCache:
    """Read-only access to a complete cache; ``cache[i]`` is prompt i's :class:`CachedTarget`.

    The top-k returned carries the manifest's temperature. A shard's ids are checked against the
    manifest's ``vocab_size`` once, when the shard is first loaded
    (:class:`~distill.losses.teacher_output.TopKIdError` naming the file); :meth:`verify` loads and checks
    every shard up front.
    """

    def __init__(self, root: str | os.PathLike, expect: dict | None = None):
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.is_file():
            raise CacheMissing(
                f"no teacher cache at {self.root} (manifest.json missing): run "
                f"`python launchers/icldist.py --stage cache` first, or set teacher.source=online"
            )
        try:
            self.manifest = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheMismatch(f"teacher cache {path}: unreadable manifest ({e}); delete {self.root} and rerun "
                                f"--stage cache") from e
        check_manifest(self.root, self.manifest, expect or {})
        if not self.manifest.get("complete"):
            raise CacheIncomplete(
                f"teacher cache {self.root} is incomplete (the cache stage was interrupted): "
                f"rerun `python launchers/icldist.py --stage cache` to finish it"
            )
        index = json.loads((self.root / "index.json").read_text(encoding="utf-8"))
        self.entries = index["shards"]
        self.size = self.manifest["shard_size"]
        self.temperature = float(self.manifest["temperature"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self._open: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.manifest["n_prompts"]

    def _shard(self, s: int) -> dict[str, torch.Tensor]:
        if s not in self._open:
            from safetensors.torch import load_file

            entry = self.entries[s]
            f = self.root / entry["file"]
            if not f.is_file():
                raise CacheIncomplete(f"teacher cache {self.root}: {f.name} is missing (listed in index.json)")
            t = load_file(str(f))
            # Before any kernel indexes the student's logits with them; once per shard (CPU: no sync).
            TopKTeacher(ids=t["ids"], logprobs=t["logprobs"], tail_mass=t["tail_mass"],
                        temperature=self.temperature).check(self.vocab_size, source=f"teacher cache shard {f}")
            self._open[s] = t
        return self._open[s]

    def verify(self) -> None:
        """Load (and so check) every shard now, so a bad shard stops the run before any step."""
        for s in range(len(self.entries)):
            self._shard(s)

    def __getitem__(self, i: int) -> CachedTarget:
        if not 0 <= i < len(self):
            raise IndexError(f"prompt {i} not in teacher cache of {len(self)} prompts")
        s, j = divmod(i, self.size)
        t = self._shard(s)
        a, b = int(t["pos_offsets"][j]), int(t["pos_offsets"][j + 1])
        c, d = int(t["answer_offsets"][j]), int(t["answer_offsets"][j + 1])
        topk = TopKTeacher(ids=t["ids"][a:b], logprobs=t["logprobs"][a:b], tail_mass=t["tail_mass"][a:b],
                           temperature=self.temperature)
        return CachedTarget(topk=topk, answer_ids=t["answer_ids"][c:d].tolist())
