"""Fixtures of the multi-teacher tests: one useful teacher (a tiny LM trained here on the synthetic
(prompt, response) set) and one pure-noise teacher (random init, the same tokenizer), a random
student, the training JSONL and a held-out JSONL (other examples of the same distribution)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

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
        noun, adj = rng.choice(_WORDS["noun"]), rng.choice(_WORDS[pol])
        text = f"the {noun} was {adj} and the {rng.choice(_WORDS['noun'])} was {rng.choice(_WORDS[pol])}"
        label = "positive" if pol == "pos" else "negative"
        out.append({"id": f"ex{seed}-{i}", "prompt": f"Text: {text}\nPerspective: overall polarity\nAnalysis:",
                    "response": f" The overall sentiment is {label} because the {noun} was {adj}."})
    return out


@pytest.fixture(scope="session")
def mt_assets(tmp_path_factory):
    """{tokenizer, student, good, noise, data, heldout, heldout_pairs, root} (about 20 s, once)."""
    from distill.models.tiny import build_tiny_causal_lm, train_tokenizer
    from distill.multiteacher.study import noise_teacher, train_teacher

    root = tmp_path_factory.mktemp("multiteacher_assets")
    pairs, held = synthetic_pairs(96), synthetic_pairs(48, seed=7)
    tok = train_tokenizer([p["prompt"] + p["response"] for p in pairs] * 3, vocab_size=384)
    good = train_teacher(tok, [(p["prompt"], p["response"]) for p in pairs], root / "good", size="micro", steps=100)
    noise = noise_teacher(tok, root / "noise", size="micro", initializer_range=0.3)
    student = root / "student"
    build_tiny_causal_lm(len(tok), "micro", seed=2).save_pretrained(student)
    tok.save_pretrained(student)
    data, heldout = root / "data.jsonl", root / "heldout.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    heldout.write_text("".join(json.dumps(p) + "\n" for p in held))
    return {"tokenizer": tok, "student": str(student), "good": str(good), "noise": str(noise), "data": str(data),
            "heldout": str(heldout), "heldout_pairs": [(p["prompt"], p["response"]) for p in held], "root": root}


def mt_cfg_dict(assets, out_dir, weighting="fixed", *, teachers=None, **sections) -> dict:
    """A multi-teacher RunConfig mapping: the useful and the noise teacher, plain engine, fp32."""
    teachers = teachers or [{"name": "good", "path": assets["good"]}, {"name": "noise", "path": assets["noise"]}]
    d = {
        "run": {"out_dir": str(out_dir)},
        "model": {"student": assets["student"], "teacher": assets["good"]},
        "data": {"path": assets["data"], "max_len": 64},
        "train": {"steps": 6, "micro_batch": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2, "seed": 0},
        "kd": {"kind": "forward_kl", "ce_weight": 1.0, "kd_weight": 1.0, "teacher_backend": "multiteacher"},
        "deepspeed": {"engine": "torch"},
        "checkpoint": {"every": 0, "keep_last": 2},
        "log": {"progress_bar": False},
        "multiteacher": {"teachers": teachers, "weighting": weighting},
    }
    for sec, vals in sections.items():
        d.setdefault(sec, {}).update(vals)
    return d


def read_metrics(out_dir) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip() and "loss" in json.loads(x)]
