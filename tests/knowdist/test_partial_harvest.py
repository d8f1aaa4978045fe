"""A corpus folder of a killed harvest given as data.path: refused with the counts and what to do, or
read (its finished shards only) with a one-line warning under data.allow_partial=true (issue 11)."""

from __future__ import annotations

import pytest

from distill.data.sft import DataError, read_records
from distill.errors import UserError
from distill.data import corpus as C


def _corpus(folder, done: int, expected: int, fmt: str = "jsonl", per_shard: int = 2):
    """A corpus folder as distill.knowdist.harvest leaves it after ``done`` of ``expected`` shards:
    the manifest lists the finished shards; a crash after a rename left one unlisted shard file."""
    folder.mkdir()
    man = {"fingerprint": "f" * 16, "teacher": "t", "n_jobs": expected * per_shard, "n_shards": expected,
           "shard_size": per_shard, "format": fmt, "config": {}, "completed": {}}
    for i in range(done + (1 if done < expected else 0)):
        recs = [{"id": f"x{i}-{j}|p", "text": f"text {i} {j}", "perspective": "p", "prompt": f"Text: text {i} {j}\nAnalysis:",
                 "response": f" analysis {i} {j}", "teacher": "t", "sampling": {"seed": 0}} for j in range(per_shard)]
        C.write_shard(folder, i, recs, fmt)
        if i < done:
            man["completed"][str(i)] = {"kept": per_shard, "jobs": per_shard, "file": C.shard_name(i, fmt)}
    C.write_manifest(folder, man)
    return folder


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_partial_corpus_refused_or_read_with_warning(tmp_path, capsys, fmt):
    folder = _corpus(tmp_path / "corpus", 3, 15, fmt)
    with pytest.raises(DataError) as e:
        read_records(str(folder))
    msg = str(e.value)
    assert "\n" not in msg
    for n in (str(folder), "3/15 shards", "launchers/harvest.py --config", f"--output.dir={folder}", "resumes",
              "--data.allow_partial=true"):
        assert n in msg, (n, msg)
    recs = read_records(str(folder), allow_partial=True)
    # Only the 3 listed shards: the unlisted shard-00003 left by the crash is not part of the corpus.
    assert [r.response for r in recs] == [f" analysis {i} {j}" for i in range(3) for j in range(2)]
    err = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(err) == 1 and "3/15 shards" in err[0] and str(folder) in err[0], err


def test_complete_corpus_reads_silently(tmp_path, capsys):
    folder = _corpus(tmp_path / "corpus", 4, 4)
    assert len(read_records(str(folder))) == 8
    assert "warning" not in capsys.readouterr().err


def test_manifest_lists_missing_or_damaged_shard(tmp_path):
    folder = _corpus(tmp_path / "corpus", 2, 2)
    (folder / C.shard_name(1, "jsonl")).unlink()
    with pytest.raises(UserError, match=r"manifest.json: lists shard-00001.jsonl, which is missing; remove its entry"):
        read_records(str(folder))
    folder = _corpus(tmp_path / "corpus2", 2, 2)
    (folder / C.MANIFEST).write_text("{not json")
    with pytest.raises(C.CorpusError, match=r"corpus2/manifest.json: not valid JSON"):
        read_records(str(folder))
    # The harvester's own reader of a damaged shard names the file and line.
    folder = _corpus(tmp_path / "corpus3", 2, 2)
    (folder / C.shard_name(1, "jsonl")).write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(C.CorpusError, match=r"shard-00001.jsonl:1: not valid UTF-8"):
        C.load_corpus(folder)


def _args(model, data, tmp_path, *extra):
    return (f"--model.student={model}", f"--model.teacher={model}", f"--data.path={data}", "--deepspeed.engine=torch",
            "--log.progress_bar=false", f"--run.out_dir={tmp_path / 'run'}", *extra)


def test_launcher_refuses_partial_harvest(launcher, kd_teacher_dir, tmp_path):
    folder = _corpus(tmp_path / "corpus", 3, 15)
    proc = launcher.run("knowdist.py", *_args(kd_teacher_dir, folder, tmp_path))
    launcher.assert_user_error(proc, str(folder), "3/15 shards", "launchers/harvest.py", "--data.allow_partial=true")


def test_launcher_allow_partial_trains_with_warning(launcher, kd_teacher_dir, tmp_path):
    folder = _corpus(tmp_path / "corpus", 3, 15)
    proc = launcher.run("knowdist.py", *_args(kd_teacher_dir, folder, tmp_path, "--data.allow_partial=true",
                                              "--train.steps=1", "--train.micro_batch=2", "--data.max_len=32",
                                              "--checkpoint.every=0", "--train.warmup_steps=0"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    warn = [x for x in proc.stderr.splitlines() if "warning" in x and "3/15 shards" in x]
    assert len(warn) == 1, proc.stderr[-3000:]
