"""launchers/study.py --quick end to end: every arm completes with finite numbers and the files exist.

This checks that the study runs, not its claims (those are measured by the full study, docs/results.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ARMS = ("teacher", "sft_gold", "sft_text", "knowdist", "full", "full_onpolicy", "full_topk16")
FIELDS = ("basic", "multifaceted", "fine_grained", "average", "params", "seconds")


@pytest.mark.slow
def test_quick_study_writes_every_arm(tmp_path, launcher):
    out = tmp_path / "study"
    proc = launcher.run("study.py", "--quick", "--seed", "3", "--out", str(out), timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["seed"] == 3
    for arm in ARMS:
        assert arm in res["arms"], f"arm {arm} missing: {sorted(res['arms'])}"
        r = res["arms"][arm]
        for f in FIELDS:
            assert isinstance(r[f], (int, float)) and math.isfinite(r[f]), f"{arm}.{f} = {r.get(f)!r}"
        assert r["params"] > 0 and r["seconds"] >= 0
    # the students share one size, about a quarter of the teacher's
    ratio = res["arms"]["sft_gold"]["params"] / res["arms"]["teacher"]["params"]
    assert 0.15 < ratio < 0.35, ratio
    assert len({res["arms"][a]["params"] for a in ARMS[1:]}) == 1
    md = (out / "results.md").read_text()
    for arm in ARMS:
        assert f"| {arm} |" in md
    assert (out / "results.png").stat().st_size > 0
    boot = res["bootstrap"]
    assert set(boot["se"]) == set(res["arms"]) and all(v >= 0 for v in boot["se"].values())
    for pair in ("full - sft_gold", "full - sft_text", "full_topk16 - full", "full_onpolicy - full"):
        assert boot["pairs"][pair]["lo"] <= boot["pairs"][pair]["hi"], boot["pairs"][pair]
    assert "95% interval" in md

    # --report rebuilds the bootstrap and the table from the saved predictions, training nothing: with one
    # arm's predictions changed, the other arms get the same figures (the same draws) and the timings stay
    pred = out / "eval" / "full" / "predictions" / "sc-sst2.seed42.jsonl"
    pred.write_text("".join(json.dumps({"index": i, "prediction": "positive"}) + "\n" for i in range(4)))
    proc = launcher.run("study.py", "--report", "--out", str(out), timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    again = json.loads((out / "results.json").read_text())
    assert again["seconds"] == res["seconds"] and "[trainer]" not in proc.stdout + proc.stderr
    assert again["bootstrap"]["se"]["sft_gold"] == boot["se"]["sft_gold"]  # same draws for the others

    # A rerun into the same folder reuses the teacher only if it was made with the same settings; else it
    # stops with one line naming the file and the setting, and the trained teacher stays.
    done = out / "assets" / "DONE.json"
    info = json.loads(done.read_text())
    info["made_with"]["teacher_steps"] += 1
    done.write_text(json.dumps(info))
    proc = launcher.run("study.py", "--quick", "--seed", "3", "--out", str(out), timeout=300)
    launcher.assert_user_error(proc, "DONE.json", "made_with", "teacher_steps")
    assert (Path(info["teacher"]) / "model.safetensors").is_file()


def test_align_labels_matches_the_gold_shares_and_keeps_confident_labels(launcher):
    import torch

    align = launcher.load("study.py").align_labels
    g = torch.Generator().manual_seed(0)
    # A teacher that favours class 0: +1.5 on its score for every text; the true class gets +2.
    truth = torch.arange(300) % 3
    scores = torch.randn(300, 3, generator=g) + 2.0 * torch.nn.functional.one_hot(truth, 3)
    scores[:, 0] += 1.5
    before = scores.argmax(-1)
    assert (before == 0).sum() > 150  # skewed: half, not a third
    got = torch.tensor(align(scores.tolist(), [10, 10, 10]))
    counts = torch.bincount(got, minlength=3)
    assert counts.tolist() == [100, 100, 100]  # the gold share's 1:1:1
    assert (got == truth).float().mean() > (before == truth).float().mean()  # the skew was the error
    # a text the teacher is sure of keeps its label
    sure = scores.softmax(-1).max(-1).values > 0.97
    assert sure.sum() > 10 and (got[sure] == before[sure]).all()
    # other target shares are followed too: 22:10 true classes (gold 21 and 9 of 30, add-one smoothed
    # 22:10), a teacher skewed to the minority class
    truth = (torch.arange(320) % 32 >= 22).long()
    scores = torch.randn(320, 2, generator=g) + 2.0 * torch.nn.functional.one_hot(truth, 2)
    scores[:, 1] += 1.5
    assert (scores.argmax(-1) == 1).sum() > 150
    two = torch.tensor(align(scores.tolist(), [21, 9]))
    assert torch.bincount(two).tolist() == [220, 100]
    assert (two == truth).float().mean() > 0.8
    # uneven quotas round by largest remainders and every text gets one label
    three = align(torch.randn(10, 3, generator=g).tolist(), [0, 0, 1])  # pi = 1:1:2 -> 2.5, 2.5, 5
    assert sorted(torch.bincount(torch.tensor(three), minlength=3).tolist()) == [2, 3, 5]


def test_arms_are_checked_and_kept_in_the_studys_order(launcher):
    from distill.errors import UserError

    study = launcher.load("study.py")
    assert study.parse_arms("full_onpolicy, teacher,full") == ("teacher", "full", "full_onpolicy")
    assert study.parse_arms(",".join(study.ARMS)) == study.ARMS
    for bad, needle in (("teacher,fulll", "unknown arm(s) fulll"), (" , ", "no arm named")):
        with pytest.raises(UserError, match="--arms") as e:
            study.parse_arms(bad)
        assert needle in str(e.value) and "full_onpolicy" in str(e.value)  # it lists the choices


def _arm(basic, multi, seconds=10.0, **extra):
    return {"basic": basic, "multifaceted": multi, "fine_grained": 1.0, "average": (basic + multi + 1) / 3,
            "params": 100, "seconds": seconds, **extra}


def test_report_covers_only_the_arms_run(launcher, tmp_path):
    """A subset of arms (--arms teacher,full,full_onpolicy) gets its table, plot and the findings whose
    arms it has; the on-policy line carries the difference, the timings and the generation share."""
    study = launcher.load("study.py")
    res = {"mode": "quick", "seed": 0, "chance": {"basic": 40.0, "multifaceted": 30.0},
           "arms": {"teacher": _arm(60, 50), "full": _arm(50, 40, 100.0),
                    "full_onpolicy": _arm(52, 41, 150.0, stages={"knowdist": 90.0, "icldist": 60.0},
                                          gen={"gen_time_s": 40.0, "gen_tokens": 5000})},
           "bootstrap": {"n_boot": 10, "se": {"teacher": 1.0, "full": 1.0, "full_onpolicy": 1.0},
                         "pairs": {"full_onpolicy - full": {"lo": -1.0, "hi": 4.0, "p_le_0": 0.2}}}}
    lines = study.findings(res)
    text = "\n".join(lines)
    assert "teacher vs chance" in text and "sft_gold" not in text and "topk16" not in text
    assert "full_onpolicy - full = +1.50 (basic+multi mean), at 150 s of training vs 100 s" in text
    assert "generation 40 s of its KnowDist stage's 90 s" in text
    assert "full_onpolicy - full = +1.50, 95% interval [-1.00, +4.00]" in text
    table = study.table(res)
    assert [r.split(" | ")[0] for r in table.splitlines()[2:]] == ["| teacher", "| full", "| full_onpolicy"]
    assert study.plot(res, tmp_path / "r.png").stat().st_size > 0
    # no teacher, no bootstrap, no generation logged: the lines that need them are left out
    del res["arms"]["teacher"], res["bootstrap"], res["arms"]["full_onpolicy"]["gen"]
    text = "\n".join(study.findings(res))
    assert "chance" not in text and "generation" not in text and "full_onpolicy - full = +1.50" in text


def test_bootstrap_of_a_subset_pairs_full_onpolicy_with_full(launcher, tmp_path):
    """resample() over two arms' saved predictions: their pair only, and a real difference shows (one arm
    answers the gold label, the other a word outside every label set)."""
    from distill.data.sentibench import CATEGORIES, load_task
    from distill.eval.sentibench import predictions_file

    study = launcher.load("study.py")
    s = {"eval_limit": 3, "eval_seeds": (42,)}
    for arm in ("full", "full_onpolicy"):
        for task in CATEGORIES["basic"] + CATEGORIES["multifaceted"]:
            recs = load_task(task, "test")[: s["eval_limit"]]
            path = predictions_file(tmp_path / "eval" / arm / "predictions", task, 42)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({"index": i, "prediction": r.label.lower() if arm == "full_onpolicy"
                                                else "zzz"}) + "\n" for i, r in enumerate(recs)))
    boot = study.resample(tmp_path, s, ("full", "full_onpolicy"), n_boot=20)
    assert set(boot["se"]) == {"full", "full_onpolicy"}
    assert list(boot["pairs"]) == ["full_onpolicy - full"]
    assert boot["pairs"]["full_onpolicy - full"]["lo"] > 0


def test_gen_sums_adds_up_every_steps_generation_fields(launcher):
    study = launcher.load("study.py")
    assert study.gen_sums([{"step": 1, "loss": 2.0}]) == {}  # nothing generated: no "gen" entry
    steps = [{"step": 1, "loss": 2.0, "gen_time_s": 1.5, "gen_tokens": 10, "gen_mean_len": 5.0},
             {"step": 2, "gen_time_s": 2.0, "gen_tokens": 12, "gen_mean_len": 6.0, "gen_flag": True}]
    assert study.gen_sums(steps) == {"gen_time_s": 3.5, "gen_tokens": 22}


def test_assets_record_which_sentibench_made_them(launcher, tmp_path):
    """A teacher built on the packaged sample is not reused by a run on the full data (or the reverse):
    DONE.json's made_with names the data source, and a mismatch stops in one line naming it."""
    from distill.data.sentibench import data_provenance
    from distill.errors import UserError

    study = launcher.load("study.py")
    made = study.teacher_made_with(study.SETTINGS["quick"], "quick", 0)
    assert made["sentibench"] == data_provenance()["source"] and made["teacher_steps"] == 30
    done = tmp_path / "DONE.json"
    other = "sample" if made["sentibench"] == "full" else "full"
    done.write_text(json.dumps({"made_with": {**made, "sentibench": other}}))
    with pytest.raises(UserError, match=r"DONE.json: field made_with differs .* \['sentibench'\]"):
        study._reuse(done, made)
    assert study._reuse(done.parent / "DONE.json", {**made, "sentibench": other})["made_with"]["sentibench"] == other


def test_an_export_outside_the_run_folder_is_recorded_whole(launcher, tmp_path):
    """A teacher reused from another folder's assets (DONE.json points there) does not stop the run
    after every arm was trained and scored."""
    study = launcher.load("study.py")
    out = tmp_path / "run"
    assert study.export_path(out / "runs" / "full" / "export", out) == "runs/full/export"
    assert study.export_path(tmp_path / "other" / "export", out) == str(tmp_path / "other" / "export")
