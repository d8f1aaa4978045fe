"""SentiBench metrics, as the authors compute them (fractions in [0, 1]; tables multiply by 100).

* classification: macro-F1 over the union of gold and predicted labels (scikit-learn's
  ``f1_score(average="macro")``) and accuracy;
* ATSA / ACSA / ASQP: micro P/R/F1 where a predicted (sentence, tuple) pair is correct when it occurs
  among the gold pairs and a gold pair is found when it occurs among the predictions (membership both
  ways, so duplicates count on both sides); P = 1 with no predictions, R = 1 with no gold;
* OpeNER: the weighted sentiment-graph tuple F1 of SemEval-2022 Task 10 over space-separated token
  indices, with the authors' span reconstruction (``opener_prediction_tuples``).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

from distill.data.sentibench import Opinion

# ------------------------------------------------------------------------------------ classification


def macro_f1(gold: Sequence[str], pred: Sequence[str]) -> float:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        return 0.0
    labels = sorted(set(gold) | set(pred))
    tp, gold_n, pred_n = Counter(), Counter(gold), Counter(pred)
    for g, p in zip(gold, pred):
        if g == p:
            tp[g] += 1
    f1s = []
    for label in labels:
        denom = gold_n[label] + pred_n[label]
        f1s.append(2 * tp[label] / denom if denom else 0.0)
    return sum(f1s) / len(f1s)


def accuracy(gold: Sequence[str], pred: Sequence[str]) -> float:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    return sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else 0.0


# ---------------------------------------------------------------------------------- tuple micro-F1


def tuple_prf(gold: Sequence[Sequence], pred: Sequence[Sequence]) -> tuple[float, float, float]:
    """Micro precision, recall, F1 over (example, tuple) pairs by membership (the authors' F1Measure)."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold lists but {len(pred)} prediction lists")
    n_pred = n_gold = hit_pred = hit_gold = 0
    for g, p in zip(gold, pred):
        g, p = list(g), list(p)
        n_pred += len(p)
        n_gold += len(g)
        hit_pred += sum(x in g for x in p)
        hit_gold += sum(x in p for x in g)
    precision = hit_pred / n_pred if n_pred else 1.0
    recall = hit_gold / n_gold if n_gold else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


# ------------------------------------------------------------------------------------ OpeNER spans


def space_token_spans(text: str) -> list[tuple[int, int]]:
    """(begin, end) of the tokens of ``text.split(" ")`` (NLTK's SpaceTokenizer.span_tokenize)."""
    spans, left = [], 0
    while True:
        right = text.find(" ", left)
        if right == -1:
            if left != len(text):
                spans.append((left, len(text)))
            return spans
        if right != 0:  # NLTK's rule: a leading space yields no empty first token
            spans.append((left, right))
        left = right + 1


def char_spans_to_tokens(spans: Iterable[str], token_spans: Sequence[tuple[int, int]]) -> frozenset[int]:
    """Token indices covered by "begin:end" character spans (the SemEval-2022 Task 10 scorer's rule).

    A span contributes tokens from the one that starts exactly at ``begin`` up to the one that ends
    exactly at ``end``; a span that does not start on a token start contributes nothing, one that
    does not end on a token end runs to the end of the sentence.
    """
    out = []
    for span in spans:
        b, e = (int(x) for x in span.split(":"))
        inside = False
        for i, (tb, te) in enumerate(token_spans):
            if tb == b:
                inside = True
            if inside:
                out.append(i)
            if te == e:
                inside = False
    return frozenset(out)


SentTuple = tuple[frozenset, frozenset, frozenset, object]


def opener_gold_tuples(text: str, opinions: Sequence[Opinion]) -> list[SentTuple]:
    tokens = space_token_spans(text)
    return [
        (
            char_spans_to_tokens(o.holder_spans, tokens),
            char_spans_to_tokens(o.target_spans, tokens),
            char_spans_to_tokens(o.expression_spans, tokens),
            o.polarity,
        )
        for o in opinions
    ]


def opener_prediction_tuples(text: str, raw: Sequence[tuple]) -> list[SentTuple]:
    """The authors' ``parse_to_origin`` + span conversion of predicted (holder, target, expression, polarity).

    Each field is located with ``text.find`` (first occurrence); holder as a whole unless ``NULL``,
    target and expression split on the substring ``AND``; a tuple of another length empties the whole
    prediction; the polarity is capitalised to match the gold "Positive"/"Negative".
    """
    if any(len(t) != 4 for t in raw):
        return []
    tokens = space_token_spans(text)
    out = []
    for holder, target, expression, sentiment in raw:
        holder = holder if isinstance(holder, str) else "NULL"
        target = target if isinstance(target, str) else "NULL"
        expression = expression if isinstance(expression, str) else "NULL"
        holder_spans = []
        if holder != "NULL":
            b = text.find(holder)
            if b != -1:
                holder_spans.append(f"{b}:{b + len(holder)}")
        fields = []
        for value in (target, expression):
            spans = []
            for part in value.split("AND"):
                part = part.strip()
                b = text.find(part)
                if b != -1:
                    spans.append(f"{b}:{b + len(part)}")
            fields.append(spans)
        # A non-string polarity crashes the authors' script; here it never matches.
        polarity = sentiment.capitalize() if isinstance(sentiment, str) else None
        out.append(
            (
                char_spans_to_tokens(holder_spans, tokens),
                char_spans_to_tokens(fields[0], tokens),
                char_spans_to_tokens(fields[1], tokens),
                polarity,
            )
        )
    return out


_UNDERSCORE = frozenset(["_"])


def _fill(s: frozenset) -> frozenset:
    return s if s else _UNDERSCORE  # an absent holder/target matches an absent one


def _matches(t1: SentTuple, t2: SentTuple) -> bool:
    return bool(_fill(t1[0]) & _fill(t2[0])) and bool(_fill(t1[1]) & _fill(t2[1])) and bool(t1[2] & t2[2])


def _weighted(t1: SentTuple, others: Sequence[SentTuple]) -> float:
    # Best average overlap, relative to t1's own sizes, over the tuples that intersect on all three
    # spans (polarity is not required here, only for counting the match).
    h1, g1, e1 = _fill(t1[0]), _fill(t1[1]), t1[2]
    best = 0.0
    for t2 in others:
        if _matches(t1, t2):
            h2, g2, e2 = _fill(t2[0]), _fill(t2[1]), t2[2]
            score = (len(h1 & h2) / len(h1) + len(g1 & g2) / len(g1) + len(e1 & e2) / len(e1)) / 3
            best = max(best, score)
    return best


def _weighted_ratio(source: dict, other: dict) -> float:
    weighted, counted = 0.0, 0
    for key, tuples in source.items():
        for t in tuples:
            counted += 1
            if any(_matches(t, o) and t[3] == o[3] for o in other[key]):
                weighted += _weighted(t, other[key])
    return weighted / (counted + 1e-16)


def opener_prf(gold: dict, pred: dict) -> tuple[float, float, float]:
    """Weighted tuple precision, recall, F1; ``gold`` and ``pred`` map sentence id -> tuples."""
    if gold.keys() != pred.keys():
        raise ValueError("gold and predictions cover different sentences")
    precision = _weighted_ratio(pred, gold)
    recall = _weighted_ratio(gold, pred)
    return precision, recall, 2 * precision * recall / (precision + recall + 1e-17)
