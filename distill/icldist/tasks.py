"""The tasks ICLDist builds prompts from: SentiBench TRAIN splits and user datasets named in YAML.

The evaluation's strings (instructions, label words, answer format, the ``Sentence:/Label:`` layout)
come from :mod:`distill.eval.protocol`, never redefined here, so the ``"eval"`` prompt format is the
exact prompt the student is scored on. Test splits are never read: :func:`load_train_tasks` only
asks the SentiBench reader for ``split="train"``.

A user dataset (``prompts.extra`` in YAML) is a classification task::

    prompts:
      extra:
        - name: reviews/amazon          # task name (also for held_out)
          path: data/amazon.jsonl       # JSON/JSONL/CSV/Parquet file, or a `datasets` hub name
          split: train                  # for hub datasets (default train)
          text_field: text              # default "text"
          label_field: label            # default "label"
          labels: [negative, positive]  # label words (default: the sorted distinct labels, lower-cased)
          label_map: {0: negative, 1: positive}   # optional: raw label -> label word
          instructions: ["Classify ... {labels}."] # optional phrasings ({labels} = shuffled label words)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

TRAIN_SPLIT = "train"

# Instruction family of each SentiBench task (distill.icldist.prompts.INSTRUCTIONS keys).
FAMILY = {
    "sc/sst2": "polarity", "sc/imdb": "polarity", "sc/yelp2": "polarity", "sc/twitter": "polarity",
    "multifaced/irony18": "irony", "multifaced/tweeteval": "emotion", "multifaced/pstance": "stance",
    "multifaced/intimacy": "intimacy", "absa/atsa_rest16": "atsa", "absa/acsa_rest16": "acsa",
    "absa/asqp_rest16": "asqp", "absa/opener": "opener",
}


def clip_text(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, a cut one ending in " ..." (prompt demonstrations)."""
    return text if len(text) <= limit else text[: max(limit - 3, 0)].rstrip() + " ..."


@dataclass
class Example:
    text: str
    label: str  # classification: the label word; fine-grained: ""
    answer: str  # answer in the non-evaluation layouts, leading space included
    eval_answer: str  # answer in the evaluation's layout, leading space included
    extra: dict = field(default_factory=dict)  # e.g. {"target": ...} for stance
    record: Any = None  # the SentiBench record (for the evaluation's own prompt builder)


@dataclass
class TaskData:
    name: str
    kind: str  # "classification" | "fine-grained"
    family: str  # instruction family
    label_words: list[str]  # classification: words without the leading space, evaluation order
    examples: list[Example]
    instructions: list[str] = field(default_factory=list)  # user phrasings (override the family's)
    has_eval_format: bool = False
    _eval_builder: Callable | None = None

    def render_eval(self, demos: Sequence[Example], query: Example, max_text: int) -> str:
        """The evaluation's prompt (its instruction and layout) with these demonstrations."""
        def rec(e: Example):
            return dataclasses.replace(e.record, text=clip_text(e.text, max_text))

        return self._eval_builder(self.name, rec(query), [rec(d) for d in demos])


def verbalizer_ids(tokenizer, task: str, label_words: Sequence[str]) -> list[int]:
    """First sub-token of each ``" " + word`` under ``tokenizer``: the evaluation's verbalizer.

    SentiBench tasks go through the evaluator's own :func:`distill.eval.runner.verbalizer_ids`; a user
    task gets the same rule (first sub-token, collisions are an error naming the words).
    """
    from distill.eval.protocol import LABEL_WORDS

    if task in LABEL_WORDS:
        from distill.eval.runner import verbalizer_ids as _eval_ids

        return list(_eval_ids(tokenizer, task))
    ids, seen = [], {}
    for w in label_words:
        toks = tokenizer(" " + w.strip(), add_special_tokens=False)["input_ids"]
        if not toks:
            raise ValueError(f"{task}: label word {w!r} tokenizes to nothing")
        if toks[0] in seen:
            raise ValueError(
                f"{task}: label words {seen[toks[0]]!r} and {w!r} start with the same token {toks[0]} "
                f"({tokenizer.convert_ids_to_tokens(toks[0])!r}); choose label words that differ in their first sub-token"
            )
        seen[toks[0]] = w
        ids.append(int(toks[0]))
    return ids


