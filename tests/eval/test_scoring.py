"""Hand-built predictions with hand-computed scores, for every dataset (first 4 test records of the
packaged sample), through the scorer CLI; plus the parsing and metric rules one by one."""

from __future__ import annotations

import json

import pytest

from distill.data.sentibench import FINE_GRAINED, TASKS, load_task
from distill.eval import metrics
from distill.eval.parse import extract_answer, parse_acsa, parse_asqp, parse_atsa, parse_opener
from distill.eval.protocol import answer_text
from distill.eval.sentibench import main


def score(tmp_path, capsys, task, preds, *extra):
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps({"index": i, "prediction": p}) + "\n" for i, p in enumerate(preds)))
    rc = main(["score", "--task", task, "--predictions", str(path), "--data-dir", "sample",
               "--limit", str(len(preds)), *extra])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    return json.loads(out[-1])


def test_records_used_below_are_the_expected_ones():
    assert [r.label for r in load_task("sc/twitter", "test", "sample")[:4]] == ["negative", "neutral", "neutral", "negative"]
    assert load_task("absa/opener", "test", "sample")[1].text == "They were there just to keep us happy ."
    assert load_task("absa/atsa_rest16", "test", "sample")[3].tuples == (("Green Tea creme brulee", "positive"),)


# ------------------------------------------------------------------------------- classification


@pytest.mark.parametrize("task", [t for t in TASKS if t not in FINE_GRAINED])
def test_classification_perfect_and_empty(tmp_path, capsys, task):
    recs = load_task(task, "test", "sample")[:4]
    res = score(tmp_path, capsys, task, [r.label for r in recs])  # file case: lower-cased by the scorer
    assert (res["f1"], res["acc"], res["n"]) == (100.0, 100.0, 4)
    res = score(tmp_path, capsys, task, [""] * 4)
    assert (res["f1"], res["acc"], res["out_of_label_set"]) == (0.0, 0.0, 4)


@pytest.mark.parametrize(
    "task, preds, f1, acc",
    [
        # gold neg neg neg neg: neg F1 6/7, pos F1 0 -> 3/7
        ("sc/sst2", ["negative", "positive", "negative", "negative"], 300 / 7, 75.0),
        # gold neg neu neu neg: neg 2/3, neu 2/3, pos 0 -> 4/9
        ("sc/twitter", ["negative", "neutral", "positive", "positive"], 400 / 9, 50.0),
        # gold non irony non non; all "irony": irony 2/5, non-irony 0 -> 1/5
        ("multifaced/irony18", ["irony"] * 4, 20.0, 25.0),
        # gold sad anger sad joy: sadness 4/5, anger/joy/optimism 0 -> 1/5
        ("multifaced/tweeteval", ["sadness", "sadness", "sadness", "optimism"], 20.0, 50.0),
        # gold FAVOR FAVOR FAVOR AGAINST (case and spaces normalised): favor 4/5, against 2/3
        ("multifaced/pstance", ["FAVOR", " favor ", "against", "against"], 100 * (4 / 5 + 2 / 3) / 2, 75.0),
        # gold not mod not mod; all highly: three labels, all F1 0
        ("multifaced/intimacy", ["highly intimate"] * 4, 0.0, 0.0),
    ],
)
def test_classification_partly_right(tmp_path, capsys, task, preds, f1, acc):
    res = score(tmp_path, capsys, task, preds)
    assert res["f1"] == pytest.approx(f1) and res["acc"] == pytest.approx(acc)


def test_macro_f1_matches_sklearn_semantics():
    sklearn = pytest.importorskip("sklearn.metrics")
    gold = ["a", "b", "c", "a", "b", "a"]
    pred = ["a", "c", "c", "d", "b", "a"]
    assert metrics.macro_f1(gold, pred) == pytest.approx(sklearn.f1_score(gold, pred, average="macro"))


# --------------------------------------------------------------------------------- fine-grained


@pytest.mark.parametrize("task", FINE_GRAINED)
def test_fine_grained_empty(tmp_path, capsys, task):
    res = score(tmp_path, capsys, task, ["[]"] * 4)
    assert res["f1"] == 0.0 and res["parse_failures"] == 0
    assert res["precision"] == (0.0 if task == "absa/opener" else 100.0)  # P = 1 with no predictions (F1Measure)


