"""SentiBench readers: typed records from the data and the packaged sample, and their error messages."""

from __future__ import annotations

import json

import pytest

from distill.data.locate import sentibench_dir
from distill.data.sentibench import (
    FINE_GRAINED,
    TASKS,
    LabelRecord,
    SentiBenchDataError,
    TupleRecord,
    as_dataset,
    load_task,
    load_texts,
    resolve_tasks,
    sample_file,
)


def write_json(path, obj, bom=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + json.dumps(obj), encoding="utf-8")


@pytest.mark.parametrize("task", TASKS)
def test_sample_loads_typed_records(task):
    for split in ("train", "test"):
        recs = load_task(task, split, data_dir="sample")
        assert 50 <= len(recs) <= 200
        assert [r.index for r in recs] == list(range(len(recs)))
        kind = TupleRecord if task in FINE_GRAINED else LabelRecord
        assert all(isinstance(r, kind) and r.text for r in recs)
    if task == "multifaced/pstance":
        assert all(r.target for r in recs)
    if task == "multifaced/intimacy":
        assert all(isinstance(r.label_score, float) for r in recs)
        assert {r.label_word for r in recs} <= {"not intimate", "moderately intimate", "highly intimate"}


def test_sample_is_small_and_not_named_like_the_data():
    files = list(sample_file("sc/sst2", "test").parent.iterdir())
    assert sum(f.stat().st_size for f in files) < 1_000_000
    assert not any(f.name in ("train.json", "test.json", "val.json") for f in files)


@pytest.mark.skipif(sentibench_dir() is None, reason="full SentiBench data not found")
@pytest.mark.parametrize("task", TASKS)
def test_sample_is_a_prefix_of_the_data(task):
    sample = load_task(task, "test", data_dir="sample")
    full = load_task(task, "test")
    assert full[: len(sample)] == sample


def test_label_record_fields(tmp_path):
    root = tmp_path / "sb"
    write_json(root / "multifaced/pstance/test.json", [{"sentence": "s1", "label": "FAVOR", "target": "Donald Trump"}])
    write_json(root / "multifaced/intimacy/test.json", [{"sentence": "s2", "label": "Not Intimate", "label_score": 1}])
    (r,) = load_task("multifaced/pstance", data_dir=root)
    assert (r.text, r.label, r.label_word, r.target) == ("s1", "FAVOR", "favor", "Donald Trump")
    (r,) = load_task("multifaced/intimacy", data_dir=root)
    assert (r.label_word, r.label_score) == ("not intimate", 1.0)


def test_atsa_gold_follows_the_authors_rules(tmp_path):
    # NULL dropped, exact duplicates merged, sorted by the offsets *as strings* ("104" < "19").
    aspects = [
        {"target": "wine", "polarity": "positive", "from": "19", "to": "23", "category": "DRINKS#QUALITY"},
        {"target": "NULL", "polarity": "negative", "from": "0", "to": "0", "category": "SERVICE#GENERAL"},
        {"target": "fish", "polarity": "negative", "from": "104", "to": "108", "category": "FOOD#QUALITY"},
        {"target": "wine", "polarity": "positive", "from": "19", "to": "23", "category": "DRINKS#PRICES"},
        {"target": "wine", "polarity": "positive", "from": "2", "to": "6", "category": "DRINKS#QUALITY"},
    ]
    root = tmp_path / "sb"
    write_json(root / "absa/atsa_rest16/test.json", [{"ID": "x:0", "sentence": "a wine ... wine ... fish", "aspects": aspects}])
    write_json(root / "absa/acsa_rest16/test.json", [{"ID": "x:0", "sentence": "a wine ... wine ... fish", "aspects": aspects}])
    (r,) = load_task("absa/atsa_rest16", data_dir=root)
    assert r.tuples == (("fish", "negative"), ("wine", "positive"), ("wine", "positive"))
    (r,) = load_task("absa/acsa_rest16", data_dir=root)
    assert r.tuples == (("drinks quality", "positive"), ("service general", "negative"),
                        ("food quality", "negative"), ("drinks prices", "positive"))


