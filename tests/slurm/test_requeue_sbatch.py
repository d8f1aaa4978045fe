"""The signal path of slurm/knowdist.sh for real on the local cluster: SIGUSR1 to the batch shell
(`scancel --signal=USR1 -b`, what `#SBATCH --signal=B:USR1@N` sends before the time limit) makes the
ranks checkpoint and exit 75; with REQUEUE=0 the job exits 75, and resubmitting the same command
resumes from that checkpoint (the default) and finishes with no step lost or repeated."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BUILTIN = REPO / "runs" / "knowdist" / "builtin"
STEPS = 40


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip() and '"loss"' in x]


def test_usr1_checkpoints_exits_75_and_resubmission_resumes(slurm_cluster, tmp_path):
    if not (REPO / "launchers" / "knowdist.py").exists():
        pytest.skip("launchers/knowdist.py is missing")
    (master_port,) = slurm_cluster.free_ports(1)
    out = tmp_path / "run"
    env = {**slurm_cluster.env, "PYTHON": sys.executable, "OUT_DIR": str(out), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(master_port), "GLOO_SOCKET_IFNAME": "lo", "STOP_TIMEOUT": "10", "REQUEUE": "0",
           "EXTRA_ARGS": f"--model.builtin_dir={BUILTIN} --log.progress_bar=false --eval.at_end=false"}
    args = [str(REPO / "slurm" / "knowdist.sh"), f"--train.steps={STEPS}", "--train.warmup_steps=1"]
    log = tmp_path / "job1.out"
    p = subprocess.Popen(["sbatch", "--wait", "--parsable", "-N1", "-o", str(log), *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = p.stdout.readline().strip().split(";")[0]
    deadline = time.time() + 600
    while len(_steps(out)) < 2:
        assert p.poll() is None, log.read_text(errors="replace")[-4000:]
        assert time.time() < deadline, "no training step within 600 s"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "-b", job], env=env, check=True)
    p.wait(timeout=300)
    text = log.read_text(errors="replace")
    assert p.returncode == 75, text[-5000:]
    assert "SIGUSR1 (time limit near or preemption)" in text and "not requeued (REQUEUE=0" in text, text[-4000:]
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and (ckpts[0] / "trainer_state.json").is_file(), text[-4000:]
    stop = int(ckpts[0].name.split("_")[1])
    assert 2 <= stop < STEPS and max(_steps(out)) == stop

    log2 = tmp_path / "job2.out"
    job2, rc = slurm_cluster.sbatch_wait("-N1", "-o", str(log2), *args, env=env, timeout=900)
    text2 = log2.read_text(errors="replace")
    assert rc == 0, text2[-5000:]
    assert "--checkpoint.resume=latest" in text2
    assert _steps(out) == list(range(1, STEPS + 1)), text2[-3000:]


REQUEUE_SCRIPT = """#!/usr/bin/env bash
#SBATCH --requeue
#SBATCH --open-mode=append
SD_NAME=requeue-test
source "{repo}/slurm/lib/common.sh"
sd_install_traps
echo "run ${{SLURM_RESTART_COUNT:-0}}"
sd_resume_args
echo "resume args: ${{SD_RESUME_ARGS[*]}}"
[ "${{SLURM_RESTART_COUNT:-0}}" != 0 ] || sd_requeue_if_stopped 75
echo "finished"
"""


def test_exit_75_requeues_the_job_which_then_resumes(slurm_cluster, tmp_path):
    """sd_requeue_if_stopped: `scontrol requeue` from inside the job; the rerun (same job id, log
    appended) sees SLURM_RESTART_COUNT=1 and resumes, even with FRESH=1."""
    script = tmp_path / "requeue.sh"
    script.write_text(REQUEUE_SCRIPT.format(repo=REPO))
    log = tmp_path / "job.out"
    env = {**slurm_cluster.env, "FRESH": "1"}
    t0 = time.time()
    p = subprocess.Popen(["sbatch", "--wait", "--parsable", "-N1", "-o", str(log), str(script)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = int(p.stdout.readline().strip().split(";")[0])
    # slurmctld holds a requeued batch job for about two minutes (its begin time is set ahead, pending
    # reason BeginTime) before it may start again. Only the start time is moved to now once the job is
    # back in the queue: the requeue itself and the rerun are Slurm's own.
    released = False
    while p.poll() is None and time.time() - t0 < 400:
        st = slurm_cluster.job_state(job)
        if not released and st.get("JobState") == "PENDING" and int(st.get("Restarts", "0")) >= 1:
            slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
            released = True
        time.sleep(0.5)
    p.wait(timeout=30)
    rc = p.returncode
    text = log.read_text(errors="replace")
    assert released, text
    assert rc == 0, text
    assert "run 0" in text and "resume args: --checkpoint.overwrite=true" in text, text
    assert "requeued job" in text and "run 1" in text and "resume args: --checkpoint.resume=latest" in text, text
    assert text.rstrip().endswith("exit 0") and "finished" in text, text
    print(f"requeue round trip {time.time() - t0:.0f}s")
