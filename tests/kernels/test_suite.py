"""The GPU suite's plan and its refusal on a CPU-only machine (no stage is run here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from distill_kernels.bench import suite as S


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "distill_kernels.bench.suite", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=str(S.REPO))


def test_dry_run_lists_the_stages_within_the_budget():
    p = _run("--budget", "480", "--dry-run")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    names = [s["stage"] for s in doc["stages"]]
    assert names == [s.name for s in S.default_stages()]
    assert names[0] == "gpu_tests" and names.index("kd_div") < names.index("bench_step_icldist")
    fitting = [s for s in doc["stages"] if s["fits"]]
    assert fitting and sum(s["cap_s"] for s in fitting) <= 480
    for s in doc["stages"]:  # every stage is in the table with its cap
        assert any(line.startswith(s["stage"]) and f"{s['cap_s']:.0f}" in line for line in p.stdout.splitlines())


def test_plan_drops_what_does_not_fit_and_keeps_later_stages_that_do():
    stages = [S.Stage("a", ["x"], 100, "kernel"), S.Stage("big", ["x"], 300, "step"), S.Stage("c", ["x"], 50, "kernel")]
    got = [(s.name, fits) for s, fits in S.plan(stages, 200)]
    assert got == [("a", True), ("big", False), ("c", True)]
    assert [fits for _, fits in S.plan(stages, 450)] == [True, True, True]
    assert [fits for _, fits in S.plan(stages, 40)] == [False, False, False]
    assert [fits for _, fits in S.plan(stages, 200, used=120)] == [False, False, True]


def test_caps_and_stage_selection_from_the_command_line():
    tests_cap = next(s.cap_s for s in S.default_stages() if s.name == "gpu_tests")
    budget = 30 + tests_cap - 1  # kd_div at its new cap fits, then the tests no longer do
    p = _run("--budget", str(budget), "--dry-run", "--stages", "kd_div", "gpu_tests", "--cap", "kd_div=30")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    assert [(s["stage"], s["cap_s"], s["fits"]) for s in doc["stages"]] == [("kd_div", 30, True),
                                                                            ("gpu_tests", tests_cap, False)]
    bad = _run("--dry-run", "--stages", "nope")
    assert bad.returncode != 0 and "unknown stage" in bad.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only refusal")
def test_without_cuda_one_line_and_exit_2():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    t0 = time.perf_counter()
    p = _run("--budget", "480", env=env)
    assert p.returncode == S.NO_CUDA_EXIT == 2
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA" in lines[0]
    assert time.perf_counter() - t0 < 60


def test_headlines_from_stage_json():
    kern = {"rows": [{"provider": "triton", "mode": "fwd+bwd", "speedup_vs_torch": 3.0, "pct_peak_bw": 70.0},
                     {"provider": "triton", "mode": "fwd+bwd", "speedup_vs_torch": 4.5, "pct_peak_bw": 81.0},
                     {"provider": "torch", "mode": "fwd+bwd"}]}
    h = S.headline(S.Stage("k", [], 1, "kernel"), kern, [])
    assert "3.00-4.50" in h and "70-81" in h
    step = {"ratios": [{"batch": "icldist", "what": "lean/peer", "time": 0.05, "mem_extra": 0.1}],
            "rows": [{"path": "lean", "tok_s": 1234.0, "mfu": 0.31}]}
    h = S.headline(S.Stage("s", [], 1, "step"), step, [])
    assert "lean/peer time 0.050" in h and "MFU 31.0%" in h
    assert S.headline(S.Stage("t", [], 1, "pytest"), None, ["...", "90 passed in 41.0s"]) == "90 passed in 41.0s"


def test_run_stage_keeps_the_json_and_kills_a_stage_at_its_cap(tmp_path):
    ok = S.run_stage(S.Stage("echo", ["{py}", "-c", "print('table'); print('{\"rows\": []}')"], 30, "kernel"),
                     tmp_path, 30)
    assert ok["status"] == "ok" and ok["json"] == {"rows": []}
    assert json.loads((tmp_path / "echo.json").read_text()) == {"rows": []}
    assert "table" in (tmp_path / "echo.log").read_text()
    # At the cap the stage's whole process group goes, its own children included (bench_step's workers).
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    t0 = time.perf_counter()
    late = S.run_stage(S.Stage("sleepy", ["{py}", "-c", code], 3, "kernel"), tmp_path, 3)
    assert late["status"].startswith("timeout") and late["json"] is None
    assert time.perf_counter() - t0 < 20
    child = int(pid_file.read_text())
    def alive(pid):  # a zombie (killed, not yet reaped by whoever adopted it) is not alive
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    for _ in range(50):
        if not alive(child):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the stage's child {child} survived the cap")
    S.print_table([ok, late])
