"""KnowDist harvesting with the in-process tiny teacher: records, filters, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.config import ConfigError, load_config
from distill.knowdist.harvest import HarvestConfig, harvest, load_corpus, load_perspectives

REPO = Path(__file__).resolve().parents[2]
STOP = ",".join(str(i) for i in range(4, 1024))


def _args(teacher, texts, out, *extra):
    return ["--input.source=jsonl", f"--input.path={texts}", f"--teacher.model={teacher}",
            "--teacher.backend=local", "--perspectives.names=overall polarity,irony",
            # A random tiny teacher almost never writes eos: let a quarter of its vocabulary end an answer.
            f"--sampling.stop_token_ids={STOP}", "--sampling.max_new_tokens=6", "--sampling.temperature=1.0",
            "--sampling.top_p=0.95", f"--output.dir={out}", "--output.shard_size=4", "--output.progress=false", *extra]


def _cfg(*args):
    return load_config(HarvestConfig, list(args))[0]


def test_perspectives_shipped_and_user_yaml(tmp_path):
    from distill.knowdist.harvest import PerspectiveSection

    template, ps = load_perspectives(PerspectiveSection())
    names = [p["name"] for p in ps]
    for n in ("overall polarity", "aspects", "emotion", "stance", "irony", "intensity", "opinion holder"):
        assert n in names
    user = tmp_path / "p.yaml"
    user.write_text("perspectives:\n  - name: irony\n    instruction: Is it sarcastic?\n"
                    "  - name: humour\n    instruction: Is it funny?\n")
    _, added = load_perspectives(PerspectiveSection(file=str(user)))
    by = {p["name"]: p for p in added}
    assert by["irony"]["instruction"] == "Is it sarcastic?" and "humour" in by and "aspects" in by
    _, replaced = load_perspectives(PerspectiveSection(file=str(user), mode="replace"))
    assert [p["name"] for p in replaced] == ["irony", "humour"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("perspectives:\n  - name: x\n")
    with pytest.raises(ConfigError, match="bad.yaml.*instruction"):
        load_perspectives(PerspectiveSection(file=str(bad)))


def test_harvest_records_filters_and_sft_readable(kd_teacher_dir, texts_jsonl, tmp_path, capsys):
    out = tmp_path / "corpus"
    cfg = _cfg(*_args(kd_teacher_dir, texts_jsonl, out))
    harvest(cfg)
    recs = load_corpus(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["texts"] == 16 and summary["duplicate_texts_dropped"] == 2
    assert summary["jobs"] == 32
    # Every prompt is accounted for: kept or dropped for a named reason.
    assert summary["kept"] + summary["empty"] + summary["truncated"] + summary["duplicate"] == 32
    assert summary["kept"] == len(recs) > 0 and summary["truncated"] > 0 and summary["empty"] > 0
    ids = [r["id"] for r in recs]
    assert len(set(ids)) == len(ids)
    for r in recs:
        assert set(r) >= {"id", "text", "perspective", "prompt", "response", "teacher", "sampling"}
        assert r["perspective"] in ("overall polarity", "irony") and r["perspective"] in r["id"]
        assert r["text"] in r["prompt"] and r["response"].strip()
        assert r["sampling"]["temperature"] == 1.0
    printed = capsys.readouterr().out
    assert "texts/s" in printed and "tokens/s" in printed
    # The folder is the trainer's (prompt, response) SFT data as it is.
    from distill.data.sft import read_records

    sft = read_records(str(out))
    assert [(s.prompt, s.response) for s in sft] == [(r["prompt"], r["response"]) for r in recs]
    # Parquet shards hold the same records.
    pq = tmp_path / "pq"
    harvest(_cfg(*_args(kd_teacher_dir, texts_jsonl, pq, "--output.format=parquet")))
    assert load_corpus(pq) == recs
    # A second run over a finished corpus changes nothing; a different config is refused.
    harvest(cfg)
    assert load_corpus(out) == recs
    with pytest.raises(ValueError, match="different config"):
        harvest(_cfg(*_args(kd_teacher_dir, texts_jsonl, out, "--sampling.seed=5")))


def test_changed_teacher_weights_are_refused_and_truncation_warned(kd_teacher_dir, texts_jsonl, tmp_path, capsys):
    """A corpus is tied to the teacher weights it came from (a teacher re-saved in place no longer
    resumes the stale corpus), and a harvest that drops most answers as truncated says so with the fix."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(kd_teacher_dir, teacher)
    out = tmp_path / "corpus"
    args = _args(teacher, texts_jsonl, out, "--input.limit=4", "--sampling.stop_token_ids=[]", "--sampling.max_new_tokens=2")
    harvest(_cfg(*args))
    s = json.loads((out / "summary.json").read_text())
    assert s["truncated"] == s["jobs"] == 8 and s["truncated_fraction"] == 1.0
    warn = "8 of 8 answers (100%) reached max_new_tokens=2 and were dropped as truncated: raise sampling.max_new_tokens"
    assert s["warnings"] and s["warnings"][0].startswith(warn)
    assert f"[harvest] warning: {warn}" in capsys.readouterr().out
    man = json.loads((out / "manifest.json").read_text())
    assert "model.safetensors" in man["teacher_weights"]["files"]
    harvest(_cfg(*args))  # the same weights: the finished corpus is kept as it is
    w = teacher / "model.safetensors"
    w.write_bytes(w.read_bytes())  # re-saved in place: new mtime
    with pytest.raises(ValueError, match="harvested from other weights of teacher .*changed: model.safetensors.*overwrite=true"):
        harvest(_cfg(*args))
    harvest(_cfg(*args, "--output.overwrite=true"))
    assert json.loads((out / "manifest.json").read_text())["teacher_weights"] != man["teacher_weights"]


