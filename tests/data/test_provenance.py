"""Every artifact says which SentiBench it was built from: the full data or the packaged sample.

Harvest manifests and summaries, ICLDist prompt summaries and SentiBench results record
``{"source": "full" | "sample", "path": ...}``, and a run on the sample says so on its last line.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from distill.data import locate
from distill.data.sentibench import SAMPLE_DIR, data_provenance, sample_note

FULL = locate.REPO_ROOT.parent / "shared" / "sentibench"
needs_full = pytest.mark.skipif(not (FULL / "sc").is_dir(), reason=f"full SentiBench not at {FULL}")


@pytest.fixture
def sample_only(monkeypatch, tmp_path):
    """No full data anywhere in the resolution order: $SENTIBENCH_DIR unset, empty cache, no ../shared."""
    monkeypatch.delenv("SENTIBENCH_DIR", raising=False)
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(locate, "REPO_ROOT", tmp_path / "no-repo" / "main")


@pytest.fixture
def full_data(monkeypatch):
    monkeypatch.setenv("SENTIBENCH_DIR", str(FULL))


@pytest.fixture(params=["sample", "full"])
def source(request):
    if request.param == "full":
        if not (FULL / "sc").is_dir():
            pytest.skip(f"full SentiBench not at {FULL}")
        request.getfixturevalue("full_data")
    else:
        request.getfixturevalue("sample_only")
    return request.param


def _last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_data_provenance(sample_only, monkeypatch, tmp_path):
    assert data_provenance() == {"source": "sample", "path": str(SAMPLE_DIR)}
    assert data_provenance("sample")["source"] == "sample"
    assert "SAMPLE" in sample_note(data_provenance()) and sample_note({"source": "full", "path": "x"}) == ""
    # a $SENTIBENCH_DIR that does not exist is an error, never a silent fall-back to the sample
    monkeypatch.setenv("SENTIBENCH_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="SENTIBENCH_DIR"):
        data_provenance()


@needs_full
def test_data_provenance_full(full_data):
    assert data_provenance() == {"source": "full", "path": str(FULL.resolve())}
    assert data_provenance("sample")["source"] == "sample"  # forcing the sample still says so


class _EchoTeacher:
    """Answers every prompt with one fixed analysis (no model: only the bookkeeping is under test)."""

    tokenizer = None

    def async_generate(self, prompts, sp, seeds=None):
        return len(prompts)

    def get(self, n):
        return [SimpleNamespace(text=f" positive, {i}.", token_ids=[1, 2], prompt_tokens=5, finish_reason="stop")
                for i in range(n)]


def test_harvest_manifest_and_last_line(source, tmp_path, capsys):
    from distill.knowdist.harvest import HarvestConfig, InputSection, OutputSection, PerspectiveSection, harvest

    out = tmp_path / "corpus"
    cfg = HarvestConfig(input=InputSection(source="sentibench", tasks=["sc/sst2"], limit_per_task=3),
                        perspectives=PerspectiveSection(names=["irony"]),
                        output=OutputSection(dir=str(out), shard_size=2, progress=False))
    harvest(cfg, teacher=_EchoTeacher(), model_name="echo")
    man = json.loads((out / "manifest.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert man["data"]["source"] == summary["data"]["source"] == source
    last = _last_line(capsys)
    assert ("SAMPLE" in last) == (source == "sample"), last
    harvest(cfg, teacher=_EchoTeacher(), model_name="echo")  # a resumed (complete) corpus keeps its record
    assert json.loads((out / "manifest.json").read_text())["data"] == man["data"]


def test_icldist_prompts_summary_and_last_line(source, tmp_path, capsys):
    from distill.icldist.config import ICLDistConfig
    from distill.icldist.stage import ICLDistRun, _data_note, build_prompts

    cfg = ICLDistConfig()
    cfg.prompts.tasks, cfg.prompts.held_out, cfg.prompts.per_task, cfg.prompts.max_shots = ["sc/sst2"], [], 2, 1
    build_prompts(ICLDistRun(cfg=cfg, out_dir=tmp_path), write=True)
    summary = json.loads((tmp_path / "prompts_summary.json").read_text())
    assert summary["data"]["source"] == source
    last = _last_line(capsys)
    assert last.startswith("[icldist]") and ("SAMPLE" in last) == (source == "sample"), last
    assert ("SAMPLE" in _data_note(cfg)) == (source == "sample")  # the `done in ...` line of the other stages


@pytest.fixture(scope="module")
def micro_lm_dir(tmp_path_factory, tiny_tokenizer):
    from distill.models.tiny import build_tiny_causal_lm

    path = tmp_path_factory.mktemp("provenance_lm") / "micro"
    build_tiny_causal_lm(len(tiny_tokenizer), "micro", seed=1).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_sentibench_results_and_last_line(source, micro_lm_dir, tmp_path, capsys):
    from distill.eval.sentibench import main

    out = tmp_path / "res"
    rc = main(["run", "--model", str(micro_lm_dir), "--tasks", "sc/sst2", "--shots", "1", "--seeds", "42",
               "--limit", "2", "--out", str(out), "--no-progress", "--device", "cpu", "--dtype", "float32"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["data_source"]["source"] == source and res["sample"] is (source == "sample")
    last = json.loads(_last_line(capsys))  # the last line stays one JSON document
    assert last["data"] == source and last["sample"] is (source == "sample")
    assert ("packaged sample" in (out / "results.md").read_text()) == (source == "sample")
