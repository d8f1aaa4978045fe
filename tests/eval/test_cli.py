"""Scorer input errors, the results table and the comparison plot."""

from __future__ import annotations

import json

import pytest

from distill.errors import run_cli
from distill.eval.report import load_results, plot_results, results_markdown
from distill.eval.sentibench import aggregate, main


def run_score(tmp_path, capsys, lines, *extra):
    """The scorer through run_cli (what ``python -m distill.eval.sentibench`` runs), in this process."""
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rc = run_cli(main, "sentibench", ["score", "--task", "sc/sst2", "--predictions", str(path), "--data-dir", "sample", *extra])
    return rc, capsys.readouterr().err


def test_missing_indices_are_an_error(tmp_path, capsys):
    rc, err = run_score(tmp_path, capsys, [json.dumps({"index": i, "prediction": "negative"}) for i in range(3)])
    assert rc == 2 and "p.jsonl: missing predictions for 197 of 200 indices: 3, 4, 5" in err and "--limit 3" in err
    rc, err = run_score(tmp_path, capsys, [json.dumps({"index": i, "prediction": "negative"}) for i in (0, 2)], "--limit", "3")
    assert rc == 2 and "missing predictions for 1 of 3 indices: 1" in err


def test_duplicate_and_bad_lines_are_errors(tmp_path, capsys):
    rows = [json.dumps({"index": i, "prediction": "negative"}) for i in (0, 1, 1)]
    rc, err = run_score(tmp_path, capsys, rows, "--limit", "2")
    assert rc == 2 and "line 3: duplicate index 1 (first on line 2)" in err
    rc, err = run_score(tmp_path, capsys, ['{"index": 0, "prediction": "negative"}', "{oops"], "--limit", "2")
    assert rc == 2 and "line 2: not valid JSON" in err
    rc, err = run_score(tmp_path, capsys, ['{"index": 0}'], "--limit", "1")
    assert rc == 2 and "line 1: missing field 'prediction'" in err
    rc, err = run_score(tmp_path, capsys, ['{"index": 5, "prediction": "x"}'], "--limit", "2")
    assert rc == 2 and "line 1: index 5 out of range 0..1" in err
    rc, err = run_score(tmp_path, capsys, ['{"index": "0", "prediction": "x"}'], "--limit", "1")
    assert rc == 2 and "field 'index' must be an integer" in err


def test_limit_must_be_positive(tmp_path, launcher):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"index": 0, "prediction": "negative"}) + "\n")
    for bad in ("0", "-3"):
        proc = launcher.run("-m distill.eval.sentibench", "score", "--task", "sc/sst2", "--predictions", str(path),
                            "--data-dir", "sample", "--limit", bad, timeout=120)
        launcher.assert_user_error(proc, "--limit", f"must be >= 1, got {bad}")


def test_user_errors_are_one_line_internal_errors_keep_their_traceback(tmp_path, launcher, monkeypatch, capsys):
    proc = launcher.run("-m distill.eval.sentibench", "score", "--task", "sc/sst2", "--predictions",
                        str(tmp_path / "nope.jsonl"), "--data-dir", "sample", timeout=120)
    line = launcher.assert_user_error(proc, "nope.jsonl: predictions file not found")
    assert line.startswith("sentibench: error: ")
    rc = run_cli(main, "sentibench", ["plot", str(tmp_path / "nope.json")])
    assert rc == 2 and "nope.json: no such results file" in capsys.readouterr().err
    from distill.eval import sentibench

    def boom(*a, **k):
        raise KeyError("an internal bug")

    monkeypatch.setattr(sentibench, "score_task", boom)
    (tmp_path / "p.jsonl").write_text(json.dumps({"index": 0, "prediction": "negative"}) + "\n")
    with pytest.raises(KeyError, match="an internal bug"):  # not turned into a user error
        run_cli(main, "sentibench", ["score", "--task", "sc/sst2", "--predictions", str(tmp_path / "p.jsonl"),
                                     "--data-dir", "sample", "--limit", "1"])


def test_labels_outside_the_label_set_are_counted_and_named(tmp_path, capsys):
    preds = ["negative", "Neutral", "neutral", "positive", "meh ", "", "negative", "positive"]
    rc, err = run_score(tmp_path, capsys, [json.dumps({"index": i, "prediction": p}) for i, p in enumerate(preds)],
                        "--limit", str(len(preds)))
    assert rc == 0
    warning = [x for x in err.splitlines() if "warning" in x]
    assert warning == ["sentibench score: warning: sc/sst2: 4 of 8 predictions are not in the label set "
                       "(negative, positive) and were scored as misses: 'neutral' x2, 'meh' x1, '' x1"]
    rc, err = run_score(tmp_path, capsys, [json.dumps({"index": i, "prediction": "positive"}) for i in range(3)],
                        "--limit", "3")  # a valid label absent from the gold labels is a miss, not a warning
    assert rc == 0 and "warning" not in err


