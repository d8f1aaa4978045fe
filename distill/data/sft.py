"""(prompt, response) records -> token ids with the prompt masked out of the loss, and the collator.

Sources: a JSONL file (one object per line), a JSON array, a Parquet file, a folder of such files
(sorted by name; ``*.jsonl``, ``*.jsonl.gz``, ``*.json``, ``*.parquet``), or anything
``datasets.load_dataset`` reads (a hub name or a local script/folder). Every record needs a
non-empty string prompt and response (field names configurable); other fields such as ``id`` are
kept and travel with the batch (``example_id``). A malformed record is an error naming the file,
the line (1-based) and the field.

Tokenisation: ``ids = prompt_ids + response_ids (+ eos)``; ``labels`` = ids with the prompt
positions set to -100 (HF convention: the objective shifts them). Longer than ``max_len``: the
prompt is cut from the left first (its end, next to the response, is kept), then the response
from the right.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from distill.errors import UserError

IGNORE_INDEX = -100


class DataError(UserError, ValueError):
    """A malformed dataset record; the message names the file, the line and the field."""


@dataclass
class Record:
    prompt: str
    response: str
    example_id: str
    where: str  # "file:line" for error messages


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8-sig")


def _check_record(obj, where: str, prompt_field: str, response_field: str) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: record must be a JSON object, got {type(obj).__name__}")
    out = []
    for f in (prompt_field, response_field):
        if f not in obj:
            raise DataError(f"{where}: missing field '{f}' (fields present: {sorted(obj)})")
        v = obj[f]
        if not isinstance(v, str):
            raise DataError(f"{where}: field '{f}' must be a string, got {type(v).__name__}")
        if not v.strip():
            raise DataError(f"{where}: field '{f}' is empty")
        out.append(v)
    return out[0], out[1]


def _read_jsonl(path: Path, pf: str, rf: str) -> list[Record]:
    recs = []
    with _open_text(path) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            p, r = _check_record(obj, where, pf, rf)
            recs.append(Record(p, r, str(obj.get("id", obj.get("example_id", f"{path.name}:{i}"))), where))
    return recs


def _read_json_array(path: Path, pf: str, rf: str) -> list[Record]:
    with _open_text(path) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
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


def _files_in(folder: Path) -> list[Path]:
    pats = ("*.jsonl", "*.jsonl.gz", "*.json", "*.parquet")
    files = sorted({f for p in pats for f in folder.glob(p) if not f.name.startswith(".")})
    # A manifest describes shards; it is not a shard.
    return [f for f in files if f.name not in ("manifest.json", "summary.json")]


def read_records(path: str, fmt: str = "auto", *, prompt_field: str = "prompt", response_field: str = "response",
                 split: str = "train", limit: int = 0) -> list[Record]:
    """All (prompt, response) records of ``path`` (see the module docstring)."""
    p = Path(path)
    if fmt == "datasets" or (fmt == "auto" and not p.exists()):
        if fmt == "auto" and (p.suffix in (".jsonl", ".json", ".parquet", ".gz") or "/" in path and p.parent.exists()):
            raise DataError(f"data.path: {path} does not exist")
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
        files = _files_in(p)
        if not files:
            raise DataError(f"data.path: folder {p} holds no *.jsonl, *.jsonl.gz, *.json or *.parquet files")
        recs = []
        for f in files:
            recs += read_records(str(f), "auto", prompt_field=prompt_field, response_field=response_field)
    else:
        if not p.is_file():
            raise DataError(f"data.path: {p} does not exist")
        kind = fmt
        if kind == "auto":
            name = p.name.lower()
            kind = "parquet" if name.endswith(".parquet") else "json" if name.endswith(".json") else "jsonl"
        if kind == "jsonl":
            recs = _read_jsonl(p, prompt_field, response_field)
        elif kind == "json":
            recs = _read_json_array(p, prompt_field, response_field)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(p)
            for f in (prompt_field, response_field):
                if f not in table.column_names:
                    raise DataError(f"{p}: missing field '{f}' (columns: {table.column_names})")
            recs = _read_rows(table.to_pylist(), str(p), prompt_field, response_field)
    if limit:
        recs = recs[:limit]
    return recs


class SFTDataset:
    """Tokenised (prompt, response) examples: ``ds[i]`` -> dict of input_ids, labels, example_id."""

    def __init__(self, records: list[Record], tokenizer, max_len: int, add_eos: bool = True):
        if not records:
            raise DataError("the dataset is empty")
        self.records = records
        self.items = [self._encode(r, tokenizer, max_len, add_eos) for r in records]

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
    key is passed through as a list (e.g. ``example_id``)."""
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
