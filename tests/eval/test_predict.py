"""distill.predict: SentiBench prompts on new text, with a tiny random model folder (CPU)."""

from __future__ import annotations

import json
import math

import pytest

from distill.errors import EXIT_USER_ERROR, run_cli


def _run(argv, capsys):
    from distill.predict import main

    rc = run_cli(main, "predict", argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _independent_probs(model_dir, task, text, shots, seed):
    """Softmax of the model's next-token logits at the label words' first sub-tokens, built here."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.data.sentibench import load_task

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pool = load_task(task, "train")
    demos = [pool[j] for j in random.Random(seed).sample(range(len(pool)), shots)]
    instr = ("Please perform Sentiment Analysis task. Given the sentence, assign a sentiment polarity label from "
             "['negative', 'positive']. Return label only without any other text.")
    prompt = "\n".join([instr, ""] + [f"Sentence: {d.text}\nLabel: {d.label.lower()}\n" for d in demos]
                       + [f"Sentence: {text}\nLabel:"])
    ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in (" negative", " positive")]
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0, -1].float()
    return dict(zip(("negative", "positive"), logits[ids].softmax(-1).tolist()))


@pytest.mark.parametrize("shots", [4, 0])
def test_text_classification_probs(tiny_lm_dir, capsys, shots):
    text = "a warm , funny and moving film ."
    rc, out, err = _run(["--model", str(tiny_lm_dir), "--task", "sst2", "--text", text, "--shots", str(shots),
                         "--device", "cpu"], capsys)
    assert rc == 0, err
    rec = json.loads(out.strip().splitlines()[0])
    assert rec["task"] == "sc/sst2" and rec["text"] == text
    assert rec["label"] in ("negative", "positive")
    assert set(rec["probs"]) == {"negative", "positive"}
    assert math.isclose(sum(rec["probs"].values()), 1.0, abs_tol=1e-6)
    ref = _independent_probs(tiny_lm_dir, "sc/sst2", text, shots, 42)
    for k in ref:
        assert rec["probs"][k] == pytest.approx(ref[k], abs=1e-5)
    assert rec["label"] == max(ref, key=ref.get)


def test_jsonl_round_trips_ids(tiny_lm_dir, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    rows = [{"id": "a7", "text": "great food"}, {"id": 3, "text": "terrible service"}, {"text": "ok"}]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out" / "preds.jsonl"
    rc, _, err = _run(["--model", str(tiny_lm_dir), "--task", "sc/twitter", "--input", str(inp),
                       "--output", str(out), "--batch-size", "2", "--device", "cpu"], capsys)
    assert rc == 0, err
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g.get("id") for g in got] == ["a7", 3, None]
    assert "id" not in got[2]
    assert [g["text"] for g in got] == [r["text"] for r in rows]
    for g in got:
        assert g["label"] in ("negative", "positive", "neutral")
        assert math.isclose(sum(g["probs"].values()), 1.0, abs_tol=1e-6)


def test_fine_grained_returns_answer_and_tuples(tiny_lm_dir, capsys):
    rc, out, err = _run(["--model", str(tiny_lm_dir), "--task", "absa/asqp_rest16", "--text",
                         "The pizza was great but the waiter was rude .", "--max-new-tokens", "12",
                         "--device", "cpu"], capsys)
    assert rc == 0, err
    rec = json.loads(out.strip().splitlines()[0])
    assert {"answer", "tuples", "parse_failed", "invalid_tuples"} <= set(rec)
    assert isinstance(rec["tuples"], list)
    assert "label" not in rec


def test_user_errors(tiny_lm_dir, tmp_path, capsys):
    rc, _, err = _run(["--model", str(tiny_lm_dir), "--task", "sc/nope", "--text", "x"], capsys)
    assert rc == EXIT_USER_ERROR and "unknown task 'sc/nope'" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _run(["--model", str(tmp_path / "missing"), "--task", "sst2", "--text", "x"], capsys)
    assert rc == EXIT_USER_ERROR and "no such model folder" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    rc, _, err = _run(["--model", str(tiny_lm_dir), "--task", "sst2", "--input", str(bad)], capsys)
    assert rc == EXIT_USER_ERROR and f"{bad}:2" in err and len(err.strip().splitlines()) == 1
    bad.write_text("not json\n")
    rc, _, err = _run(["--model", str(tiny_lm_dir), "--task", "sst2", "--input", str(bad)], capsys)
    assert rc == EXIT_USER_ERROR and f"{bad}:1: not valid JSON" in err
    rc, _, err = _run(["--model", str(tiny_lm_dir), "--task", "multifaced/pstance", "--text", "x"], capsys)
    assert rc == EXIT_USER_ERROR and "target" in err
