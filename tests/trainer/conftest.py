"""Fixtures of the trainer tests: a synthetic-text tokenizer, tiny teacher/student folders and a
(prompt, response) JSONL set, all built in-process (no data, no hub) and deterministic, so the
pinned losses do not depend on which SentiBench copy a machine has."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

_WORDS = {
    "pos": ["great", "lovely", "wonderful", "excellent", "fun", "superb", "friendly"],
    "neg": ["awful", "boring", "terrible", "rude", "dull", "bad", "slow"],
    "noun": ["film", "food", "service", "room", "staff", "plot", "music", "price"],
}


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        pol = rng.choice(["pos", "neg"])
        noun = rng.choice(_WORDS["noun"])
        adj = rng.choice(_WORDS[pol])
        text = f"the {noun} was {adj} and the {rng.choice(_WORDS['noun'])} was {rng.choice(_WORDS[pol])}"
        label = "positive" if pol == "pos" else "negative"
        out.append({"id": f"ex{i}", "prompt": f"Text: {text}\nPerspective: overall polarity\nAnalysis:",
                    "response": f" The overall sentiment is {label} because the {noun} was {adj}."})
    return out


def save_tiny_model(tok, size, seed, folder: Path, **overrides) -> Path:
    from distill.models.tiny import build_tiny_causal_lm

    model = build_tiny_causal_lm(len(tok), size, seed=seed, **overrides)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """{tokenizer, student, teacher, data, root}: folders and a 96-record JSONL file."""
    from distill.models.tiny import TinySize, train_tokenizer

    root = tmp_path_factory.mktemp("trainer_assets")
    pairs = synthetic_pairs(96)
    texts = [p["prompt"] + p["response"] for p in pairs] * 3
    tok = train_tokenizer(texts, vocab_size=384)
    teacher = save_tiny_model(tok, TinySize(hidden=48, layers=2, heads=4, kv_heads=2, intermediate=96), 1, root / "teacher",
                          initializer_range=0.3)  # a peaked (confident) random teacher: KD well above 0
    student = save_tiny_model(tok, "micro", 2, root / "student")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return {"tokenizer": tok, "student": str(student), "teacher": str(teacher), "data": str(data), "root": root}


def tiny_cfg_dict(assets, out_dir, **sections) -> dict:
    """A RunConfig mapping for a short fp32 run on the tiny assets (torch engine by default)."""
    d = {
        "run": {"out_dir": str(out_dir)},
        "model": {"student": assets["student"], "teacher": assets["teacher"]},
        "data": {"path": assets["data"], "max_len": 64},
        "train": {"steps": 6, "micro_batch": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2, "seed": 0},
        "kd": {"kind": "forward_kl", "ce_weight": 1.0, "kd_weight": 1.0},
        "deepspeed": {"engine": "torch"},
        "checkpoint": {"every": 0, "keep_last": 2},
        "log": {"progress_bar": False},
    }
    for sec, vals in sections.items():
        d.setdefault(sec, {}).update(vals)
    return d


def run_child(spec: dict, tmp: Path, *, env_extra: dict | None = None, world: int = 1, timeout: int = 300,
              wait: bool = True):
    """Run tests/trainer/_child.py with ``spec`` in ``world`` processes (gloo on 127.0.0.1)."""
    spec_path = tmp / f"spec-{len(list(tmp.glob('spec-*.json')))}.json"
    spec_path.write_text(json.dumps(spec))
    procs = []
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for r in range(world):
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        if world > 1:
            env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        env.update(env_extra or {})
        procs.append(subprocess.Popen([sys.executable, str(HERE / "_child.py"), str(spec_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    if not wait:
        return procs
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
        if p.returncode != 0:
            for q in procs:
                q.kill()
            raise AssertionError(f"child exited {p.returncode}:\n{out[-4000:]}")
    return outs


def read_metrics(out_dir) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip() and "loss" in json.loads(x)]


def record_rollouts(tr) -> dict:
    """Wrap a run's on-policy rollout: the returned {step: {dataset index: response tokens}} fills with
    what the student writes."""
    seen: dict = {}
    inner = tr.batches.rollout

    def rec(step, items, positions, indices):
        out = inner(step, items, positions, indices)
        for row_items, row_idx in zip(out, indices):
            for it, i in zip(row_items, row_idx):
                if it["on_policy"]:
                    first = next(t for t, lab in enumerate(it["labels"]) if lab != -100)
                    seen.setdefault(step, {})[i] = it["input_ids"][first:]
        return out

    tr.batches.rollout = rec
    return seen
