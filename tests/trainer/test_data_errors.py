"""Bad data files: every one is a DataError on one line naming the file (and line/field), and
launchers/knowdist.py answers it with exit status 2 and that line, no traceback (issue 11)."""

from __future__ import annotations

import gzip
import json

import pytest

from distill.data.sft import DataError, read_records
from distill.errors import UserError

GOOD = '{"prompt": "ok", "response": "fine"}\n'


def _gz(path, data: bytes):
    path.write_bytes(gzip.compress(data))
    return path


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# name -> (build(tmp) -> data.path, needles in the message besides the file name)
def _cases():
    return {
        "missing_file": (lambda t: t / "nope.jsonl", ["does not exist"]),
        "missing_in_existing_folder": (lambda t: t / "sub" / "nope", ["does not exist"]),
        "empty_jsonl": (lambda t: _write(t / "e.jsonl", b""), ["holds no records"]),
        "blank_lines_jsonl": (lambda t: _write(t / "e.jsonl", b"\n  \n"), ["holds no records"]),
        "empty_json": (lambda t: _write(t / "e.json", b""), ["holds no records"]),
        "empty_json_array": (lambda t: _write(t / "e.json", b"[]"), ["holds no records"]),
        "empty_gz": (lambda t: _gz(t / "e.jsonl.gz", b""), ["holds no records"]),
        "malformed_line": (lambda t: _write(t / "m.jsonl", (GOOD + '{"prompt": "a",\n').encode()),
                           ["m.jsonl:2:", "invalid JSON"]),
        "malformed_json": (lambda t: _write(t / "m.json", b'[{"prompt": "a",\n "response": }]'),
                           ["m.json:2:", "invalid JSON"]),
        "missing_field": (lambda t: _write(t / "f.jsonl", (GOOD * 2 + '{"prompt": "a"}\n').encode()),
                          ["f.jsonl:3:", "missing field 'response'", "data.response_field"]),
        "non_string": (lambda t: _write(t / "f.jsonl", (GOOD + '{"prompt": ["a"], "response": "b"}\n').encode()),
                       ["f.jsonl:2:", "field 'prompt' must be a string, got list"]),
        "null_value_json": (lambda t: _write(t / "f.json", json.dumps([{"prompt": "a", "response": None}]).encode()),
                            ["f.json: record 0", "field 'response' must be a string"]),
        "bad_utf8": (lambda t: _write(t / "u.jsonl", GOOD.encode() + b'{"prompt": "caf\xe9", "response": "b"}\n'),
                     ["u.jsonl:2:", "not valid UTF-8", "byte offset 52"]),
        "bad_utf8_json": (lambda t: _write(t / "u.json", b'[\n{"prompt": "\xff", "response": "b"}]'),
                          ["u.json:2:", "not valid UTF-8", "byte offset 14"]),
        "bad_utf8_gz": (lambda t: _gz(t / "u.jsonl.gz", b'{"prompt": "\xc3(", "response": "b"}\n'),
                        ["u.jsonl.gz:1:", "not valid UTF-8"]),
        "truncated_gz": (lambda t: _write(t / "t.jsonl.gz", gzip.compress((GOOD * 400).encode())[:-40]),
                         ["t.jsonl.gz", "truncated or corrupt gzip"]),
        "not_gzip": (lambda t: _write(t / "n.jsonl.gz", GOOD.encode()), ["n.jsonl.gz", "corrupt gzip"]),
        "corrupt_parquet": (lambda t: _write(t / "c.parquet", b"PAR1 this is not parquet"),
                            ["c.parquet", "not a readable Parquet file"]),
        "truncated_parquet": (lambda t: _write(t / "c.parquet", _parquet(t / "c.parquet", [{"prompt": "a", "response": "b"}] * 50)
                                               .read_bytes()[:-30]), ["c.parquet", "not a readable Parquet file"]),
        "parquet_missing_column": (lambda t: _parquet(t / "p.parquet", [{"prompt": "a"}]),
                                   ["p.parquet", "missing field 'response'"]),
        "parquet_non_string": (lambda t: _parquet(t / "p.parquet", [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": None}]),
                               ["p.parquet: row 1", "field 'response' must be a string"]),
        "folder_no_data": (lambda t: _folder(t / "d", {"notes.txt": b"hi", "manifest.json": b"{}"}),
                           ["holds no *.jsonl"]),
        "folder_only_empty_files": (lambda t: _folder(t / "d", {"a.jsonl": b"", "b.json": b"[]"}),
                                    ["2 data file(s)", "hold no records"]),
        "folder_bad_member": (lambda t: _folder(t / "d", {"a.jsonl": GOOD.encode(), "b.jsonl": b"{oops\n"}),
                              ["b.jsonl:1:", "invalid JSON"]),
    }


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _folder(path, files: dict):
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_data_file_is_one_line_data_error(tmp_path, name):
    build, needles = CASES[name]
    path = build(tmp_path)
    with pytest.raises(DataError) as e:
        read_records(str(path))
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg, msg
    assert str(path) in msg or path.name in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


def test_gz_and_json_gz_read(tmp_path):
    recs = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(3)]
    a = _gz(tmp_path / "a.jsonl.gz", "".join(json.dumps(r) + "\n" for r in recs).encode())
    b = _gz(tmp_path / "b.json.gz", json.dumps(recs).encode())
    bom = _write(tmp_path / "c.jsonl", b"\xef\xbb\xbf" + GOOD.encode())
    assert [r.prompt for r in read_records(str(a))] == ["p0", "p1", "p2"]
    assert [r.prompt for r in read_records(str(b))] == ["p0", "p1", "p2"]
    assert [r.prompt for r in read_records(str(bom))] == ["ok"]


def _trainer_args(tiny_assets, data, tmp_path, *extra):
    return (f"--model.student={tiny_assets['student']}", f"--model.teacher={tiny_assets['teacher']}",
            f"--data.path={data}", "--deepspeed.engine=torch", "--log.progress_bar=false",
            f"--run.out_dir={tmp_path / 'run'}", *extra)


# Through the launcher: one subprocess per class of failure (each costs an interpreter + torch import).
@pytest.mark.parametrize("name", ["missing_file", "empty_jsonl", "malformed_line", "missing_field", "non_string",
                                  "bad_utf8", "truncated_gz", "corrupt_parquet", "folder_no_data"])
def test_launcher_bad_data_exits_2_one_line(launcher, tiny_assets, tmp_path, name):
    build, needles = CASES[name]
    path = build(tmp_path)
    proc = launcher.run("knowdist.py", *_trainer_args(tiny_assets, path, tmp_path))
    line = launcher.assert_user_error(proc, *needles)
    assert str(path) in line or path.name in line, line


def test_sentibench_split_unreadable_is_one_line(tmp_path):
    from distill.data.sentibench import SentiBenchDataError, read_raw

    bad = _write(tmp_path / "train.json", b'[\n{"sentence": "\xff"}]')
    with pytest.raises(SentiBenchDataError, match=r"train.json:2: not valid UTF-8 \(byte 0xff at byte offset 16\)"):
        read_raw(bad)
    cut = _write(tmp_path / "train.jsonl.gz", gzip.compress(b'{"sentence": "a"}\n' * 300)[:-20])
    with pytest.raises(SentiBenchDataError, match=r"train.jsonl.gz: truncated or corrupt gzip"):
        read_raw(cut)