def test_opener_gold_tuples(tmp_path):
    rec = {
        "sent_id": "s-1",
        "sentence": "We liked the room and the staff .",
        "opinions": [
            {"Source": [["We"], ["0:2"]], "Target": [["room", "staff"], ["13:17", "26:31"]],
             "Polar_expression": [["liked"], ["3:8"]], "Polarity": "Positive", "Intensity": "Standard"},
            {"Source": [[], []], "Target": [[], []], "Polar_expression": [[], []], "Polarity": "Negative"},
        ],
    }
    root = tmp_path / "sb"
    write_json(root / "absa/opener/test.json", [rec, {"sent_id": "s-2", "sentence": "Ok .", "opinions": []}])
    a, b = load_task("absa/opener", data_dir=root)
    assert a.tuples == (("We", "room AND staff", "liked", "positive"), ("NULL", "NULL", "", "negative"))
    assert a.record_id == "s-1" and a.opinions[0].target_spans == ("13:17", "26:31")
    assert b.tuples == (("NULL", "NULL", "NULL", "NULL"),) and b.opinions == ()


def test_missing_file_names_it(tmp_path):
    (tmp_path / "sb" / "sc").mkdir(parents=True)
    with pytest.raises(SentiBenchDataError, match=r"sb/sc/sst2/test\.json: file not found"):
        load_task("sc/sst2", data_dir=tmp_path / "sb")


def test_wrong_top_level_type(tmp_path):
    write_json(tmp_path / "sb/sc/sst2/test.json", {"sentence": "x", "label": "positive"})
    with pytest.raises(SentiBenchDataError, match=r"test\.json: top level must be a JSON array.*got dict"):
        load_task("sc/sst2", data_dir=tmp_path / "sb")


def test_missing_field_names_file_record_and_field(tmp_path):
    rows = [{"sentence": "a", "label": "positive"}, {"sentence": "b", "label": "negative"}, {"sentence": "c"}]
    write_json(tmp_path / "sb/sc/sst2/test.json", rows)
    with pytest.raises(SentiBenchDataError, match=r"sst2/test\.json: record 2: missing field 'label'"):
        load_task("sc/sst2", data_dir=tmp_path / "sb")


def test_nested_field_error(tmp_path):
    rec = {"sent_id": "s", "sentence": "x", "opinions": [{"Source": [[], []], "Target": [[], []], "Polar_expression": [[], []]}]}
    write_json(tmp_path / "sb/absa/opener/test.json", [rec])
    with pytest.raises(SentiBenchDataError, match=r"opener/test\.json: record 0: missing field opinions\[0\]\.'Polarity'"):
        load_task("absa/opener", data_dir=tmp_path / "sb")


def test_wrong_field_type_and_bad_json(tmp_path):
    write_json(tmp_path / "sb/sc/imdb/test.json", [{"sentence": 3, "label": "positive"}])
    with pytest.raises(SentiBenchDataError, match=r"record 0: field 'sentence' must be str, got int"):
        load_task("sc/imdb", data_dir=tmp_path / "sb")
    (tmp_path / "sb/sc/yelp2").mkdir(parents=True)
    (tmp_path / "sb/sc/yelp2/test.json").write_text("[{", encoding="utf-8")
    with pytest.raises(SentiBenchDataError, match=r"yelp2/test\.json: not valid JSON"):
        load_task("sc/yelp2", data_dir=tmp_path / "sb")


def test_unknown_task_and_task_groups():
    with pytest.raises(KeyError, match="unknown SentiBench task 'sc/sst5'"):
        load_task("sc/sst5")
    assert resolve_tasks("basic") == ("sc/sst2", "sc/imdb", "sc/yelp2", "sc/twitter")
    assert resolve_tasks("fine-grained,sc/sst2")[-1] == "sc/sst2"
    assert resolve_tasks("all") == TASKS and len(TASKS) == 12


def test_load_texts_and_as_dataset():
    texts = load_texts(data_dir="sample", limit_per_task=3)
    # 12 tasks, ATSA and ACSA share their sentences: 11 x 3.
    assert len(texts) == 33 and all(isinstance(t, str) for t in texts)
    assert load_texts("test", tasks="sc/sst2", data_dir="sample", limit_per_task=2) == [
        r.text for r in load_task("sc/sst2", "test", "sample")[:2]
    ]
    ds = as_dataset("multifaced/pstance", "test", data_dir="sample")
    assert set(ds.column_names) == {"index", "text", "label", "target"} and len(ds) == 200
    ds = as_dataset("absa/asqp_rest16", "test", data_dir="sample")
    assert ds[1]["tuples"] == [["ambience general", "ambiance", "peaceful", "positive"]]
