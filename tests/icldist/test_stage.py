"""ICLDist end to end on micro models through the core trainer: online, then cached with no teacher."""

from __future__ import annotations

import json
import shutil

import pytest

from ..conftest import assert_checkpoint_exports


@pytest.fixture(scope="module")
def micro_student_dir(tiny_tokenizer, tmp_path_factory):
    from distill.models.tiny import build_tiny_causal_lm

    path = tmp_path_factory.mktemp("student")
    build_tiny_causal_lm(len(tiny_tokenizer), "micro", seed=5).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


def _args(out, teacher, student, *extra):
    return [
        f"--run.out_dir={out}", f"--model.teacher={teacher}", f"--model.student={student}",
        "--deepspeed.engine=torch", "--teacher.ray_address=local", "--teacher.k=8", "--teacher.max_new_tokens=6",
        "--prompts.tasks=sc/sst2,multifaced/tweeteval,absa/atsa_rest16", "--prompts.held_out=multifaced/irony18",
        "--prompts.per_task=4", "--prompts.max_shots=2", "--prompts.max_prompt_chars=600", "--icl.max_len=256",
        "--train.steps=3", "--train.micro_batch=4", "--train.warmup_steps=1", "--log.progress_bar=false",
        "--report.tasks=sc/sst2,multifaced/irony18", "--report.limit=2", *extra,
    ]


def _record_targets(monkeypatch) -> list:
    """The OnlineTargets each run builds (what its top-k is requested with)."""
    import distill.icldist.online as online

    seen = []

    class Recorded(online.OnlineTargets):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self)

    monkeypatch.setattr(online, "OnlineTargets", Recorded)
    return seen


def test_online_train_then_report(tmp_path, micro_teacher_dir, micro_student_dir, tiny_tokenizer, monkeypatch):
    from distill.icldist.stage import run_from_argv

    seen = _record_targets(monkeypatch)
    out = tmp_path / "run"
    assert run_from_argv(_args(out, micro_teacher_dir, micro_student_dir)) == 0
    # the top-k was asked at the KD temperature over the teacher tokenizer's real vocabulary
    assert [(t.temperature, t.vocab_size) for t in seen] == [(1.0, len(tiny_tokenizer))]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert r["loss"] == r["loss"] and r["response_tokens"] > 0  # finite, trained on answers
        assert 0.0 <= r["teacher_wait_frac"] <= 1.0
    assert sum(r["label_kd"] for r in recs) > 0  # classification prompts got label-level targets
    assert (out / "export" / "model.safetensors").is_file()
    res = json.loads((out / "export" / "results.json").read_text())
    assert set(res["tasks"]) == {"sc/sst2", "multifaced/irony18"}
    assert res["icldist"]["held_out"] == ["multifaced/irony18"]
    assert "multifaced/irony18" not in res["icldist"]["trained_on"]
    assert (out / "export" / "results.png").is_file()
    assert "held out of training" in (out / "export" / "results.md").read_text()
    assert_checkpoint_exports(out, tmp_path / "exported", "distill.config:RunConfig")  # ICLDist trains a RunConfig


