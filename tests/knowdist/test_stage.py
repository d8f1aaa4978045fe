"""The KnowDist stage: a real teacher's corpus goes through its chat template; shipped configs chain."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from distill.config import ConfigError, load_config

from ..conftest import assert_checkpoint_exports
from distill.knowdist.harvest import HarvestConfig, load_corpus
from distill.knowdist.stage import HarvestSection, KnowDistConfig, chat_harvest_config, prepare_corpus

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "launchers" / "configs"
# A small Jinja chat template with visible markers (the shape of Qwen's ChatML).
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _teacher(src: Path, dst: Path, chat: bool) -> Path:
    """A copy of the tiny teacher; chat=True sets a chat template on its tokenizer. Many ids count as
    eos so that the random teacher ends its answers (else every analysis is truncated and dropped)."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["eos_token_id"] = list(range(4, 1024))
    (dst / "config.json").write_text(json.dumps(cfg))
    if chat:
        tok = AutoTokenizer.from_pretrained(dst)
        tok.chat_template = CHAT
        tok.save_pretrained(dst)
    return dst


def _check_chat_prompts(recs):
    assert recs, "no analysis kept"
    for r in recs:
        p = r["prompt"]
        assert p.startswith("<|system|>You are an expert in sentiment analysis.") and p.endswith("<|assistant|>"), p
        assert f"<|user|>Text: {r['text']}<|end|>" in p, p
        assert "Perspective:" not in p  # never the built-in teacher's format


def test_chat_harvest_prompt_goes_through_apply_chat_template(kd_teacher_dir, texts_jsonl, tmp_path):
    from distill.knowdist.harvest import InputSection

    teacher = _teacher(kd_teacher_dir, tmp_path / "chat_teacher", chat=True)
    cfg = chat_harvest_config(teacher, tmp_path / "corpus", HarvestSection(perspectives=["irony", "aspects"],
                                                                           max_new_tokens=6))
    cfg.input = InputSection(source="jsonl", path=str(texts_jsonl), limit=3)
    cfg.output.progress = False
    from distill.knowdist.harvest import harvest

    recs = load_corpus(harvest(cfg))
    _check_chat_prompts(recs)
    assert {r["perspective"] for r in recs} <= {"irony", "aspects"}
    assert any("irony" in r["perspective"] and "ironic or sarcastic" in r["prompt"] for r in recs)


def test_real_teacher_without_chat_template_is_refused(kd_teacher_dir, tmp_path):
    teacher = _teacher(kd_teacher_dir, tmp_path / "plain_teacher", chat=False)
    cfg, _ = load_config(KnowDistConfig, [f"--model.teacher={teacher}", f"--model.student={teacher}",
                                          f"--run.out_dir={tmp_path / 'run'}", "--harvest.texts_per_task=1",
                                          "--harvest.perspectives=irony", "--harvest.max_new_tokens=4"])
    with pytest.raises(ConfigError, match="chat template"):
        prepare_corpus(cfg, teacher_is_builtin=False)


def test_launcher_harvests_real_teacher_with_chat_template_then_trains(launcher, kd_teacher_dir, tmp_path):
    teacher = _teacher(kd_teacher_dir, tmp_path / "chat_teacher", chat=True)
    run = tmp_path / "run"
    proc = launcher.run("knowdist.py", f"--model.student={teacher}", f"--model.teacher={teacher}",
                        "--deepspeed.engine=torch", "--log.progress_bar=false", f"--run.out_dir={run}",
                        "--harvest.texts_per_task=1", "--harvest.perspectives=irony", "--harvest.max_new_tokens=4",
                        "--train.steps=1", "--train.micro_batch=1", "--train.grad_accum=1", "--data.max_len=64", "--checkpoint.every=0",
                        "--train.warmup_steps=0")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    _check_chat_prompts(load_corpus(run / "corpus"))
    assert f"corpus {run / 'corpus'}" in proc.stdout
    assert_checkpoint_exports(run, tmp_path / "exported", "distill.knowdist.stage:KnowDistConfig")


def test_every_shipped_knowdist_config_reads_a_shipped_harvest_output():
    harvests = {}
    for y in sorted(CONFIGS.glob("*_harvest.yaml")):
        cfg, _ = load_config(HarvestConfig, ["--config", str(y)])
        harvests[str(Path(cfg.output.dir))] = (y.name, cfg)
    kds = sorted(CONFIGS.glob("*_knowdist.yaml"))
    assert len(kds) >= 2
    for y in kds:
        kd, _ = load_config(KnowDistConfig, ["--config", str(y)])
        path = str(Path(kd.data.path))
        assert path in harvests, f"{y.name}: data.path={path} is no shipped harvest config's output.dir {sorted(harvests)}"
        name, h = harvests[path]
        assert h.teacher.model == kd.model.teacher, (y.name, name)
        assert h.perspectives.prompt_style in ("chat", "chat_system"), name  # instruct teachers: their chat template
        # The teacher's name opens both file names: <teacher>_harvest.yaml feeds <teacher>_to_<student>_knowdist.yaml.
        assert y.name.startswith(name[:-len("_harvest.yaml")] + "_to_"), (y.name, name)
        raw = yaml.safe_load(y.read_text())
        assert raw["data"]["path"] == kd.data.path


def test_quick_comparison_caches_teacher_and_init_scores_and_plots(kd_teacher_dir, tmp_path, monkeypatch):
    from distill.knowdist import stage

    monkeypatch.setattr(stage, "QUICK_EVAL", {"tasks": ("sc/sst2", "multifaced/irony18"), "limit": 4, "shots": 2,
                                              "seeds": (42,)})
    teacher, init, student = (shutil.copytree(kd_teacher_dir, tmp_path / n) for n in ("teacher", "init", "student"))
    lines = stage.quick_comparison0(str(teacher), str(init), str(student), tmp_path / "run")
    assert lines[-1] == f"[knowdist] plot {tmp_path / 'run' / 'sentibench_quick.png'}"
    assert (tmp_path / "run" / "sentibench_quick.png").stat().st_size > 0
    for name, folder in (("teacher", teacher), ("student before", init), ("student after", student)):
        assert any(x.startswith(f"[knowdist]   {name}") and str(folder) in x and "sst2" in x for x in lines), lines
    assert len(list(teacher.glob("sentibench-quick-*.json"))) == 1  # cached next to the teacher
    assert len(list(init.glob("sentibench-quick-*.json"))) == 1
    assert not list(student.glob("sentibench-quick-*.json"))  # the trained student is scored every run
    cached = next(teacher.glob("sentibench-quick-*.json"))
    cached.write_text(cached.read_text().replace('"model": "teacher"', '"model": "teacher (cached)"'))
    again = stage.quick_comparison0(str(teacher), str(init), str(student), tmp_path / "run")
    assert json.loads(cached.read_text())["model"] == "teacher (cached)" and len(again) == len(lines)
