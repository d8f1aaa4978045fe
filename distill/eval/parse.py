"""Reading a model's fine-grained answer the way the authors' ``fsa.py`` and ``parse_utils/`` do.

Our own implementation of their rules (HITSZ-HLT/Sentiment-Distillation @ 2810fc2); each quirk that
changes a score is kept on purpose and listed in docs/sentibench.md. In short:

1. ``extract_answer``: the prompt and the generation are decoded together and the regex
   ``Label:\\s*(.*?)(?=\\s*(?=Sentence:|\\n|$))`` is applied; the k-th match (k = shots) is the answer,
   i.e. the first non-blank line after the test's ``Label:``, cut at ``Sentence:``.
2. Clean-up: drop code fences, keep the last line, (ATSA/ACSA) drop ``Label:``, ``ast.literal_eval``.
3. Repair of a truncated list (ACSA, ASQP, OpeNER, not ATSA): cut after the last ``)`` and close with
   ``]``; ACSA and ASQP then keep at most 3 distinct tuples.
4. Per-task tuple rules (below). ATSA and ACSA keep an invalid tuple as ``False`` (a false positive);
   ASQP drops it; OpeNER keeps every 4-tuple and lets the span matcher decide.

Inputs may be a string (the raw answer) or an already parsed list (the scorer's JSON predictions):
a list skips steps 1 to 3, its inner lists count as tuples.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

LABEL_RE = re.compile(r"Label:\s*(.*?)(?=\s*(?=Sentence:|\n|$))", re.DOTALL)
_SPLIT_RE = re.compile(r",|-|\|")
INVALID = False  # marker of an invalid ATSA/ACSA tuple: never equal to a gold tuple, so a false positive


@dataclass
class Parsed:
    tuples: list  # what the scorer compares (may hold INVALID markers for ATSA/ACSA)
    failed: bool = False  # the answer could not be read as a list: an empty prediction
    repaired: bool = False  # read only after closing a truncated list
    invalid: int = 0  # tuples rejected by the task's rules
    raw: list = field(default_factory=list)  # OpeNER: the tuples before validation (what it scores)


def extract_answer(decoded: str, shots: int) -> str | None:
    """The test answer inside the decoded prompt+generation: the ``shots``-th ``Label:`` match."""
    matches = LABEL_RE.findall(decoded)
    return matches[shots] if len(matches) > shots else None


def _clean(s: str, drop_label: bool) -> str:
    s = s.replace("```python", "").replace("```", "").strip()
    s = s.replace("\n]", "]").replace("[\n", "[").split("\n")[-1]
    if drop_label:
        s = s.replace("Label:", "")
    return s.strip()


def _close_truncated(s: str) -> str:
    k = s.rfind(")")
    return s[: k + 1] + "]" if k != -1 else s + "]"


def _as_tuples(obj: Any) -> Any:
    """JSON predictions: inner arrays stand for tuples."""
    if isinstance(obj, list):
        return [tuple(x) if isinstance(x, list) else x for x in obj]
    return obj


def _distinct_tuples(obj: Any) -> list[tuple]:
    # The authors use set(); we keep first-appearance order (theirs is hash order). Only the repaired
    # ACSA/ASQP answers, cut to 3 tuples, can see the difference.
    return [tuple(item) for item in dict.fromkeys(obj)]


# ----------------------------------------------------------------------------------- ATSA and ACSA


def _pair(item: Any) -> tuple[str, str]:
    if type(item) in (tuple, list):
        first, second = item
    else:
        first, second = _SPLIT_RE.split(item)
    return first.strip(), second.strip()


def _parse_pairs(answer: Any, task: str, sentence: str) -> Parsed:
    repaired = False
    if isinstance(answer, str):
        s = _clean(answer, drop_label=True)
        try:
            obj = ast.literal_eval(s)
        except Exception:
            if task == "atsa":
                return Parsed([], failed=True)
            try:  # ACSA: repair once; the repaired tuples are not validated
                fixed = _distinct_tuples(ast.literal_eval(_close_truncated(s)))[:3]
            except Exception:
                return Parsed([], failed=True)
            return Parsed(fixed, repaired=True)
    else:
        obj = _as_tuples(answer)
    if type(obj) not in (list, tuple):
        return Parsed([], failed=True)
    if len(obj) == 2 and type(obj[0]) is str:  # one bare pair
        obj = [obj]
    if task == "atsa":
        try:  # a list of lists of tuples: the last inner list counts
            if len(obj) > 0 and len(obj[0]) > 0 and type(obj[0][0]) in (list, tuple):
                obj = obj[-1]
        except Exception:
            return Parsed([], failed=True)
    polarities = ("positive", "neutral", "negative", "conflict") if task == "atsa" else ("positive", "neutral", "negative")
    out, invalid = [], 0
    try:
        for item in obj:
            if not item:
                continue
            first, polarity = _pair(item)
            if (task == "atsa" and first not in sentence) or polarity not in polarities:
                out.append(INVALID)
                invalid += 1
            else:
                out.append((first, polarity))
    except Exception:
        # An item that is not a pair (wrong length, not a string) makes the authors keep the whole
        # list as it was read, unvalidated and unstripped: its well-formed tuples can still match.
        return Parsed(list(obj), repaired=repaired)
    return Parsed(out, invalid=invalid)


def parse_atsa(answer: Any, sentence: str) -> Parsed:
    """(aspect, polarity): aspect must occur in the sentence, polarity in positive/neutral/negative/conflict."""
    return _parse_pairs(answer, "atsa", sentence)


def parse_acsa(answer: Any, sentence: str = "") -> Parsed:
    """(category, polarity): polarity in positive/neutral/negative; the category is not checked."""
    return _parse_pairs(answer, "acsa", sentence)


# ---------------------------------------------------------------------------------- ASQP and OpeNER


def _read_tuple_list(answer: Any, cap_repaired: int | None) -> tuple[list[tuple], bool, bool]:
    """(distinct tuples, failed, repaired) following the ASQP/OpeNER reader."""
    if not isinstance(answer, str):
        try:
            return _distinct_tuples(_as_tuples(answer)), False, False
        except Exception:
            return [], True, False
    s = _clean(answer, drop_label=False)
    try:
        obj = ast.literal_eval(s)
    except Exception:
        try:
            items = _distinct_tuples(ast.literal_eval(_close_truncated(s)))
        except Exception:
            return [], True, False
        return (items[:cap_repaired] if cap_repaired else items), False, True
    try:
        # A literal that is read but is not a list of hashable items (e.g. a list of lists) is an
        # empty prediction: the authors' repair then runs on the parsed object and fails.
        return _distinct_tuples(obj), False, False
    except Exception:
        return [], True, False


def parse_asqp(answer: Any, sentence: str = "") -> Parsed:
    """(category, aspect, opinion, sentiment), each stripped; a tuple of another length is dropped."""
    items, failed, repaired = _read_tuple_list(answer, cap_repaired=3)
    out, invalid = [], 0
    for item in items:
        if len(item) != 4 or not all(isinstance(x, str) for x in item):
            # (a non-string field crashes the authors' script; we drop the tuple)
            invalid += 1
            continue
        out.append(tuple(x.strip() for x in item))
    return Parsed(out, failed=failed, repaired=repaired, invalid=invalid)


def parse_opener(answer: Any, sentence: str = "") -> Parsed:
    """(holder, target, expression, polarity) tuples as read; the span scorer maps them to the sentence."""
    items, failed, repaired = _read_tuple_list(answer, cap_repaired=None)
    invalid = sum(
        1 for it in items
        if len(it) != 4 or not isinstance(it[3], str) or it[3].strip() not in ("positive", "neutral", "negative")
    )
    return Parsed(list(items), failed=failed, repaired=repaired, invalid=invalid, raw=list(items))


PARSERS = {
    "absa/atsa_rest16": parse_atsa,
    "absa/acsa_rest16": parse_acsa,
    "absa/asqp_rest16": parse_asqp,
    "absa/opener": parse_opener,
}
