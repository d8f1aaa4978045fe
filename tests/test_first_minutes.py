"""The first minutes of a run: no phase is silent in a redirected log (plain progress lines instead of
a tqdm bar), the built-in teacher's one-time training is announced, and DeepSpeed's per-process
"Setting accelerator to CPU" warning is filtered while its other messages still show."""

from __future__ import annotations

import logging

import pytest


def test_redirected_log_gets_progress_lines_not_a_bar(capsys, monkeypatch):
    import distill.progress as P

    bar = P.progress(4, "phase", unit="step")  # pytest captures stderr: not a terminal
    assert isinstance(bar, P.LineProgress)
    bar.every_s = 0.0  # every update prints
    for _ in range(4):
        bar.set_postfix(loss="1.000")
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("phase: 1/4 step (25%) | elapsed 0:00") and "loss=1.000" in lines[0]
    assert lines[3].startswith("phase: 4/4 step (100%)") and "\r" not in "".join(lines)
    quiet = P.LineProgress(10, "quiet", every_s=3600)
    quiet.update(3)
    assert capsys.readouterr().err == ""
    quiet.close()  # the end of a phase always prints
    assert capsys.readouterr().err.startswith("quiet: 3/10 it (30%)")


def test_builtin_teacher_training_is_announced_with_progress(tmp_path, capsys, monkeypatch):
    import distill.progress as P
    from distill.models.builtin import BuiltinRecipe, ensure_builtin_teacher

    real_init = P.LineProgress.__init__

    def every_update(self, *a, **k):
        real_init(self, *a, **k)
        self.every_s = 0.0

    monkeypatch.setattr(P.LineProgress, "__init__", every_update)
    recipe = BuiltinRecipe(vocab_size=300, teacher_size="student", per_task=2, steps=3, batch_size=2, warmup=1)
    ensure_builtin_teacher(tmp_path, recipe)
    out = capsys.readouterr()
    assert out.out.index("first run, training the built-in teacher once (3 steps; about") < out.out.index("teacher: trained in")
    assert [ln.split(" |")[0] for ln in out.err.splitlines() if ln.startswith("builtin teacher:")] == [
        "builtin teacher: 1/3 step (33%)", "builtin teacher: 2/3 step (67%)", "builtin teacher: 3/3 step (100%)"]
    ensure_builtin_teacher(tmp_path, recipe)
    assert "teacher: cached" in capsys.readouterr().out


def test_deepspeed_cpu_accelerator_warning_is_filtered_once(caplog):
    from distill.startup import quiet_third_party

    quiet_third_party()
    quiet_third_party()  # idempotent: one filter
    log = logging.getLogger("DeepSpeed")
    assert sum(type(f).__name__ == "_DropKnown" for f in log.filters) == 1
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    log.addHandler(handler)
    try:
        log.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        log.warning("something else DeepSpeed says")
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["something else DeepSpeed says"]


@pytest.mark.parametrize("preset", [None, "0"])
def test_hf_progress_bars_off_in_a_redirected_log_unless_set(monkeypatch, preset):
    from distill.startup import quiet_third_party

    if preset is None:
        monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", preset)
    quiet_third_party()
    import os

    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == (preset or "1")
