"""(prompt, response) records -> token ids with the prompt masked out of the loss, and the collator.

Sources: a JSONL file (one object per line), a JSON array, a Parquet file, a folder of such files
(sorted by name; ``*.jsonl``, ``*.jsonl.gz``, ``*.json``, ``*.parquet``), or anything
``datasets.load_dataset`` reads (a hub name or a local script/folder). A KnowDist corpus folder
(``manifest.json`` with ``n_shards``) reads only the shards its manifest lists, and one whose
harvest did not finish is refused unless ``allow_partial`` (``data.allow_partial``). Every record needs a
non-empty string prompt and response (field names configurable); other fields such as ``id`` are
kept and travel with the batch (``example_id``). A malformed record is an error naming the file,
the line (1-based) and the field; so is an unreadable file (missing, empty, not UTF-8, a truncated
gzip, a corrupt Parquet file): every such failure is a :class:`DataError` on one line.

Tokenisation: ``ids = prompt_ids + response_ids (+ eos)``; ``labels`` = ids with the prompt
positions set to -100 (HF convention: the objective shifts them). Longer than ``max_len``: the
prompt is cut from the left first (its end, next to the response, is kept), then the response
from the right.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from distill.data import corpus as C
from distill.errors import UserError, one_line

IGNORE_INDEX = -100


class DataError(UserError, ValueError):
    """A malformed dataset record; the message names the file, the line and the field."""


@dataclass
class Record:
    prompt: str
    response: str
    example_id: str
    where: str  # "file:line" for error messages


def iter_lines(path: Path):
    """The file's lines as bytes, streamed (gunzipped for ``*.gz``); a read failure is a DataError."""
    n = 0
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as fh:
            for n, raw in enumerate(fh, 1):
                yield raw
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        after = f" after line {n}" if n else ""
        raise DataError(f"{path}: truncated or corrupt gzip file{after} ({e}); re-create or re-download it") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None


def _read_bytes(path: Path) -> bytes:
    return b"".join(iter_lines(path))


def _decode(data: bytes, path: Path, line: int = 0, base: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = base + e.start
        n = line or data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{n}: not valid UTF-8 (byte 0x{data[e.start]:02x} at byte offset {at}); "
                        "re-save the file as UTF-8") from None


def _check_record(obj, where: str, prompt_field: str, response_field: str) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: record must be a JSON object, got {type(obj).__name__}")
    out = []
    for f in (prompt_field, response_field):
        if f not in obj:
            raise DataError(f"{where}: missing field '{f}' (fields present: {sorted(obj)}); "
                            "set data.prompt_field / data.response_field to the record's field names")
        v = obj[f]
        if not isinstance(v, str):
            raise DataError(f"{where}: field '{f}' must be a string, got {type(v).__name__}")
        if not v.strip():
            raise DataError(f"{where}: field '{f}' is empty")
        out.append(v)
    return out[0], out[1]


def _read_jsonl(path: Path, pf: str, rf: str) -> list[Record]:
    recs = []
    offset = 0
    for i, raw in enumerate(iter_lines(path), 1):
        line = _decode(raw, path, i, offset)
        offset += len(raw)
        if i == 1:
            line = line.lstrip("\ufeff")  # a UTF-8 byte-order mark (Windows editors)
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); fix or remove the line "
                            "(JSON lines: one object per line)") from None
        p, r = _check_record(obj, where, pf, rf)
        recs.append(Record(p, r, str(obj.get("id", obj.get("example_id", f"{path.name}:{i}"))), where))
    return recs


def _read_json_array(path: Path, pf: str, rf: str) -> list[Record]:
    text = _decode(_read_bytes(path), path).lstrip("\ufeff")
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); fix the file "
                        "(a .json file holds one array of records; use .jsonl for one record per line)") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: top level must be a JSON array of records (or use JSON lines)")
    recs = []
    for i, obj in enumerate(data):
        where = f"{path}: record {i}"
        p, r = _check_record(obj, where, pf, rf)
        recs.append(Record(p, r, str(obj.get("id", f"{path.name}:{i}")), where))
    return recs


def _read_rows(rows, name: str, pf: str, rf: str) -> list[Record]:
    recs = []
    for i, obj in enumerate(rows):
        where = f"{name}: row {i}"
        p, r = _check_record(dict(obj), where, pf, rf)
        recs.append(Record(p, r, str(obj.get("id", f"{i}")), where))
    return recs


def files_in(folder: Path) -> list[Path]:
    pats = ("*.jsonl", "*.jsonl.gz", "*.json", "*.parquet")
    files = sorted({f for p in pats for f in folder.glob(p) if not f.name.startswith(".")})
    # A manifest describes shards; it is not a shard.
    return [f for f in files if f.name not in ("manifest.json", "summary.json")]