def test_duplicate_answers_are_dropped(kd_teacher_dir, texts_jsonl, tmp_path):
    # Greedy-like sampling (tiny top_k) with 3 samples per prompt: repeated answers must be dropped.
    out2 = tmp_path / "dup2"
    harvest(_cfg(*_args(kd_teacher_dir, texts_jsonl, out2, "--sampling.top_k=1", "--sampling.samples_per_prompt=3",
                        "--input.limit=4", "--sampling.max_new_tokens=40")))
    s = json.loads((out2 / "summary.json").read_text())
    kept_prompts = s["kept"]
    assert s["duplicate"] == 2 * kept_prompts > 0
    assert s["kept"] + s["empty"] + s["truncated"] + s["duplicate"] == 24


@pytest.mark.slow
def test_resume_after_kill_9(kd_teacher_dir, texts_jsonl, tmp_path):
    """kill -9 a harvest mid-run, run it again: the corpus equals an uninterrupted run's, no duplicates."""
    ref_dir, dir_ = tmp_path / "ref", tmp_path / "killed"
    harvest(_cfg(*_args(kd_teacher_dir, texts_jsonl, ref_dir)))
    ref = load_corpus(ref_dir)
    n_shards = json.loads((ref_dir / "manifest.json").read_text())["n_shards"]
    cmd = [sys.executable, str(REPO / "launchers" / "harvest.py"), *_args(kd_teacher_dir, texts_jsonl, dir_),
           "--teacher.max_batch_size=1"]  # slow the victim down: one prompt per forward
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        done = 0
        while time.time() < deadline and proc.poll() is None:
            man = dir_ / "manifest.json"
            if man.is_file():
                try:
                    done = len(json.loads(man.read_text())["completed"])
                except json.JSONDecodeError:  # cannot happen: the manifest is replaced atomically
                    raise
                if done >= 2:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, "harvest finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    man = json.loads((dir_ / "manifest.json").read_text())
    assert 2 <= len(man["completed"]) < n_shards
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming" in rerun.stdout
    got = load_corpus(dir_)
    ids = [r["id"] for r in got]
    assert len(set(ids)) == len(ids)
    assert got == ref
    assert not [p for p in dir_.iterdir() if p.name.startswith(".")]


