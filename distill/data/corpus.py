"""A KnowDist corpus on disk: sharded JSONL or Parquet records plus a manifest, crash-safe. Written by
:mod:`distill.knowdist.harvest`, read as SFT data by :mod:`distill.data.sft` (so it lives in the data layer).

Layout of a corpus folder::

    manifest.json              # config fingerprint, shard size, completed shards {index: stats}
    shard-00000.jsonl          # records of jobs [0, S), written atomically
    shard-00001.jsonl ...
    summary.json               # totals, filter counts, throughput (written at the end)

Every record is ``{id, text, perspective, prompt, response, teacher, sampling}``. A shard file is
written to a dot-file, fsynced and renamed, and only then entered in the manifest (itself replaced
atomically). A crash or ``kill -9`` at any point therefore leaves either a finished shard listed in
the manifest or nothing: a re-run redoes exactly the unlisted shards and overwrites any unlisted
file, so no record is ever written twice. The folder reads directly as (prompt, response) SFT data
(``distill.data.sft.read_records`` skips manifest.json and summary.json).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from distill.errors import UserError
from distill.fileio import atomic_write_bytes, is_temporary

MANIFEST = "manifest.json"
SUMMARY = "summary.json"
# What to do about a damaged shard the manifest lists: the harvest redoes every unlisted shard.
REDO = "remove its entry from manifest.json's 'completed' and rerun the harvest to redo it"
FIELDS = ("id", "text", "perspective", "prompt", "response", "teacher", "sampling")


class CorpusError(UserError, ValueError):
    """A corpus folder that cannot be read or resumed; the message names the file."""


def shard_name(index: int, fmt: str) -> str:
    return f"shard-{index:05d}.{'parquet' if fmt == 'parquet' else 'jsonl'}"


def write_shard(folder: Path, index: int, records: list[dict], fmt: str) -> Path:
    path = folder / shard_name(index, fmt)
    if fmt == "parquet":
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [dict(r, sampling=json.dumps(r["sampling"], sort_keys=True)) for r in records]
        schema = pa.schema([(f, pa.string()) for f in FIELDS])
        table = pa.Table.from_pylist(rows, schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        atomic_write_bytes(path, buf.getvalue())
    else:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        atomic_write_bytes(path, data)
    return path


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path}: not valid JSON ({e}); delete the folder to start over") from None
    except OSError as e:
        raise CorpusError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(man, dict) or not isinstance(man.get("completed", {}), dict):
        raise CorpusError(f"{path}: not a KnowDist manifest (expected an object with a 'completed' mapping); "
                          "delete the folder to start over")
    return man


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_bytes(Path(folder) / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8"))


def clean_partial(folder: Path) -> list[str]:
    """Remove temp files and shard files the manifest does not list (left by a crash)."""
    folder = Path(folder)
    man = read_manifest(folder) or {"completed": {}}
    listed = {v["file"] for v in man.get("completed", {}).values()}
    removed = []
    for p in folder.iterdir():
        if is_temporary(p.name):
            p.unlink()
            removed.append(p.name)
        elif p.name.startswith("shard-") and p.name not in listed:
            p.unlink()
            removed.append(p.name)
    return removed


def corpus_status(folder: Path) -> tuple[int, int, list[str]] | None:
    """(shards done, shards expected, the done shards' file names in shard order) of a KnowDist corpus
    folder, from its manifest; None when the folder has no KnowDist manifest (e.g. plain SFT files).
    A listed shard that is missing is a CorpusError."""
    folder = Path(folder)
    man = read_manifest(folder)
    if man is None or "completed" not in man or not isinstance(man.get("n_shards"), int):
        return None
    try:
        items = sorted(man["completed"].items(), key=lambda kv: int(kv[0]))
        names = [str(v["file"]) for _, v in items]
    except (ValueError, TypeError, KeyError) as e:
        raise CorpusError(f"{folder / MANIFEST}: malformed 'completed' entry ({e!r}); delete the folder to start over") from None
    for name in names:
        if not (folder / name).is_file():
            raise CorpusError(f"{folder / MANIFEST}: lists {name}, which is missing; {REDO}")
    return len(names), man["n_shards"], names


def _read_shard(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        import pyarrow as pa

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise CorpusError(f"{path}: not a readable Parquet shard ({e}); {REDO}") from None
        for r in rows:
            r["sampling"] = json.loads(r["sampling"]) if isinstance(r.get("sampling"), str) else r.get("sampling")
        return rows
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start} of the line); "
                                  f"{REDO}") from None
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{n}: not valid JSON ({e}); {REDO}") from None
    return out


def load_corpus(folder: str | os.PathLike, *, completed_only: bool = True) -> list[dict]:
    """All records of a corpus folder, shard order; only shards listed in the manifest."""
    folder = Path(folder)
    man = read_manifest(folder)
    if man is None:
        raise CorpusError(f"{folder}: no {MANIFEST}; not a KnowDist corpus folder")
    files = [v["file"] for _, v in sorted(man.get("completed", {}).items(), key=lambda kv: int(kv[0]))]
    records: list[dict] = []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CorpusError(f"{folder / MANIFEST}: lists {name}, which is missing; {REDO}")
        for i, r in enumerate(_read_shard(path)):
            missing = [f for f in FIELDS if f not in r]
            if missing:
                raise CorpusError(f"{path}: record {i} lacks field(s) {missing}")
            records.append(r)
    return records