@pytest.mark.parametrize("task", ["absa/atsa_rest16", "absa/acsa_rest16", "absa/asqp_rest16"])
def test_fine_grained_perfect(tmp_path, capsys, task):
    recs = load_task(task, "test", "sample")[:4]
    res = score(tmp_path, capsys, task, [answer_text(task, r) for r in recs])
    assert (res["precision"], res["recall"], res["f1"]) == (100.0, 100.0, 100.0)
    res = score(tmp_path, capsys, task, [[list(t) for t in r.tuples] for r in recs])  # JSON lists
    assert res["f1"] == 100.0


def test_atsa_partly_right_and_failures(tmp_path, capsys):
    # gold: [] | sushi+ | portions= | Green Tea creme brulee+  (3 tuples)
    res = score(tmp_path, capsys, "absa/atsa_rest16",
                ["[]", "[('sushi', 'positive')]", "[('portions', 'positive')]", "[('tea', 'positive')]"])
    # 3 predictions ('tea' is not in the sentence: invalid, a false positive), 1 right: P = R = 1/3
    assert res["f1"] == pytest.approx(100 / 3) and res["invalid_tuples"] == 1
    # ATSA never repairs: a truncated list is a parse failure. 1 prediction, right: P 1, R 1/3 -> F1 1/2
    res = score(tmp_path, capsys, "absa/atsa_rest16",
                ["[]", "sushi positive", "[('portions', 'neutral')]", "[('Green Tea creme brulee', 'positive'), ('must"])
    assert res["f1"] == pytest.approx(50.0) and res["parse_failures"] == 2 and res["repaired"] == 0


def test_acsa_partly_right_and_repair(tmp_path, capsys):
    # gold: food quality+ | food quality+ | food style_options= | food quality+  (4 tuples)
    res = score(tmp_path, capsys, "absa/acsa_rest16",
                ["[('food quality', 'positive')]", "[('food quality', 'positive'), ('service general', 'negative')]",
                 "[('food style_options', 'mixed')]", "[]"])
    assert res["precision"] == pytest.approx(50.0) and res["recall"] == pytest.approx(50.0)
    assert res["f1"] == pytest.approx(50.0) and res["invalid_tuples"] == 1
    res = score(tmp_path, capsys, "absa/acsa_rest16",
                ['[("food quality", "positive"), ("service gen', "food quality: positive",
                 "[('food style_options', 'neutral')]", "[('food quality', 'positive'"])
    # repaired r0 right, r1 and r3 fail: P 1, R 2/4 -> F1 2/3
    assert res["f1"] == pytest.approx(200 / 3) and res["parse_failures"] == 2 and res["repaired"] == 1


def test_asqp_partly_right_and_failures(tmp_path, capsys):
    recs = load_task("absa/asqp_rest16", "test", "sample")[:4]
    g0, g1 = (answer_text("absa/asqp_rest16", r) for r in recs[:2])
    res = score(tmp_path, capsys, "absa/asqp_rest16",
                [g0, "[('ambience general', 'ambiance', 'peaceful', 'positive'), ('ambience general', 'ambiance', 'positive')]",
                 "[('restaurant general', 'NULL', 'little jem', 'positive')]", "[]"])
    # the 3-tuple is dropped (not a false positive): 3 predictions, 2 right; R 2/4 -> F1 4/7
    assert res["f1"] == pytest.approx(400 / 7) and res["invalid_tuples"] == 1
    res = score(tmp_path, capsys, "absa/asqp_rest16",
                ["[['service general', 'service', 'never served again', 'negative']]",  # list of lists: empty
                 "[('ambience general', 'ambiance', 'peaceful', 'positive'), ('ambience general', 'ambiance', 'relax",
                 answer_text("absa/asqp_rest16", recs[2]), "none"])
    assert res["f1"] == pytest.approx(200 / 3) and res["parse_failures"] == 2 and res["repaired"] == 1


def test_opener_perfect_is_not_100(tmp_path, capsys):
    recs = load_task("absa/opener", "test", "sample")[:4]
    res = score(tmp_path, capsys, "absa/opener", [answer_text("absa/opener", r) for r in recs])
    # r0's ('NULL',)*4 answer is a false positive; r1's holder "us" is first found inside "just" (no
    # token starts there), so r1 misses both ways; r2 (2 tuples) and r3 match exactly.
    # P = 3/5, R = 3/4, F1 = 2/3
    assert res["precision"] == pytest.approx(60.0) and res["recall"] == pytest.approx(75.0)
    assert res["f1"] == pytest.approx(200 / 3)