def test_bad_inputs_are_clear_errors(tmp_path, kd_teacher_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'text'"):
        harvest(_cfg(*_args(kd_teacher_dir, bad, tmp_path / "o")))
    with pytest.raises(ConfigError, match="input.path"):
        _cfg("--input.source=jsonl")
    with pytest.raises(ConfigError, match="unknown key"):
        _cfg("--output.shards=3")


def test_text_file_input_dedup_and_ids(tmp_path):
    from distill.knowdist.harvest import InputSection, load_inputs

    f = tmp_path / "t.txt"
    f.write_text("great  food\n\nawful service\ngreat food\n" + " ".join(["w"] * 300) + "\n", encoding="utf-8")
    texts, dup = load_inputs(InputSection(source="text", path=str(f), max_words=200))
    assert [t for _, t in texts][:2] == ["great food", "awful service"] and dup == 1
    assert len(texts[2][1].split()) == 200
    again, _ = load_inputs(InputSection(source="text", path=str(f), max_words=200))
    assert [i for i, _ in again] == [i for i, _ in texts]  # ids are a function of the text
    assert len({i for i, _ in texts}) == 3


@pytest.mark.parametrize("case", ["builtin_name", "template_name", "max_new_tokens", "perspectives_file", "output_dir"])
def test_launcher_refuses_before_the_teacher(tmp_path, capsys, monkeypatch, launcher, case):
    """launchers/harvest.py: exit 2 and one line naming the key and the known values, before any
    text is read or teacher built (in-process through run_cli)."""
    import distill.models.builtin as builtin
    from distill.errors import run_cli
    from distill.knowdist import harvest as kh

    def boom(*a, **k):
        raise AssertionError("the teacher was built before the bad input was refused")

    monkeypatch.setattr(builtin, "ensure_builtin_teacher", boom)
    monkeypatch.setattr(kh, "build_teacher", boom)
    monkeypatch.setattr(kh, "load_inputs", boom)
    args = [f"--output.dir={tmp_path / 'corpus'}"]
    if case == "builtin_name":  # no teacher.model: the built-in teacher, which knows its own eight names only
        args += ["--perspectives.names=overall polarity,sarcasm"]
        want = ["perspectives.names ['sarcasm']: the built-in teacher (prompt_style=builtin) knows only",
                "'overall polarity'", "'opinion holder'"]
    elif case == "template_name":
        args += [f"--teacher.model={tmp_path / 'teacher'}", "--perspectives.names=irony,sarcasm"]
        want = ["perspectives.names ['sarcasm'] are not defined; known:", "'intensity'", "perspectives.file"]
    elif case == "max_new_tokens":
        args += ["--sampling.max_new_tokens=0"]
        want = ["sampling.max_new_tokens=0 must be >= 1"]
    elif case == "perspectives_file":
        args += [f"--perspectives.file={tmp_path / 'mine.yaml'}"]
        want = [f"perspectives.file={tmp_path / 'mine.yaml'} does not exist"]
    else:
        (tmp_path / "runs").write_text("a file")
        args = [f"--output.dir={tmp_path / 'runs' / 'corpus'}", "--perspectives.names=irony"]
        want = [f"output.dir {tmp_path / 'runs' / 'corpus'} cannot be made: {tmp_path / 'runs'} is a file, not a folder"]
    rc = run_cli(launcher.load("harvest.py").main, "harvest.py", args)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("harvest.py: error: "), err
    for n in want:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("teacher,known", [("builtin", "'intimacy'"), ("Qwen/Qwen2.5-7B-Instruct", "'intensity'")])
def test_knowdist_harvest_perspective_checked_with_the_config(teacher, known):
    """launchers/knowdist.py harvests first when data.path is empty: an unknown perspective is refused
    when the config is read, naming the known ones (the built-in teacher's, or perspectives.yaml's)."""
    from distill.knowdist.stage import KnowDistConfig

    with pytest.raises(ConfigError, match=rf"harvest.perspectives \['sarcasm'\]: not .*; known: \[.*{known}"):
        load_config(KnowDistConfig, [f"--model.teacher={teacher}", "--harvest.perspectives=irony,sarcasm"])
    load_config(KnowDistConfig, [f"--model.teacher={teacher}", "--harvest.perspectives=irony,emotion"])
