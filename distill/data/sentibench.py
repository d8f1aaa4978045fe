"""SentiBench readers: the 12 datasets of "Targeted Distillation for Sentiment Analysis" as typed records.

Three categories, two record types:

* basic (``sc/*``) and multifaceted (``multifaced/*``): :class:`LabelRecord` (text, label; P-Stance also
  ``target``, intimacy also ``label_score``);
* fine-grained (``absa/*``): :class:`TupleRecord` (text plus the gold tuples in the field order the
  prompts use; OpeNER also keeps its character spans for the span-level metric).

Where the files are: :func:`distill.data.locate.sentibench_dir` (``--data-dir``, ``$SENTIBENCH_DIR``,
``../shared/sentibench``, the download cache). When none holds them, the small sample shipped in
``distill/data/sample`` is read instead and :func:`data_source` says ``"sample"`` so results can say so.

A missing file, a wrong top-level type or a record without a required field raises
:class:`SentiBenchDataError` naming the file, the record index and the field.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from distill.data.locate import sentibench_dir
from distill.errors import UserError

# Task names are the dataset folders of the authors' repository (including their spelling "multifaced").
BASIC = ("sc/sst2", "sc/imdb", "sc/yelp2", "sc/twitter")
MULTIFACETED = ("multifaced/irony18", "multifaced/tweeteval", "multifaced/pstance", "multifaced/intimacy")
FINE_GRAINED = ("absa/atsa_rest16", "absa/acsa_rest16", "absa/asqp_rest16", "absa/opener")
TASKS = BASIC + MULTIFACETED + FINE_GRAINED
CATEGORIES = {"basic": BASIC, "multifaceted": MULTIFACETED, "fine-grained": FINE_GRAINED}
CATEGORY_OF = {t: c for c, ts in CATEGORIES.items() for t in ts}
SPLITS = ("train", "val", "test")

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"


class SentiBenchDataError(UserError, ValueError):
    """A SentiBench file is missing or malformed; the message names the file, record and field."""


@dataclass(frozen=True)
class LabelRecord:
    """One sentence of a basic or multifaceted (classification) task."""

    index: int  # position in the split file
    text: str
    label: str  # as in the file (mixed case: "FAVOR", "Not Intimate"); the protocol lower-cases it
    target: str | None = None  # P-Stance: the stance target
    label_score: float | None = None  # intimacy: the annotators' mean score

    @property
    def label_word(self) -> str:
        return self.label.lower()


@dataclass(frozen=True)
class Opinion:
    """An OpeNER opinion: texts and character spans ("begin:end") of holder, target and expression."""

    holder: tuple[str, ...]
    holder_spans: tuple[str, ...]
    target: tuple[str, ...]
    target_spans: tuple[str, ...]
    expression: tuple[str, ...]
    expression_spans: tuple[str, ...]
    polarity: str  # as in the file: "Positive" / "Negative"


@dataclass(frozen=True)
class TupleRecord:
    """One sentence of a fine-grained task with its gold tuples, in the prompts' field order.

    ATSA (aspect, polarity); ACSA (category, polarity); ASQP (category, aspect, opinion, sentiment);
    OpeNER (holder, target, expression, polarity). ``tuples`` is exactly the answer a demonstration shows
    and the gold the scorer compares with (see distill/eval/protocol.py for the construction rules).
    """

    index: int
    text: str
    tuples: tuple[tuple[str, ...], ...]
    record_id: str | None = None  # "ID" (rest16) or "sent_id" (OpeNER)
    opinions: tuple[Opinion, ...] | None = None  # OpeNER only


Record = LabelRecord | TupleRecord


# ---------------------------------------------------------------------------------------------- files


def data_root(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data folder, or None for the packaged sample (``data_dir="sample"`` forces the sample)."""
    if data_dir is not None and str(data_dir) == "sample":
        return None
    return sentibench_dir(data_dir)