def sentibench_task(name: str, data_dir: str | None = None) -> TaskData:
    from distill.data.sentibench import FINE_GRAINED, SentiBenchDataError, load_task, task_file
    from distill.eval import protocol

    records = load_task(name, split=TRAIN_SPLIT, data_dir=data_dir or None)
    if name in FINE_GRAINED:
        examples = [
            Example(r.text, "", " " + protocol.answer_text(name, r), " " + protocol.answer_text(name, r), {}, r)
            for r in records
        ]
        words: list[str] = []
        kind = "fine-grained"
    else:
        words = [w.strip() for w in protocol.LABEL_WORDS[name]]
        examples = []
        for r in records:
            extra = {"target": r.target} if getattr(r, "target", None) else {}
            if r.label_word not in words:
                raise SentiBenchDataError(
                    f"{task_file(name, TRAIN_SPLIT, data_dir or None)}: record {r.index}: label {r.label!r} is not in "
                    f"the {name} label set {words}; fix the record (labels are compared lower-cased)")
            examples.append(Example(r.text, r.label_word, " " + r.label_word, " " + protocol.answer_text(name, r), extra, r))
        kind = "classification"
    return TaskData(name, kind, FAMILY.get(name, "generic"), words, examples, has_eval_format=True,
                    _eval_builder=protocol.build_prompt)


EXTRA_KEYS = ("name", "path", "subset", "split", "text_field", "label_field", "labels", "label_map", "instructions")
_TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _looks_like_file(path: str) -> bool:
    """A local file name rather than a ``datasets`` hub name (``org/name``)."""
    return (Path(path).suffix.lower() in _TABLE_BUILDERS or path.startswith(("/", ".", "~"))
            or path.count("/") > 1 or "\\" in path)


def check_extra_spec(spec, index: int) -> None:
    """The checks of one ``prompts.extra`` entry that need no data: keys, types, the file, and the
    label words (``label_map`` values must be among ``labels``). A ConfigError naming the entry."""
    from distill.config import ConfigError

    where = f"prompts.extra[{index}]"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping (name:, path:, text_field:, ...), got {type(spec).__name__}")
    unknown = sorted(str(k) for k in set(spec) - set(EXTRA_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(EXTRA_KEYS)}")
    for key in ("name", "path", "subset", "split", "text_field", "label_field"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise ConfigError(f"{where}.{key}: expected a string, got {spec[key]!r}")
    if spec.get("split", TRAIN_SPLIT) == "test":
        raise ConfigError(f"{where}: split 'test' is not allowed: ICLDist never trains on test splits")
    path = spec.get("path")
    if not path:
        raise ConfigError(f"{where}: 'path' is required (a file or a datasets hub name)")
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_file():
            raise ConfigError(f"{where}.path: {p} is a folder; give the data file (json, jsonl, csv or parquet)")
        if p.suffix.lower() not in _TABLE_BUILDERS:
            raise ConfigError(f"{where}.path: {p}: unsupported file type {p.suffix.lower()!r} (json, jsonl, csv, parquet)")
    elif _looks_like_file(path):
        raise ConfigError(f"{where}.path: {p} does not exist; check the path (a datasets hub name looks like org/name)")
    labels = spec.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(w, (str, int)) for w in labels):
            raise ConfigError(f"{where}.labels: expected a list of label words, got {labels!r}")
        words = [str(w).strip().lower() for w in labels]
        if len(set(words)) < 2 or len(set(words)) != len(words):
            raise ConfigError(f"{where}.labels: need at least 2 distinct label words, got {words}")
    label_map = spec.get("label_map")
    if label_map is not None:
        if not isinstance(label_map, dict):
            raise ConfigError(f"{where}.label_map: expected a mapping raw label -> label word, got {label_map!r}")
        if labels is not None:
            for raw, word in label_map.items():
                if str(word).strip().lower() not in words:
                    raise ConfigError(f"{where}.label_map: {raw!r} -> {word!r}, but {str(word).strip().lower()!r} is "
                                      f"not in labels {words}; add it to labels or fix the map")
    instructions = spec.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, list) or not all(isinstance(t, str) for t in instructions):
            raise ConfigError(f"{where}.instructions: expected a list of strings, got {instructions!r}")
        for i, text in enumerate(instructions):
            try:
                text.format(labels="", target="")
            except (KeyError, IndexError, ValueError) as e:
                raise ConfigError(f"{where}.instructions[{i}]: {text!r} has a placeholder other than {{labels}} and "
                                  f"{{target}} ({type(e).__name__}: {e}); write a literal brace as {{{{ or }}}}") from None


