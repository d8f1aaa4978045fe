"""ICLDist fixtures: a small prompt set, a micro teacher saved as an HF folder, a second tokenizer."""

from __future__ import annotations

import pytest

TASKS = ["sc/sst2", "sc/twitter", "multifaced/pstance", "multifaced/irony18", "absa/atsa_rest16"]
HELD_OUT = ["multifaced/irony18"]


def small_prompt_config(**over):
    from distill.icldist.prompts import PromptConfig

    kw = dict(tasks=list(TASKS), held_out=list(HELD_OUT), per_task=6, max_shots=3, max_prompt_chars=900,
              max_text_chars=200, seed=7)
    kw.update(over)
    return PromptConfig(**kw)


@pytest.fixture(scope="session")
def small_prompts():
    from distill.icldist.prompts import build_prompt_set

    return build_prompt_set(small_prompt_config())


def _save_micro(tokenizer, path, seed):
    from distill.models.tiny import build_tiny_causal_lm

    model = build_tiny_causal_lm(len(tokenizer), "micro", seed=seed)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def micro_teacher_dir(tiny_tokenizer, tmp_path_factory):
    """A random micro Llama + the 4096-token tokenizer, as an HF folder (the teacher)."""
    return _save_micro(tiny_tokenizer, tmp_path_factory.mktemp("teacher"), seed=11)


@pytest.fixture(scope="session")
def other_tokenizer(sentibench_texts):
    """A different tokenizer (2048 tokens): a 'Qwen student' beside a 'Llama teacher'."""
    from distill.models.tiny import train_tokenizer

    return train_tokenizer(sentibench_texts[::4], vocab_size=2048)


@pytest.fixture(scope="session")
def prompt_config():
    """Factory: ``prompt_config(**overrides)`` -> the small PromptConfig used by these tests."""
    return small_prompt_config


@pytest.fixture(scope="session")
def local_teacher(micro_teacher_dir):
    from distill.teacher.local import LocalTeacher

    t = LocalTeacher(micro_teacher_dir, max_batch_tokens=4096)
    yield t
    t.shutdown()


@pytest.fixture(scope="session")
def teacher_inputs(small_prompts, local_teacher, tiny_tokenizer, tmp_path_factory):
    """(requests, answers) of the small prompt set for the micro teacher (answers: 6 tokens at most)."""
    from distill.icldist.data import teacher_request
    from distill.icldist.online import generate_answers

    path = tmp_path_factory.mktemp("answers") / "answers.jsonl"
    ans = generate_answers(local_teacher, small_prompts, path, tokenizer=tiny_tokenizer, max_new_tokens=6,
                           progress=False)
    answers = [ans.get(p.id, []) for p in small_prompts]
    requests = [teacher_request(p, tiny_tokenizer, a, 384) for p, a in zip(small_prompts, answers)]
    return requests, answers


def cache_manifest(prompts, tokenizer, k=8, shard_size=4, teacher="micro", temperature=1.0, weights=None):
    from distill.icldist.prompts import prompt_set_hash
    from distill.models.fingerprint import tokenizer_hash

    return {"teacher": teacher, "k": k, "temperature": float(temperature), "vocab_size": len(tokenizer),
            "tokenizer_hash": tokenizer_hash(tokenizer), "prompt_set_hash": prompt_set_hash(prompts),
            "n_prompts": len(prompts), "shard_size": shard_size, "max_len": 384,
            "teacher_weights": weights or {"hub": teacher}, "teacher_dtype": "auto", "teacher_quantization": "",
            "max_new_tokens": 6}


@pytest.fixture(scope="session")
def make_manifest():
    return cache_manifest


CACHE_K = 8
CACHE_REQUEST_SIZE = 3  # prompts per teacher request while building the conftest cache


class _Spy:
    """Records what the teacher returned for each (sequence, positions) request, and what was asked."""

    def __init__(self, teacher):
        self.teacher, self.seen, self.asked = teacher, {}, []

    def async_topk(self, seqs, poss, k, *, temperature, vocab_size):
        self.asked.append({"k": k, "temperature": temperature, "vocab_size": vocab_size, "n": len(seqs)})
        out = self.teacher.topk(seqs, poss, k, temperature=temperature, vocab_size=vocab_size)
        for s, p, t in zip(seqs, poss, out):
            self.seen[(tuple(s), tuple(p))] = t
        return out


@pytest.fixture(scope="session")
def spy_cls():
    """The recording client wrapper (``spy_cls(teacher)``); its type name is not LocalTeacher, so
    OnlineTargets calls its ``async_topk``."""
    return _Spy


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory, local_teacher, teacher_inputs, small_prompts, tiny_tokenizer, make_manifest):
    from distill.icldist.online import build_cache

    requests, answers = teacher_inputs
    root = tmp_path_factory.mktemp("cache") / "c"
    manifest = make_manifest(small_prompts, tiny_tokenizer, k=CACHE_K)
    spy = _Spy(local_teacher)
    build_cache(spy, requests, answers, root, manifest, request_size=CACHE_REQUEST_SIZE, progress=False)
    assert {(a["temperature"], a["vocab_size"]) for a in spy.asked} == {(1.0, len(tiny_tokenizer))}
    return root, manifest, spy.seen  # seen: what the teacher returned, per (sequence, positions)


