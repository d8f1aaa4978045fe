"""`sbatch slurm/knowdist.sh` (2 nodes x 1 CPU rank, 3 steps) and `sbatch slurm/harvest.sh` (a 2-node
Ray cluster on 127.x, a few texts) for real on the local cluster, on the built-in tiny models.

Both reuse the built-in teacher cache of the repo (runs/knowdist/builtin) like the launchers'
defaults do, so only the first run on a machine trains it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BUILTIN = REPO / "runs" / "knowdist" / "builtin"


def _read(p: Path) -> str:
    return p.read_text(errors="replace") if p.exists() else f"<{p} missing>"


def _processes_mentioning(needle: str) -> list[str]:
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


def test_knowdist_two_nodes_short_run(slurm_cluster, tmp_path):
    if not (REPO / "launchers" / "knowdist.py").exists():
        pytest.skip("launchers/knowdist.py is missing")
    (master_port,) = slurm_cluster.free_ports(1)
    out = tmp_path / "run"
    env = {**slurm_cluster.env, "PYTHON": sys.executable, "OUT_DIR": str(out), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(master_port), "GLOO_SOCKET_IFNAME": "lo", "STOP_TIMEOUT": "10",
           "EXTRA_ARGS": f"--model.builtin_dir={BUILTIN}"}
    log = tmp_path / "job.out"
    job, rc = slurm_cluster.sbatch_wait("-N2", "-o", str(log), str(REPO / "slurm" / "knowdist.sh"),
                                        "--train.steps=3", "--train.warmup_steps=1", env=env, timeout=900)
    text = _read(log)
    print(text)
    assert rc == 0, f"job {job} exited {rc}\n{text[-6000:]}"
    assert "launching 2 student rank(s) on [n1,n2]" in text, text[-4000:]
    assert "world=2" in text, text[-4000:]  # the trainer's line: one process group over both nodes
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert [r["step"] for r in steps if "loss" in r][-1] == 3, steps
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "export").num_parameters() > 0


def test_harvest_two_node_ray(slurm_cluster, tmp_path):
    if not (REPO / "launchers" / "harvest.py").exists():
        pytest.skip("launchers/harvest.py is missing")
    (ray_port,) = slurm_cluster.free_ports(1)
    out = tmp_path / "corpus"
    temp = f"/tmp/rh{os.getpid()}{tmp_path.name[-6:]}"
    env = {**slurm_cluster.env, "PYTHON": sys.executable, "OUT_DIR": str(out), "RAY_TEMP_DIR": temp,
           "RAY_NODE_IPS": "127.0.0.2,127.0.0.3", "RAY_PORT": str(ray_port), "STOP_TIMEOUT": "10",
           "EXTRA_ARGS": f"--teacher.workdir={BUILTIN} --input.limit=4 --output.progress=false"}
    log = tmp_path / "job.out"
    job, rc = slurm_cluster.sbatch_wait("-N2", "-o", str(log), str(REPO / "slurm" / "harvest.sh"),
                                        env=env, timeout=900)
    text = _read(log)
    print(text)
    assert rc == 0, f"job {job} exited {rc}\n{text[-6000:]}"
    assert "Ray cluster up: 2 node(s)" in text and "Ray stopped" in text, text[-4000:]
    assert (out / "manifest.json").exists(), sorted(p.name for p in out.iterdir()) if out.exists() else text[-4000:]
    assert _processes_mentioning(temp) == []