def extra_name(spec: dict, index: int) -> str:
    """The task name of a ``prompts.extra`` entry (also what ``held_out`` names it by)."""
    return spec.get("name") or f"extra/{index}"


def _read_table(spec: dict, where: str) -> list[dict]:
    from distill.config import ConfigError
    from distill.data.sft import DataError

    path = spec["path"]
    p = Path(path).expanduser()
    import datasets

    if p.is_file():
        builder = _TABLE_BUILDERS[p.suffix.lower()]
        try:
            ds = datasets.load_dataset(builder, data_files=str(p), split="train")
        except Exception as e:  # a malformed file: the datasets builders raise several kinds
            first = (str(e).splitlines() or [""])[0]
            raise DataError(f"{where}.path: {p}: cannot be read as {p.suffix.lower()[1:]} ({type(e).__name__}: {first}); "
                            f"fix or re-create the file") from e
    else:
        try:
            ds = datasets.load_dataset(path, spec.get("subset"), split=spec.get("split", TRAIN_SPLIT))
        except Exception as e:
            first = (str(e).splitlines() or [""])[0]
            raise ConfigError(f"{where}.path: {path!r} is not a local file and could not be loaded as a datasets hub "
                              f"name ({type(e).__name__}: {first}); give a file, or download the dataset first") from e
    return list(ds)


def user_task(spec: dict, index: int) -> TaskData:
    from distill.data.sft import DataError

    check_extra_spec(spec, index)
    where = f"prompts.extra[{index}]"
    name = extra_name(spec, index)
    tf, lf = spec.get("text_field", "text"), spec.get("label_field", "label")
    rows = _read_table(spec, where)
    src = f"{where} ({spec['path']})"
    label_map = {str(k): str(v) for k, v in (spec.get("label_map") or {}).items()}
    words = [str(w).strip().lower() for w in spec.get("labels") or ()]
    examples = []
    for i, row in enumerate(rows):
        for key, f_ in (("text_field", tf), ("label_field", lf)):
            if f_ not in row or row[f_] is None:
                raise DataError(f"{src}: record {i} has no field {f_!r}; set {where}.{key} to the field that holds "
                                f"it (the record has {sorted(k for k, v in row.items() if v is not None)})")
        raw = str(row[lf])
        word = label_map.get(raw, raw).strip().lower()
        if words and word not in words:
            via = f" (label_map -> {word!r})" if raw in label_map else ""
            raise DataError(f"{src}: record {i} has label {raw!r}{via}, which is not in labels {words}; add it to "
                            f"labels or {where}.label_map, or fix the record")
        examples.append(Example(str(row[tf]), word, " " + word, " " + word, {}, None))
    words = words or sorted({e.label for e in examples})
    if len(words) < 2:
        raise DataError(f"{src}: need at least 2 label words, the data has {words}; set {where}.labels")
    return TaskData(name, "classification", "generic", words, examples, list(spec.get("instructions") or []))


def load_train_tasks(cfg) -> list[TaskData]:
    """The tasks of a :class:`~distill.icldist.prompts.PromptConfig`, held-out ones removed."""
    from distill.data.sentibench import FINE_GRAINED, resolve_tasks

    cfg.validate_tasks()
    held = set(cfg.held_out)
    names = [t for t in resolve_tasks(cfg.tasks) if t not in held]
    if not cfg.fine_grained:
        names = [t for t in names if t not in FINE_GRAINED]
    tasks = [sentibench_task(t, cfg.data_dir) for t in names]
    for i, spec in enumerate(cfg.extra):
        task = user_task(spec, i)
        if task.name not in held:
            tasks.append(task)
    return tasks