def data_source(data_dir: str | os.PathLike | None = None) -> str:
    """The folder the data is read from, or ``"sample"`` for the packaged sample."""
    root = data_root(data_dir)
    return "sample" if root is None else str(root)


def is_sample(data_dir: str | os.PathLike | None = None) -> bool:
    return data_root(data_dir) is None


def data_provenance(data_dir: str | os.PathLike | None = None) -> dict:
    """What the SentiBench data of a run is: ``{"source": "full" | "sample", "path": folder}``.

    Written into harvest manifests, ICLDist prompt summaries and SentiBench results, so a number
    computed on the packaged sample (a few hundred records per dataset) is never mistaken for one on
    the full data. ``path`` is the data folder, or the packaged sample folder.
    """
    root = data_root(data_dir)
    if root is None:
        return {"source": "sample", "path": str(SAMPLE_DIR)}
    return {"source": "full", "path": str(Path(root).resolve())}


def sample_note(provenance: dict | None) -> str:
    """The words a run's last line ends with when it used the packaged sample ("" for the full data)."""
    if not provenance or provenance.get("source") != "sample":
        return ""
    return ("data: the packaged SentiBench SAMPLE (<= 200 records per split), not the full data; "
            "set $SENTIBENCH_DIR or --data-dir for real numbers")


def sample_file(task: str, split: str) -> Path:
    """Name of a packaged sample file (never ``<task>/<split>.json``: that pattern is the real data)."""
    if task == "absa/acsa_rest16":
        task = "absa/atsa_rest16"  # one file for both, as in the data
    return SAMPLE_DIR / f"{task.replace('/', '-')}.{split}.jsonl.gz"


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise KeyError(f"unknown SentiBench task {task!r}; known: {', '.join(TASKS)}")
    return task


def task_file(task: str, split: str, data_dir: str | os.PathLike | None = None) -> Path:
    _check_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {SPLITS}")
    root = data_root(data_dir)
    if root is None:
        return sample_file(task, split)
    return Path(root) / task / f"{split}.json"


