"""(prompt, response) data: errors name file, line and field; masking, truncation, collation."""

from __future__ import annotations

import json

import pytest

from distill.data.sft import DataError, SFTDataset, collate, read_records


@pytest.mark.parametrize("line,needle", [
    ('{"prompt": "a"}', ":2: missing field 'response'"),
    ('{"prompt": "a", "response": 3}', ":2: field 'response' must be a string"),
    ('{"prompt": "", "response": "b"}', ":2: field 'prompt' is empty"),
    ('{"prompt": "a", "response": "b"', ":2: invalid JSON"),
    ('["a", "b"]', ":2: record must be a JSON object"),
])
def test_malformed_jsonl_names_file_line_field(tmp_path, line, needle):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "ok", "response": "fine"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        read_records(str(f))
    assert str(f) in str(e.value) and needle in str(e.value)


def test_json_array_and_parquet_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"prompt": f"p{i}", "response": f"r{i}", "id": f"x{i}"} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "b.parquet")
    (tmp_path / "manifest.json").write_text("{}")  # not a shard
    got = read_records(str(tmp_path))
    assert [r.prompt for r in got] == ["p0", "p1", "p2"] * 2
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": "p"}]), bad / "c.parquet")
    with pytest.raises(DataError, match="missing field 'response'"):
        read_records(str(bad / "c.parquet"))
    with pytest.raises(DataError, match="does not exist"):
        read_records(str(tmp_path / "nope.jsonl"))


def test_masking_truncation_collate(tiny_assets):
    from distill.data.sft import Record

    tok = tiny_assets["tokenizer"]
    r = Record("Text: the food was great and the room was dull\nAnalysis:", " The overall sentiment is positive.", "e1", "x:1")
    ds = SFTDataset([r], tok, max_len=512)
    it = ds[0]
    p = tok(r.prompt, add_special_tokens=False)["input_ids"]
    assert it["labels"][: len(p)] == [-100] * len(p)
    assert it["labels"][len(p):] == it["input_ids"][len(p):]
    assert it["input_ids"][-1] == tok.eos_token_id
    short = SFTDataset([r], tok, max_len=12)[0]
    assert len(short["input_ids"]) == 12
    assert short["input_ids"][-4:] == it["input_ids"][-4:]  # the prompt was cut from the left
    b = collate([it, short], tok.pad_token_id)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert b["attention_mask"][1].sum() == 12 and (b["labels"][1, 12:] == -100).all()
    assert b["example_id"] == ["e1", "e1"]  # pass-through key
