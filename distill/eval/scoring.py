"""Scoring one task's predictions against its records (no model needed)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from distill.data.sentibench import FINE_GRAINED, LabelRecord, Record, TupleRecord
from distill.eval import metrics
from distill.eval.parse import PARSERS
from distill.eval.protocol import LABEL_WORDS


def _normalise(p: Any) -> str:
    return p.strip().lower() if isinstance(p, str) else ""


def label_set(task: str) -> tuple[str, ...]:
    """The label strings of a classification task, as the scorer compares them (stripped, lower case)."""
    return tuple(w.strip().lower() for w in LABEL_WORDS[task])


def out_of_label_set(task: str, predictions: Sequence[Any]) -> Counter:
    """``{normalised prediction: count}`` of the predictions outside the task's label set (scored as misses)."""
    allowed = set(label_set(task))
    return Counter(q for q in map(_normalise, predictions) if q not in allowed)


def gold_outside_label_set(task: str, records: Sequence[LabelRecord]) -> list[tuple[int, str]]:
    """``[(record index, gold label)]`` of the records whose gold label is not in the task's label set."""
    if task not in LABEL_WORDS:
        return []
    allowed = set(label_set(task))
    return [(r.index, r.label) for r in records if r.label_word not in allowed]  # as score_classification compares


def score_classification(records: Sequence[LabelRecord], predictions: Sequence[Any], task: str | None = None) -> dict:
    gold = [r.label_word for r in records]
    pred = [_normalise(p) for p in predictions]
    # The task's label set (a valid label absent from these gold records is a miss, not out of the set).
    allowed = set(label_set(task)) if task in LABEL_WORDS else set(gold)
    return {
        "f1": metrics.macro_f1(gold, pred),
        "acc": metrics.accuracy(gold, pred),
        "n": len(gold),
        "out_of_label_set": sum(p not in allowed for p in pred),
    }


def score_fine_grained(task: str, records: Sequence[TupleRecord], predictions: Sequence[Any]) -> dict:
    parser = PARSERS[task]
    parsed = [parser(p if p is not None else "", r.text) for r, p in zip(records, predictions)]
    # A missing answer (no k-th "Label:" in the decoded text) is a parse failure like any other.
    failures = sum(1 for p, q in zip(parsed, predictions) if p.failed or q is None)
    counts = {
        "n": len(records),
        "parse_failures": failures,
        "repaired": sum(p.repaired for p in parsed),
        "invalid_tuples": sum(p.invalid for p in parsed),
        "predicted_tuples": sum(len(p.tuples) for p in parsed),
        "gold_tuples": sum(len(r.tuples) for r in records),
    }
    if task == "absa/opener":
        gold = {r.record_id: metrics.opener_gold_tuples(r.text, r.opinions or ()) for r in records}
        pred = {r.record_id: metrics.opener_prediction_tuples(r.text, p.raw) for r, p in zip(records, parsed)}
        precision, recall, f1 = metrics.opener_prf(gold, pred)
    else:
        precision, recall, f1 = metrics.tuple_prf([r.tuples for r in records], [p.tuples for p in parsed])
    return {"precision": precision, "recall": recall, "f1": f1, **counts}


def score_task(task: str, records: Sequence[Record], predictions: Sequence[Any]) -> dict:
    """Metrics (fractions) of ``predictions[i]`` for ``records[i]``."""
    if len(records) != len(predictions):
        raise ValueError(f"{task}: {len(records)} records but {len(predictions)} predictions")
    if task in FINE_GRAINED:
        return score_fine_grained(task, records, predictions)  # type: ignore[arg-type]
    return score_classification(records, predictions, task)  # type: ignore[arg-type]