def test_cache_stage_then_train_without_teacher(tmp_path, micro_teacher_dir, micro_student_dir, monkeypatch,
                                                tiny_tokenizer):
    import distill.icldist.online as online
    from distill.icldist.cache import FORMAT_VERSION, CacheMismatch
    from distill.icldist.stage import run_from_argv

    out = tmp_path / "run"
    assert run_from_argv(_args(out, micro_teacher_dir, micro_student_dir, "--stage", "cache")) == 0
    manifest = json.loads((out / "teacher_cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["k"] == 8
    assert (manifest["temperature"], manifest["vocab_size"], manifest["format_version"]) == (
        1.0, len(tiny_tokenizer), FORMAT_VERSION)

    def no_teacher(*a, **k):
        raise AssertionError("a teacher was started although teacher.source=cache")

    monkeypatch.setattr(online, "open_teacher", no_teacher)
    monkeypatch.setattr(online, "LocalTeacher", no_teacher, raising=False)
    assert run_from_argv(_args(out, micro_teacher_dir, micro_student_dir, "--teacher.source=cache",
                               "--report.enabled=false")) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs][-3:] == [1, 2, 3]
    # the same cache with another k, or read at another KD temperature, is refused, naming the field
    with pytest.raises(CacheMismatch, match="k=8"):
        run_from_argv(_args(tmp_path / "run2", micro_teacher_dir, micro_student_dir, "--teacher.source=cache",
                            f"--teacher.cache_dir={out / 'teacher_cache'}", "--teacher.k=4", "--report.enabled=false"))
    with pytest.raises(CacheMismatch, match=r"temperature=1\.0, but this run needs temperature=2\.0"):
        run_from_argv(_args(tmp_path / "run3", micro_teacher_dir, micro_student_dir, "--teacher.source=cache",
                            f"--teacher.cache_dir={out / 'teacher_cache'}", "--kd.temperature=2.0",
                            "--report.enabled=false"))


def test_kd_temperature_2_online_then_cached(tmp_path, micro_teacher_dir, micro_student_dir, monkeypatch):
    """At T != 1 the teacher's top-k is asked (online) and cached at T, and the losses accept it."""
    from distill.icldist.stage import run_from_argv

    seen = _record_targets(monkeypatch)
    t2 = ("--kd.temperature=2.0", "--train.steps=2", "--report.enabled=false")
    online, cached = tmp_path / "online", tmp_path / "cached"
    assert run_from_argv(_args(online, micro_teacher_dir, micro_student_dir, *t2)) == 0
    assert [t.temperature for t in seen] == [2.0]
    assert run_from_argv(_args(cached, micro_teacher_dir, micro_student_dir, *t2, "--stage", "cache")) == 0
    assert json.loads((cached / "teacher_cache" / "manifest.json").read_text())["temperature"] == 2.0
    assert run_from_argv(_args(cached, micro_teacher_dir, micro_student_dir, *t2, "--teacher.source=cache")) == 0
    for out in (online, cached):
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == [1, 2]
        assert all(r["loss"] == r["loss"] for r in recs) and sum(r["label_kd"] for r in recs) > 0


def test_changed_teacher_is_refused_in_the_same_out_dir(tmp_path, micro_teacher_dir, micro_student_dir, launcher,
                                                        tiny_tokenizer):
    """Another teacher (or the same one overwritten in place) never reuses the cached targets or the answers."""
    from distill.icldist.cache import CacheMismatch
    from distill.icldist.stage import run_from_argv
    from distill.models.tiny import build_tiny_causal_lm

    teacher, other = tmp_path / "teacher", tmp_path / "other"
    shutil.copytree(micro_teacher_dir, teacher)
    shutil.copytree(micro_teacher_dir, other)
    out = tmp_path / "run"
    assert run_from_argv(_args(out, teacher, micro_student_dir, "--stage", "cache")) == 0
    assert "fingerprint" in json.loads((out / "teacher_answers.jsonl").read_text().splitlines()[0])
    with pytest.raises(CacheMismatch, match="built with max_len=256, but this run needs max_len=200"):
        run_from_argv(_args(out, teacher, micro_student_dir, "--teacher.source=cache", "--icl.max_len=200",
                            "--report.enabled=false"))
    proc = launcher.run("icldist.py", *_args(out, other, micro_student_dir, "--report.enabled=false"), timeout=600)
    launcher.assert_user_error(proc, "teacher_answers.jsonl were generated with teacher=", str(other), "delete")
    build_tiny_causal_lm(len(tiny_tokenizer), "micro", seed=99).save_pretrained(teacher, safe_serialization=True)
    with pytest.raises(CacheMismatch, match=r"teacher_weights\.files\.model\.safetensors="):
        run_from_argv(_args(out, teacher, micro_student_dir, "--teacher.source=cache", "--report.enabled=false"))
