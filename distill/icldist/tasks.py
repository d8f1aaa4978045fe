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
        from distill.icldist.prompts import _clip

        def rec(e: Example):
            return dataclasses.replace(e.record, text=_clip(e.text, max_text))

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
    from distill.data.sentibench import FINE_GRAINED, load_task
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
                raise ValueError(f"SentiBench {name} train record {r.index}: label {r.label!r} not in {words}")
            examples.append(Example(r.text, r.label_word, " " + r.label_word, " " + protocol.answer_text(name, r), extra, r))
        kind = "classification"
    return TaskData(name, kind, FAMILY.get(name, "generic"), words, examples, has_eval_format=True,
                    _eval_builder=protocol.build_prompt)


def _read_table(spec: dict, where: str) -> list[dict]:
    path = spec.get("path")
    if not path:
        raise ValueError(f"{where}: 'path' is required (a file or a datasets hub name)")
    p = Path(path)
    if p.exists():
        import datasets

        suffix = p.suffix.lower()
        builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(suffix)
        if builder is None:
            raise ValueError(f"{where}: {p}: unsupported file type {suffix!r} (json, jsonl, csv, parquet)")
        ds = datasets.load_dataset(builder, data_files=str(p), split="train")
    else:
        import datasets

        ds = datasets.load_dataset(path, spec.get("subset"), split=spec.get("split", TRAIN_SPLIT))
    return list(ds)


def user_task(spec: dict, index: int) -> TaskData:
    where = f"prompts.extra[{index}]"
    known = {"name", "path", "subset", "split", "text_field", "label_field", "labels", "label_map", "instructions"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    if spec.get("split", TRAIN_SPLIT) == "test":
        raise ValueError(f"{where}: split 'test' is not allowed: ICLDist never trains on test splits")
    name = spec.get("name") or f"extra/{index}"
    tf, lf = spec.get("text_field", "text"), spec.get("label_field", "label")
    rows = _read_table(spec, where)
    label_map = {str(k): str(v) for k, v in (spec.get("label_map") or {}).items()}
    examples = []
    for i, row in enumerate(rows):
        for f_ in (tf, lf):
            if f_ not in row or row[f_] is None:
                raise ValueError(f"{where} ({spec['path']}): record {i} has no field {f_!r}")
        raw = str(row[lf])
        word = label_map.get(raw, raw).strip().lower()
        examples.append(Example(str(row[tf]), word, " " + word, " " + word, {}, None))
    words = [str(w).strip().lower() for w in spec.get("labels") or sorted({e.label for e in examples})]
    bad = sorted({e.label for e in examples} - set(words))
    if bad:
        raise ValueError(f"{where} ({spec['path']}): labels {bad} are not in labels={words}")
    if len(words) < 2:
        raise ValueError(f"{where} ({spec['path']}): need at least 2 label words, got {words}")
    return TaskData(name, "classification", "generic", words, examples, list(spec.get("instructions") or []))


def load_train_tasks(cfg) -> list[TaskData]:
    """The tasks of a :class:`~distill.icldist.prompts.PromptConfig`, held-out ones removed."""
    from distill.data.sentibench import FINE_GRAINED, resolve_tasks

    held = set(cfg.held_out)
    names = [t for t in resolve_tasks(cfg.tasks) if t not in held]
    if not cfg.fine_grained:
        names = [t for t in names if t not in FINE_GRAINED]
    tasks = [sentibench_task(t, cfg.data_dir) for t in names]
    for i, spec in enumerate(cfg.extra):
        task = user_task(dict(spec), i)
        if task.name not in held:
            tasks.append(task)
    return tasks
