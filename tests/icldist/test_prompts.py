"""ICLDist prompt set: deterministic, diverse, held-out tasks absent, train splits only, user data."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from distill.eval import protocol
from distill.icldist.prompts import build_prompt_set, prompt_set_hash


def test_deterministic_for_a_seed(prompt_config, small_prompts):
    again = build_prompt_set(prompt_config())
    assert [p.to_dict() for p in again] == [p.to_dict() for p in small_prompts]
    other = build_prompt_set(prompt_config(seed=8))
    assert prompt_set_hash(other) != prompt_set_hash(small_prompts)


def test_diversity(prompt_config):
    prompts = build_prompt_set(prompt_config(per_task=40, max_shots=8, max_prompt_chars=100000))
    formats = Counter(p.format for p in prompts)
    assert set(formats) == {"eval", "qa", "review", "arrow"}, formats
    shots = {p.n_shots for p in prompts}
    assert 0 in shots and 8 in shots and len(shots) == 9, shots
    # several instructions per task, and label order shuffled inside them
    sst2 = [p for p in prompts if p.task == "sc/sst2" and p.format != "eval"]
    heads = {p.prompt.split("\n")[0] for p in sst2}
    assert len(heads) >= 4, heads
    orders = {h.index("negative") < h.index("positive") for h in heads if "negative" in h and "positive" in h}
    assert orders == {True, False}


def test_eval_format_is_the_evaluators_prompt(small_prompts):
    from distill.data.sentibench import load_task

    ev = [p for p in small_prompts if p.format == "eval"]
    assert ev
    for p in ev:
        task, idx = p.id.rsplit("/", 1)
        rec = load_task(task, "train")[int(idx)]
        assert p.prompt.startswith(protocol.instruction(task, rec) + "\n\n")
        assert p.prompt.endswith(f"Sentence: {rec.text[:200]}\nLabel:") or p.prompt.endswith("...\nLabel:")
        assert p.answer == " " + protocol.answer_text(task, rec)


def test_classification_answers_start_with_a_label_word(small_prompts):
    for p in small_prompts:
        if p.kind == "classification":
            assert p.answer.startswith(" " + p.label_words[p.gold])
            assert [w.strip() for w in protocol.LABEL_WORDS[p.task]] == p.label_words


def test_held_out_tasks_are_absent(prompt_config, small_prompts):
    assert not [p for p in small_prompts if p.task == "multifaced/irony18"]
    assert not any("non-irony" in p.prompt or "ironic" in p.prompt for p in small_prompts)
    assert {p.task for p in small_prompts} == {"sc/sst2", "sc/twitter", "multifaced/pstance", "absa/atsa_rest16"}
    no_fg = build_prompt_set(prompt_config(fine_grained=False))
    assert {p.kind for p in no_fg} == {"classification"}


def test_never_reads_a_test_split(prompt_config, monkeypatch):
    import distill.data.sentibench as sb

    seen = []
    real = sb.load_task

    def spy(task, split="test", data_dir=None):
        seen.append(split)
        return real(task, split, data_dir)

    monkeypatch.setattr(sb, "load_task", spy)
    build_prompt_set(prompt_config(tasks=["all"], held_out=[]))
    assert seen and set(seen) == {"train"}


def test_query_is_never_its_own_demonstration(prompt_config):
    prompts = build_prompt_set(prompt_config(tasks=["sc/sst2"], held_out=[], per_task=30, max_shots=8,
                                             max_prompt_chars=100000, formats=["qa"]))
    for p in prompts:
        blocks = p.prompt.split("\n\n")[1:]
        query = blocks[-1]
        assert query not in blocks[:-1]


def test_user_dataset(prompt_config, tmp_path):
    f = tmp_path / "reviews.jsonl"
    rows = [{"review": f"the food was {'great' if i % 2 else 'awful'} {i}", "stars": i % 2} for i in range(10)]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    spec = {"name": "my/reviews", "path": str(f), "text_field": "review", "label_field": "stars",
            "label_map": {0: "bad", 1: "good"}, "labels": ["bad", "good"]}
    prompts = build_prompt_set(prompt_config(tasks=["sc/sst2"], extra=[spec], formats=["eval", "qa"]))
    mine = [p for p in prompts if p.task == "my/reviews"]
    assert len(mine) == 6 and all(p.format == "qa" for p in mine)  # no evaluation layout for user tasks
    assert all(p.answer in (" bad", " good") for p in mine)
    assert not [p for p in build_prompt_set(prompt_config(tasks=["sc/sst2"], extra=[spec], held_out=["my/reviews"]))
                if p.task == "my/reviews"]
    bad = dict(spec, text_field="text")
    with pytest.raises(ValueError, match=r"extra\[0\].*record 0 has no field 'text'"):
        build_prompt_set(prompt_config(tasks=["sc/sst2"], extra=[bad]))
    with pytest.raises(ValueError, match="split 'test' is not allowed"):
        build_prompt_set(prompt_config(tasks=["sc/sst2"], extra=[dict(spec, split="test")]))
