"""`sbatch slurm/icldist.sh` for real on the local cluster: the built-in tiny default end to end, and
a job that fails after Ray is up still takes its Ray down.

Every Ray node binds a 127.x address (RAY_NODE_IP_*), gloo uses lo, so nothing leaves loopback.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "icldist.sh"


def _need_launcher():
    if not (REPO / "launchers" / "icldist.py").exists() or importlib.util.find_spec("distill.icldist.stage") is None:
        pytest.skip("ICLDist launcher not ready: launchers/icldist.py or distill.icldist.stage is missing")


def _job_env(cluster, tmp: Path, **extra: str) -> dict[str, str]:
    ray_port, master_port = cluster.free_ports(2)
    env = {
        **cluster.env,
        "PYTHON": sys.executable,
        "OUT_DIR": str(tmp / "out"),
        # Short and unique: Ray's socket paths live under it, and the leftover check greps for it.
        "RAY_TEMP_DIR": f"/tmp/rs{os.getpid()}{tmp.name[-6:]}",
        "RAY_NODE_IPS": "127.0.0.2 127.0.0.3",
        "RAY_PORT": str(ray_port),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(master_port),
        "GLOO_SOCKET_IFNAME": "lo",
        "STOP_TIMEOUT": "10",
    }
    env.update(extra)
    return env


def _processes_mentioning(needle: str) -> list[str]:
    """Command lines of live processes that contain ``needle`` (Ray puts its temp dir in every argv)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            found.append(f"{pid}: {cmd[:200]}")
    return found


def _read(p: Path) -> str:
    return p.read_text(errors="replace") if p.exists() else f"<{p} missing>"


@pytest.mark.slow
def test_icldist_builtin_default_end_to_end(slurm_cluster, tmp_path):
    _need_launcher()
    # The built-in default with fewer steps and a 2-task report (a classification and a generation
    # task): what this test shows is the script's Ray + teacher service + DeepSpeed + report path.
    env = _job_env(slurm_cluster, tmp_path,
                   EXTRA_ARGS="--train.steps=6 --report.tasks=sc/sst2,absa/atsa_rest16 --report.limit=4")
    log = tmp_path / "job.out"
    job, rc = slurm_cluster.sbatch_wait("-N1", "-o", str(log), str(SCRIPT), env=env, timeout=900)
    text = _read(log)
    print(text)  # shown with -rP
    assert rc == 0, f"job {job} exited {rc}\n{text[-6000:]}"
    assert "Ray head started" in text, text[-4000:]
    assert "teacher targets: online" in text, text[-4000:]  # the launcher's line once the service answers
    assert "step " in text, text[-4000:]
    assert "report ->" in text, text[-4000:]
    assert "Ray stopped" in text, text[-4000:]
    export = Path(env["OUT_DIR"]) / "export"
    assert (export / "results.json").exists(), sorted(p.name for p in export.iterdir()) if export.exists() else text[-4000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.num_parameters() > 0
    assert _processes_mentioning(env["RAY_TEMP_DIR"]) == []


def test_icldist_failure_midway_tears_ray_down(slurm_cluster, tmp_path):
    """The launcher rejects an unknown key after Ray is up: the job fails, and no Ray process of it is left."""
    _need_launcher()
    env = _job_env(slurm_cluster, tmp_path, RAY_START_TIMEOUT="240")
    log = tmp_path / "job.out"
    # One node keeps it short; test_harvest_two_node_ray covers stopping workers on other nodes.
    job, rc = slurm_cluster.sbatch_wait("-N1", "-o", str(log), str(SCRIPT), "--no_such_section.key=1",
                                        env=env, timeout=600)
    text = _read(log)
    print(text)
    assert rc != 0, text[-4000:]
    assert "Ray head started" in text, text[-4000:]
    assert "student ranks failed" in text, text[-4000:]
    assert "Ray stopped" in text, text[-4000:]
    assert _processes_mentioning(env["RAY_TEMP_DIR"]) == []


def test_icldist_scancel_tears_ray_down(slurm_cluster, tmp_path):
    """scancel while the students run: the batch shell's TERM trap stops the students and the Ray nodes."""
    import subprocess
    import time

    _need_launcher()
    env = _job_env(slurm_cluster, tmp_path)
    log = tmp_path / "job.out"
    p = subprocess.run(["sbatch", "--parsable", "-N1", "-o", str(log), str(SCRIPT)], env=env,
                       capture_output=True, text=True, check=True, cwd=REPO)
    job = p.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 300
    while "launching 1 student rank(s)" not in _read(log):
        assert time.monotonic() < deadline, _read(log)[-4000:]
        assert slurm_cluster.job_state(int(job)).get("JobState", "GONE") in ("PENDING", "RUNNING"), _read(log)
        time.sleep(1)
    time.sleep(5)  # let the student start, so the TERM lands on running ranks
    slurm_cluster.run("scancel", job)
    while slurm_cluster.job_state(int(job)).get("JobState") in ("PENDING", "RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline + 120, _read(log)[-4000:]
        time.sleep(1)
    text = _read(log)
    print(text)
    assert "SIGTERM" in text, text[-4000:]
    assert "Ray stopped" in text, text[-4000:]
    assert _processes_mentioning(env["RAY_TEMP_DIR"]) == []
