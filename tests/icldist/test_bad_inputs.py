"""Bad inputs to ``launchers/icldist.py`` (issue 26): each is exit status 2 and one line naming the key,
file, record or folder and what to do, before any model is built or loaded (in-process through
run_cli; the built-in models and the trainer are replaced by a failure to prove it)."""

from __future__ import annotations

import json

import pytest

from distill.errors import EXIT_USER_ERROR, run_cli


@pytest.fixture
def icldist(monkeypatch, tmp_path, capsys):
    """``icldist(*args, yaml=None)`` -> the error line; fails the test if a model is built or loaded."""
    from distill.icldist import stage

    def boom(*a, **k):
        raise AssertionError("a model was built or loaded before the bad input was refused")

    monkeypatch.setattr(stage, "resolve_models", boom)
    monkeypatch.setattr(stage, "make_trainer", boom)

    def run(*args, yaml: str | None = None) -> str:
        argv = [f"--run.out_dir={tmp_path / 'run'}", "--prompts.tasks=sc/sst2", "--prompts.per_task=4",
                "--teacher.ray_address=local", *args]
        if yaml is not None:
            (tmp_path / "c.yaml").write_text(yaml)
            argv = ["--config", str(tmp_path / "c.yaml"), *argv]
        rc = run_cli(stage.run_from_argv, "icldist.py", argv)
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.strip()]  # (datasets may draw a progress bar first)
        assert rc == EXIT_USER_ERROR and "Traceback" not in err, err
        assert lines[-1].startswith("icldist.py: error: ") and sum("error" in x for x in lines) == 1, lines
        return lines[-1]

    return run


@pytest.fixture
def reviews(tmp_path):
    """A user dataset: field 'review', raw labels 0/1/2 in field 'stars'."""
    f = tmp_path / "reviews.jsonl"
    f.write_text("".join(json.dumps({"review": f"the food was fine {i}", "stars": i % 3}) + "\n" for i in range(9)))
    return f


def _extra(**spec) -> str:
    return "prompts:\n  extra:\n    - " + json.dumps(spec) + "\n"


def bert_folder(path):
    from transformers import BertConfig

    BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               architectures=["BertForMaskedLM"]).save_pretrained(path)
    return path


def test_held_out_task_that_does_not_exist_names_the_known_ones(icldist):
    line = icldist("--prompts.held_out=sc/sst3,multifaced/irony18")
    for n in ("prompts.held_out: ['sc/sst3'] are not tasks", "sc/sst2", "multifaced/irony18", "absa/opener"):
        assert n in line, line


@pytest.mark.parametrize("case", ["unknown_key", "label_map_word", "missing_file", "task", "data_dir"])
def test_config_errors_before_any_data_is_read(icldist, reviews, tmp_path, case):
    base = {"name": "my/reviews", "path": str(reviews), "text_field": "review", "label_field": "stars",
            "labels": ["bad", "ok", "good"]}
    if case == "unknown_key":
        line = icldist(yaml=_extra(**base, lables=["x"]))
        want = ["prompts.extra[0]: unknown key(s) ['lables']", "known:", "label_map"]
    elif case == "label_map_word":
        line = icldist(yaml=_extra(**base, label_map={"0": "bad", "1": "gud", "2": "good"}))
        want = ["prompts.extra[0].label_map: '1' -> 'gud', but 'gud' is not in labels ['bad', 'ok', 'good']"]
    elif case == "missing_file":
        line = icldist(yaml=_extra(**dict(base, path=str(tmp_path / "nope" / "reviews.jsonl"))))
        want = [f"prompts.extra[0].path: {tmp_path / 'nope' / 'reviews.jsonl'} does not exist"]
    elif case == "task":
        line = icldist("--prompts.tasks=sc/sst2,sc/ssst2")
        want = ["prompts.tasks='sc/sst2,sc/ssst2': unknown SentiBench task(s) ['sc/ssst2']; known:", "sc/sst2"]
    else:
        line = icldist(f"--prompts.data_dir={tmp_path / 'no-data'}")
        want = [f"prompts.data_dir: {tmp_path / 'no-data'} does not exist"]
    for n in want:
        assert n in line, line


@pytest.mark.parametrize("case", ["label_field", "label_outside_labels", "sentibench_label"])
def test_data_errors_name_the_file_record_and_field(icldist, reviews, tmp_path, case):
    base = {"name": "my/reviews", "path": str(reviews), "text_field": "review", "label_field": "stars",
            "label_map": {"0": "bad", "1": "good"}}
    if case == "label_field":
        line = icldist(yaml=_extra(**dict(base, label_field="rating")))
        want = [f"prompts.extra[0] ({reviews}): record 0 has no field 'rating'", "set prompts.extra[0].label_field",
                "['review', 'stars']"]
    elif case == "label_outside_labels":  # raw label 2 is neither mapped nor a label word
        line = icldist(yaml=_extra(**base, labels=["bad", "good"]))
        want = [f"({reviews}): record 2 has label '2', which is not in labels ['bad', 'good']", "label_map"]
    else:
        root = tmp_path / "sb"
        (root / "sc" / "sst2").mkdir(parents=True)
        rows = [{"sentence": f"s{i}", "label": lab} for i, lab in enumerate(["positive", "negative", "pos", "negative"])]
        (root / "sc" / "sst2" / "train.json").write_text(json.dumps(rows))
        line = icldist(f"--prompts.data_dir={root}", "--prompts.held_out=")
        want = [f"{root / 'sc' / 'sst2' / 'train.json'}: record 2: label 'pos' is not in the sc/sst2 label set "
                f"['negative', 'positive']"]
    for n in want:
        assert n in line, line


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_model_folder_that_is_not_a_causal_lm(icldist, tmp_path, role):
    bert = bert_folder(tmp_path / "bert")
    other = "teacher" if role == "student" else "student"
    line = icldist(f"--model.{role}={bert}", f"--model.{other}=builtin")
    assert f"{role} folder (model.{role}) {bert} is a bert (BertForMaskedLM), not a causal language model" in line


def test_missing_model_folder_export_and_cache_dir_in_the_way(icldist, tmp_path):
    line = icldist(f"--model.student={tmp_path / 'runs' / 'knowdist' / 'export'}")
    assert f"student folder (model.student) {tmp_path / 'runs' / 'knowdist' / 'export'} does not exist" in line
    line = icldist("--stage", "eval")
    assert f"--stage eval: {tmp_path / 'run' / 'export'} does not exist; train first" in line
    (tmp_path / "cache").write_text("a file")
    line = icldist(f"--teacher.cache_dir={tmp_path / 'cache'}", "--teacher.source=cache")
    assert f"teacher.cache_dir: {tmp_path / 'cache'} is a file, not a folder" in line