def _corpus_files(folder: Path, allow_partial: bool) -> list[Path] | None:
    """The shards a KnowDist corpus folder's manifest lists (None: not such a folder); an unfinished
    harvest is a DataError unless ``allow_partial``, then a one-line warning with the counts."""
    status = C.corpus_status(folder)
    if status is None:
        return None
    done, expected, names = status
    if done < expected:
        msg = (f"{folder}: an unfinished KnowDist harvest ({done}/{expected} shards done, per its "
               f"{C.MANIFEST})")
        if not allow_partial:
            raise DataError(f"{msg}; finish it by rerunning the harvest (python launchers/harvest.py --config "
                            f"<your config> --output.dir={folder}; it resumes), or train on the "
                            f"{done} finished shards with --data.allow_partial=true")
        if os.environ.get("RANK", "0") in ("", "0"):
            print(f"[data] warning: {msg}: training on the {done} finished shards only (data.allow_partial=true)",
                  file=sys.stderr, flush=True)
    return [folder / n for n in names]


def read_records(path: str, fmt: str = "auto", *, prompt_field: str = "prompt", response_field: str = "response",
                 split: str = "train", limit: int = 0, allow_partial: bool = False) -> list[Record]:
    """All (prompt, response) records of ``path`` (see the module docstring)."""
    p = Path(path)
    if fmt == "datasets" or (fmt == "auto" and not p.exists()):
        # A hub name is "name" or "org/name"; anything else that looks like a path is a missing file.
        local = (p.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1
                 or p.suffix in (".jsonl", ".json", ".parquet", ".gz") or "/" in path and p.parent.exists())
        if fmt == "auto" and local:
            raise DataError(f"data.path: {path} does not exist; check the path")
        import datasets

        try:
            ds = datasets.load_dataset(path, split=split)
        except Exception as e:  # noqa: BLE001 - re-raised with the source named
            raise DataError(f"data.path: could not load {path!r} (split {split!r}) with datasets: {e}") from e
        for f in (prompt_field, response_field):
            if f not in ds.column_names:
                raise DataError(f"{path}: missing field '{f}' (columns: {ds.column_names})")
        recs = _read_rows(ds, path, prompt_field, response_field)
    elif p.is_dir():
        files = _corpus_files(p, allow_partial)
        if files is None:
            files = files_in(p)
            if not files:
                raise DataError(f"data.path: folder {p} holds no *.jsonl, *.jsonl.gz, *.json or *.parquet files; "
                                "point data.path at a data file or a folder of them")
        recs = []
        for f in files:
            recs += _read_file(f, "auto", prompt_field, response_field)
        if not recs:
            raise DataError(f"data.path: the {len(files)} data file(s) of folder {p} hold no records")
    else:
        if not p.is_file():
            raise DataError(f"data.path: {p} does not exist; check the path")
        recs = _read_file(p, fmt, prompt_field, response_field)
        if not recs:
            raise DataError(f"{p}: the file holds no records (it is empty); check data.path")
    if limit:
        recs = recs[:limit]
    return recs


def _read_file(p: Path, kind: str, prompt_field: str, response_field: str) -> list[Record]:
    if kind == "auto":
        name = p.name.lower().removesuffix(".gz")
        kind = "parquet" if name.endswith(".parquet") else "json" if name.endswith(".json") else "jsonl"
    if kind == "jsonl":
        recs = _read_jsonl(p, prompt_field, response_field)
    elif kind == "json":
        recs = _read_json_array(p, prompt_field, response_field)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{p}: not a readable Parquet file ({one_line(e)}); re-create or re-download it") from None
        for f in (prompt_field, response_field):
            if f not in table.column_names:
                raise DataError(f"{p}: missing field '{f}' (columns: {table.column_names}); "
                                "set data.prompt_field / data.response_field to the file's column names")
        recs = _read_rows(table.to_pylist(), str(p), prompt_field, response_field)
    return recs


class SFTDataset:
    """Tokenised (prompt, response) examples: ``ds[i]`` -> dict of input_ids, labels, example_id and
    example_index (``i``: batches say which examples they hold, e.g. for an offline teacher cache)."""

    def __init__(self, records: list[Record], tokenizer, max_len: int, add_eos: bool = True):
        if not records:
            raise DataError("the dataset is empty")
        self.records = records
        self.items = [self._encode(r, tokenizer, max_len, add_eos) | {"example_index": i}
                      for i, r in enumerate(records)]

    @staticmethod
    def _encode(r: Record, tok, max_len: int, add_eos: bool) -> dict:
        p = tok(r.prompt, add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
            p = [tok.bos_token_id] + p
        resp = tok(r.response, add_special_tokens=False)["input_ids"]
        if add_eos and tok.eos_token_id is not None:
            resp = resp + [tok.eos_token_id]
        over = len(p) + len(resp) - max_len
        if over > 0:
            cut = min(over, max(0, len(p) - 1))  # keep at least one prompt token to condition on
            p = p[cut:]
            resp = resp[: max_len - len(p)]
        if not resp:
            raise DataError(f"{r.where}: no response token left within data.max_len={max_len}")
        ids = p + resp
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(p) + resp, "example_id": r.example_id}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest item. Tensors: input_ids, attention_mask, labels [B, L]; every other
    key is passed through as a list (e.g. ``example_id``, ``example_index``)."""
    import torch

    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    att = torch.zeros((len(items), width), dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        ids[b, :n] = torch.tensor(it["input_ids"])
        labels[b, :n] = torch.tensor(it["labels"])
        att[b, :n] = 1
    batch = {"input_ids": ids, "attention_mask": att, "labels": labels}
    for k in items[0]:
        if k not in batch:
            batch[k] = [it.get(k) for it in items]
    return batch
