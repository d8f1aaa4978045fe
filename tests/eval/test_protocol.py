"""Prompt construction: the authors' strings and layout, their demonstration draws, determinism, no leak."""

from __future__ import annotations

import random

import pytest

from distill.data.locate import sentibench_dir
from distill.data.sentibench import TASKS, LabelRecord, TupleRecord, load_task
from distill.eval.protocol import INSTRUCTIONS, LABEL_WORDS, build_prompt, build_prompts, sample_demo_indices


def test_instructions_keep_the_authors_typos():
    assert "'restaurant pcrices'" in INSTRUCTIONS["absa/asqp_rest16"]
    assert "'drinks prices','drinks quality'" in INSTRUCTIONS["absa/asqp_rest16"]
    assert "assign a emotion label" in INSTRUCTIONS["multifaced/tweeteval"]
    assert "sentiment polarity). \n\nEach tuple" in INSTRUCTIONS["absa/opener"]
    assert INSTRUCTIONS["multifaced/pstance"].count("%s") == 1
    assert set(INSTRUCTIONS) == set(TASKS)
    assert LABEL_WORDS["multifaced/intimacy"] == (" not intimate", " moderately intimate", " highly intimate")


def test_classification_prompt_layout():
    demos = [LabelRecord(0, "great fun", "positive"), LabelRecord(1, "dull", "Negative")]
    prompt = build_prompt("sc/sst2", LabelRecord(5, "so so", "negative"), demos)
    assert prompt == (
        INSTRUCTIONS["sc/sst2"] + "\n\n"
        "Sentence: great fun\nLabel: positive\n\n"
        "Sentence: dull\nLabel: negative\n\n"
        "Sentence: so so\nLabel:"
    )


def test_pstance_prompt_renders_targets():
    demo = LabelRecord(0, "vote for him", "FAVOR", "Bernie Sanders")
    prompt = build_prompt("multifaced/pstance", LabelRecord(3, "no way", "AGAINST", "Donald Trump"), [demo])
    assert prompt.startswith('Please perform Stance Detection task. Given the sentence, assign a sentiment label '
                             'expressed by the author towards "Donald Trump" from')
    assert "Sentence: vote for him\nLabel: favor(opinion towards 'Bernie Sanders')\n\nSentence: no way\nLabel:" in prompt


def test_fine_grained_demo_answers_are_python_lists():
    demo = TupleRecord(0, "It's the chef's best", (("chef's best", "positive"),))
    prompt = build_prompt("absa/atsa_rest16", TupleRecord(1, "ok", ()), [demo, TupleRecord(2, "meh", ())])
    assert "Label: [(\"chef's best\", 'positive')]\n\nSentence: meh\nLabel: []\n\nSentence: ok\nLabel:" in prompt


@pytest.mark.parametrize("task", ["sc/sst2", "multifaced/pstance", "absa/opener"])
def test_demos_are_the_authors_draws(task):
    # The authors: random.seed(seed) once, then random.sample(train_list, k) per test example in order.
    pool = load_task(task, "train", "sample")
    tests = load_task(task, "test", "sample")[:30]
    for seed in (42, 52, 62):
        random.seed(seed)
        theirs = [random.sample(pool, k=4) for _ in tests]
        ours, repaired = sample_demo_indices(pool, tests, 4, seed)
        assert repaired == 0
        assert [[pool[j] for j in idx] for idx in ours] == theirs


def test_prompts_deterministic_per_seed_and_limit_is_a_prefix():
    pool = load_task("sc/twitter", "train", "sample")
    tests = load_task("sc/twitter", "test", "sample")
    a, _ = build_prompts("sc/twitter", tests[:40], pool, 4, 42)
    b, _ = build_prompts("sc/twitter", tests[:40], pool, 4, 42)
    c, _ = build_prompts("sc/twitter", tests[:40], pool, 4, 52)
    full, _ = build_prompts("sc/twitter", tests, pool, 4, 42)
    assert a == b and a != c and full[:40] == a
    assert all(p.count("\nLabel:") == 5 for p in a)


def test_test_sentence_never_among_its_demonstrations():
    # A pool that contains every test sentence (twice): the protocol's raw draws would leak some.
    tests = [LabelRecord(i, f"test sentence {i}", "positive") for i in range(40)]
    others = [LabelRecord(100 + i, f"other {i}", "negative") for i in range(8)]
    pool = [LabelRecord(j, r.text, r.label) for j, r in enumerate(tests + tests + others)]
    total = 0
    for seed in range(5):
        idx, repaired = sample_demo_indices(pool, tests, 4, seed)
        total += repaired
        raw_rng = random.Random(seed)
        for t, chosen in zip(tests, idx):
            raw = raw_rng.sample(range(len(pool)), 4)
            assert t.text not in [pool[j].text for j in chosen]
            assert len(set(chosen)) == 4
            if t.text not in [pool[j].text for j in raw]:
                assert chosen == raw  # untouched prompts keep the authors' draw
        again, _ = sample_demo_indices(pool, tests, 4, seed)
        assert again == idx
    assert total > 0


@pytest.mark.skipif(sentibench_dir() is None, reason="full SentiBench data not found")
def test_no_leak_repairs_needed_with_default_seeds_on_the_full_data():
    for task in TASKS:
        pool, tests = load_task(task, "train"), load_task(task, "test")
        for seed in (42, 52, 62):
            assert sample_demo_indices(pool, tests, 4, seed)[1] == 0, (task, seed)
