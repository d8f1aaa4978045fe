"""KnowDist fixtures: a tiny teacher folder and a JSONL file of SentiBench texts."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def kd_teacher_dir(tmp_path_factory, tiny_tokenizer):
    from distill.models.tiny import build_tiny_causal_lm

    path = tmp_path_factory.mktemp("kdteacher") / "micro"
    build_tiny_causal_lm(len(tiny_tokenizer), "micro", seed=1).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def texts_jsonl(tmp_path_factory, sentibench_texts):
    path = tmp_path_factory.mktemp("kdinput") / "texts.jsonl"
    texts = sentibench_texts[:16] + sentibench_texts[:2]  # two repeated texts: de-duplicated
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path