def fake_results(name, shift, tasks=None):
    from distill.data.sentibench import TASKS

    tasks = tasks or TASKS
    per_seed = {}
    for k, t in enumerate(tasks):
        f1 = (k * 7 + shift) % 100 / 100
        m = {"f1": f1, "n": 10, "acc": f1, "precision": f1, "recall": f1, "parse_failures": 0}
        per_seed[t] = {"42": m, "52": dict(m, f1=f1 / 2)}
    res = {"model": name, "shots": 4, "seeds": [42, 52], "limit": None, "sample": False}
    res.update(aggregate(per_seed, tasks))
    return res


def test_aggregate_averages_and_table_layout():
    res = fake_results("org/model-a", 3, ["sc/sst2", "sc/imdb", "absa/opener"])
    # sst2: f1 0.03 and 0.015 -> rounded to 4 decimals, mean x100 = 2.25
    assert res["tasks"]["sc/sst2"]["score"] == pytest.approx(2.25)
    assert res["categories"]["basic"]["score"] == pytest.approx((2.25 + 100 * (0.10 + 0.05) / 2) / 2)
    assert res["overall"]["n_tasks"] == 3 and not res["overall"]["complete"]
    md = results_markdown([res])
    header, rule, row = md.splitlines()[:3]
    assert header.split("|")[1:4] == [" Model ", " IMDB ", " Yelp2 "] and header.strip().endswith("| Avg |")
    assert row.startswith("| model-a | 7.50 | - | 2.25 |")
    assert "3 of 12 datasets" in md


def test_plot_two_results_files(tmp_path, capsys):
    for name, shift in (("a", 0), ("b", 40)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(fake_results(name, shift)))
    out = tmp_path / "cmp.png"
    rc = main(["plot", str(tmp_path / "a/results.json"), str(tmp_path / "b/results.json"), "-o", str(out)])
    assert rc == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text(json.dumps({"tasks": {}}))
    with pytest.raises(ValueError, match=r"bad\.json: not a SentiBench results\.json \(missing field 'overall'\)"):
        load_results(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        plot_results([load_results(tmp_path / "nope.json")], out)


def test_download_extracts_the_datasets_folder(tmp_path):
    import tarfile

    from distill.data.sentibench import TASKS, load_task

    src = tmp_path / "Sentiment-Distillation-abc" / "datasets"
    for t in TASKS:
        for split in ("train", "test"):
            rec = {"sentence": "s", "label": "positive", "target": "t", "label_score": 1.0, "aspects": [],
                   "quards": [], "opinions": [], "sent_id": "x", "ID": "x"}
            (src / t).mkdir(parents=True, exist_ok=True)
            (src / t / f"{split}.json").write_text("\ufeff" + json.dumps([rec]), encoding="utf-8")
    (src / "sc" / ".DS_Store").write_text("junk")
    archive = tmp_path / "repo.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "Sentiment-Distillation-abc", arcname="Sentiment-Distillation-abc")
    dest = tmp_path / "cache" / "sentibench"
    rc = main(["download", "--dest", str(dest), "--url", archive.as_uri()])
    assert rc == 0 and (dest / "absa/opener/test.json").is_file() and not (dest / "sc/.DS_Store").exists()
    assert load_task("sc/sst2", "test", dest)[0].text == "s"


def test_an_exported_student_is_named_by_its_run(tmp_path):
    """`sentibench run --model runs/x/export` names the row `x (step N)`, not `export`."""
    import json

    from distill.eval.report import _label
    from distill.eval.sentibench import model_label

    exp = tmp_path / "my_run" / "export"
    exp.mkdir(parents=True)
    assert model_label(str(exp)) == str(exp)  # not one of ours: the path as given
    (exp / "distill_run.json").write_text(json.dumps({"step": 60, "config": {"run": {"name": "", "out_dir": str(exp.parent)}}}))
    assert model_label(str(exp)) == "my_run (step 60)"
    assert _label({"model": model_label(str(exp))}) == "my_run (step 60)"
    (exp / "distill_run.json").write_text(json.dumps({"step": 5, "config": {"run": {"name": "kd-7b", "out_dir": "x"}}}))
    assert model_label(str(exp)) == "kd-7b (step 5)"