def read_raw(path: Path) -> list[dict]:
    """A SentiBench split as a list of dicts: a JSON array (utf-8 with BOM) or the sample's JSON lines."""
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.parent == SAMPLE_DIR:
            hint = " (the packaged sample has no such split; point --data-dir or $SENTIBENCH_DIR at the data)"
        raise SentiBenchDataError(f"{path}: file not found{hint}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        text = raw.decode("utf-8").lstrip("\ufeff")
        if path.name.endswith(".jsonl.gz"):
            data = [json.loads(line) for line in text.split("\n") if line.strip()]  # not splitlines: U+2028 is text
        else:
            data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SentiBenchDataError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SentiBenchDataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset "
                                  f"{e.start}); re-save the file as UTF-8") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise SentiBenchDataError(f"{path}: truncated or corrupt gzip file ({e}); re-create or re-download it") from None
    except OSError as e:
        raise SentiBenchDataError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(data, list):
        raise SentiBenchDataError(f"{path}: top level must be a JSON array of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise SentiBenchDataError(f"{path}: record {i} must be a JSON object, got {type(rec).__name__}")
    return data


def _get(rec: dict, key: str, types, path: Path, i: int, where: str = ""):
    if key not in rec:
        raise SentiBenchDataError(f"{path}: record {i}: missing field {where}{key!r}")
    value = rec[key]
    if not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise SentiBenchDataError(
            f"{path}: record {i}: field {where}{key!r} must be {names}, got {type(value).__name__}"
        )
    return value


# -------------------------------------------------------------------------------------------- readers


def read_classification(task: str, rows: Sequence[dict], path: Path) -> list[LabelRecord]:
    """Basic and multifaceted tasks: sentence + label (+ target for P-Stance, label_score for intimacy)."""
    out = []
    for i, r in enumerate(rows):
        text = _get(r, "sentence", str, path, i)
        label = _get(r, "label", str, path, i)
        target = _get(r, "target", str, path, i) if task == "multifaced/pstance" else None
        score = None
        if task == "multifaced/intimacy":
            score = float(_get(r, "label_score", (int, float), path, i))
        out.append(LabelRecord(i, text, label, target, score))
    return out


read_basic = read_classification
read_multifaceted = read_classification


def _atsa_tuples(r: dict, path: Path, i: int) -> tuple[tuple[str, str], ...]:
    # The authors' rule: NULL aspects dropped; exact duplicates (term, polarity, offsets) merged; sorted
    # by the (from, to) offsets, which the files store as *strings*, so "104" sorts before "19" (kept,
    # it decides the demonstrations' text). Equal offsets keep file order (theirs: set order, which
    # depends on PYTHONHASHSEED).
    seen: dict[tuple, None] = {}
    for j, a in enumerate(_get(r, "aspects", list, path, i)):
        where = f"aspects[{j}]."
        if not isinstance(a, dict):
            raise SentiBenchDataError(f"{path}: record {i}: aspects[{j}] must be an object")
        term = a.get("target", None)
        polarity = _get(a, "polarity", str, path, i, where)
        if term in ("NULL", None):
            continue
        if not isinstance(term, str):
            raise SentiBenchDataError(f"{path}: record {i}: field {where}'target' must be str")
        loc = tuple(0 if a.get(k) is None else a.get(k) for k in ("from", "to"))
        seen.setdefault((term, polarity, loc), None)
    ordered = sorted(seen, key=lambda t: t[2])
    return tuple((term, pol) for term, pol, _ in ordered)


def _acsa_tuples(r: dict, path: Path, i: int) -> tuple[tuple[str, str], ...]:
    out: dict[tuple[str, str], None] = {}
    for j, a in enumerate(_get(r, "aspects", list, path, i)):
        where = f"aspects[{j}]."
        category = _get(a, "category", str, path, i, where).lower().replace("#", " ")
        out.setdefault((category, _get(a, "polarity", str, path, i, where)), None)
    return tuple(out)


def _asqp_tuples(r: dict, path: Path, i: int) -> tuple[tuple[str, str, str, str], ...]:
    out: dict[tuple, None] = {}
    for j, q in enumerate(_get(r, "quards", list, path, i)):
        where = f"quards[{j}]."
        quad = tuple(_get(q, k, str, path, i, where) for k in ("category", "aspect", "opinion", "sentiment"))
        out.setdefault(quad, None)
    return tuple(out)


def _opener(r: dict, path: Path, i: int) -> tuple[tuple[tuple[str, ...], ...], tuple[Opinion, ...]]:
    tuples: dict[tuple, None] = {}
    opinions = []
    for j, o in enumerate(_get(r, "opinions", list, path, i)):
        fields = {}
        for key in ("Source", "Target", "Polar_expression"):
            v = _get(o, key, list, path, i, f"opinions[{j}].")
            if len(v) != 2 or not all(isinstance(x, list) for x in v):
                raise SentiBenchDataError(
                    f"{path}: record {i}: field opinions[{j}].{key!r} must be [[texts], [\"begin:end\" spans]]"
                )
            fields[key] = (tuple(map(str, v[0])), tuple(map(str, v[1])))
        polarity = _get(o, "Polarity", str, path, i, f"opinions[{j}].")
        opinions.append(Opinion(*fields["Source"], *fields["Target"], *fields["Polar_expression"], polarity))
        holder = " AND ".join(fields["Source"][0]) or "NULL"
        target = " AND ".join(fields["Target"][0]) or "NULL"
        # An empty expression list stays "" (not NULL), as in the authors' answers.
        tuples.setdefault((holder, target, " AND ".join(fields["Polar_expression"][0]), polarity.lower()), None)
    if not opinions:
        tuples[("NULL", "NULL", "NULL", "NULL")] = None
    return tuple(tuples), tuple(opinions)


def read_fine_grained(task: str, rows: Sequence[dict], path: Path) -> list[TupleRecord]:
    out = []
    for i, r in enumerate(rows):
        text = _get(r, "sentence", str, path, i)
        if task == "absa/opener":
            sent_id = _get(r, "sent_id", str, path, i)
            tuples, opinions = _opener(r, path, i)
            out.append(TupleRecord(i, text, tuples, sent_id, opinions))
            continue
        if task == "absa/atsa_rest16":
            tuples = _atsa_tuples(r, path, i)
        elif task == "absa/acsa_rest16":
            tuples = _acsa_tuples(r, path, i)
        else:
            tuples = _asqp_tuples(r, path, i)
        out.append(TupleRecord(i, text, tuples, r.get("ID")))
    return out


def load_task(task: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> list[Record]:
    """The records of one split of one task, in file order (``record.index`` = position in the file)."""
    path = task_file(task, split, data_dir)
    rows = read_raw(path)
    if task in FINE_GRAINED:
        return read_fine_grained(task, rows, path)
    return read_classification(task, rows, path)


def resolve_tasks(tasks: str | Iterable[str] | None = "all") -> tuple[str, ...]:
    """``"all"``, a category name (basic / multifaceted / fine-grained), task names, or a comma list."""
    if tasks is None:
        return TASKS
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    out: list[str] = []
    for t in tasks:
        t = t.strip()
        if t == "all":
            out += TASKS
        elif t in CATEGORIES:
            out += CATEGORIES[t]
        else:
            out.append(_check_task(t))
    return tuple(dict.fromkeys(out))


def load_texts(
    split: str = "train",
    tasks: str | Iterable[str] | None = None,
    data_dir: str | os.PathLike | None = None,
    limit_per_task: int | None = None,
) -> list[str]:
    """Sentences of ``split`` of every task (ATSA and ACSA share their text: read once)."""
    texts: list[str] = []
    seen_files: set[Path] = set()
    for task in resolve_tasks(tasks):
        path = task_file(task, split, data_dir)
        if not path.is_file() and split == "val":
            continue  # rest16 ATSA/ACSA have no val split
        if task == "absa/acsa_rest16" and "absa/atsa_rest16" in resolve_tasks(tasks):
            continue  # same sentences as atsa_rest16
        if path in seen_files:
            continue
        seen_files.add(path)
        records = load_task(task, split, data_dir)
        if limit_per_task is not None:
            records = records[:limit_per_task]
        texts += [r.text for r in records]
    return texts


def as_dataset(task: str, split: str = "test", data_dir: str | os.PathLike | None = None):
    """The split as a ``datasets.Dataset``: columns index, text, and label/target/label_score or tuples."""
    import datasets

    records = load_task(task, split, data_dir)
    if task in FINE_GRAINED:
        return datasets.Dataset.from_dict(
            {
                "index": [r.index for r in records],
                "text": [r.text for r in records],
                "tuples": [[list(t) for t in r.tuples] for r in records],
                "record_id": [r.record_id for r in records],
            }
        )
    columns: dict[str, list[Any]] = {
        "index": [r.index for r in records],
        "text": [r.text for r in records],
        "label": [r.label for r in records],
    }
    if task == "multifaced/pstance":
        columns["target"] = [r.target for r in records]
    if task == "multifaced/intimacy":
        columns["label_score"] = [r.label_score for r in records]
    return datasets.Dataset.from_dict(columns)


__all__ = [
    "TASKS", "BASIC", "MULTIFACETED", "FINE_GRAINED", "CATEGORIES", "CATEGORY_OF", "SPLITS",
    "LabelRecord", "TupleRecord", "Opinion", "Record", "SentiBenchDataError",
    "load_task", "load_texts", "as_dataset", "resolve_tasks", "data_root", "data_source", "data_provenance", "sample_note", "is_sample", "task_file",
    "read_raw", "read_basic", "read_multifaceted", "read_fine_grained", "sample_file",
]