def test_opener_partial_overlap_and_failures(tmp_path, capsys):
    res = score(tmp_path, capsys, "absa/opener",
                ["[]", "[]", "[('NULL', 'place', 'wonderful', 'negative')]",
                 "[('NULL', 'wonderful experience', 'wonderful', 'positive')]"])
    # r2: wrong polarity (FP; both gold tuples missed). r3: target {5,6} vs gold {6}: precision weight
    # (1 + 1/2 + 1)/3 = 5/6, recall weight 1. P = (5/6)/2, R = 1/4, F1 = 2PR/(P+R) = 5/16
    assert res["precision"] == pytest.approx(100 * 5 / 12) and res["recall"] == pytest.approx(25.0)
    assert res["f1"] == pytest.approx(100 * 5 / 16)
    res = score(tmp_path, capsys, "absa/opener",
                ["[]", "[('us', 'They', 'happy')]", "garbage",
                 "[('NULL', 'experience', 'wonderful', 'positive'), ('NULL', 'exp"])
    # r1: a 3-tuple empties the whole answer; r2 fails; r3 repaired and right: P 1, R 1/4 -> F1 2/5
    assert res["f1"] == pytest.approx(40.0) and res["parse_failures"] == 1 and res["repaired"] == 1


# ------------------------------------------------------------------------------------ unit rules


def test_extract_answer_takes_the_kth_label_and_first_line():
    text = "Instr\n\nSentence: a\nLabel: [('x', 'positive')]\n\nSentence: b\nLabel:\n\n [('y', 'negative')]  \nmore\n"
    assert extract_answer(text, 1) == "[('y', 'negative')]"
    assert extract_answer("Sentence: b\nLabel: [] Sentence: c", 0) == "[]"
    assert extract_answer("Sentence: b\nLabel:", 1) is None


def test_pair_parsing_rules():
    s = "The food was great but the service slow"
    assert parse_atsa("```python\n[('food', 'positive')]\n```", s).tuples == [("food", "positive")]
    assert parse_atsa("['food', 'positive']", s).tuples == [("food", "positive")]  # one bare pair
    assert parse_atsa("[[('food', 'positive')], [('service', 'negative')]]", s).tuples == [("service", "negative")]
    three = "['food-positive', ' service | negative ', 'food,positive']"
    assert parse_atsa(three, s).tuples == [("food", "positive"), ("service", "negative"), ("food", "positive")]
    # two strings are read as one bare pair, not as two items
    assert parse_atsa("['food-positive', 'service-negative']", s).tuples == [False]
    # an item that is not a pair: the whole list is kept as read (its good tuples still count)
    assert parse_atsa("[('food', 'positive'), ('a', 'b', 'c')]", s).tuples == [("food", "positive"), ("a", "b", "c")]
    assert parse_atsa("[('Food', 'positive'), ('food', 'great')]", s).tuples == [False, False]
    assert parse_atsa("42", s).failed
    five = "[" + ", ".join(f"('c{i}', 'positive')" for i in range(5)) + ", ('c5'"
    assert parse_acsa(five).tuples == [(f"c{i}", "positive") for i in range(3)]  # repair keeps 3


def test_quad_parsing_rules():
    p = parse_asqp("[('a', ' b ', 'c', 'positive'), ('a', ' b ', 'c', 'positive'), ('x', 'y')]")
    assert p.tuples == [("a", "b", "c", "positive")] and p.invalid == 1
    p = parse_opener("[('NULL', 'room', 'nice', 'positive'), ('x',)]")
    assert len(p.raw) == 2 and metrics.opener_prediction_tuples("nice room", p.raw) == []


def test_space_tokenizer_and_span_rules():
    assert metrics.space_token_spans("a  b ") == [(0, 1), (2, 2), (3, 4)]
    assert metrics.space_token_spans(" a") == [(1, 2)]
    toks = metrics.space_token_spans("the big room is nice")
    assert metrics.char_spans_to_tokens(["4:12"], toks) == {1, 2}
    assert metrics.char_spans_to_tokens(["5:12"], toks) == frozenset()  # not on a token start
    assert metrics.char_spans_to_tokens(["4:10"], toks) == {1, 2, 3, 4}  # end not on a token end: to the end
    assert metrics.char_spans_to_tokens(["0:0"], toks) == {0, 1, 2, 3, 4}  # the empty string


def test_tuple_prf_membership_counts_duplicates():
    gold = [[("a", "p"), ("a", "p")], [("b", "n")]]
    pred = [[("a", "p")], [("b", "p"), False]]
    p, r, f = metrics.tuple_prf(gold, pred)
    assert (p, r) == (1 / 3, 2 / 3) and f == pytest.approx(4 / 9)
    assert metrics.tuple_prf([[]], [[]]) == (1.0, 1.0, 1.0)
