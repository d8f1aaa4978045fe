"""The GPU bookkeeping of the sbatch scripts, without a cluster: the teacher/student split of
slurm/lib/common.sh for GPU allocations this machine cannot have, and slurm/lib/step.sh's
per-step CUDA_VISIBLE_DEVICES and rank variables.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _split(nnodes: int, gpus: int, **env: str) -> dict[str, str]:
    nodes = " ".join(f"g{i}" for i in range(nnodes))
    script = (
        f'source "{REPO}/slurm/lib/common.sh"; set -euo pipefail; NODES=({nodes}); NNODES={nnodes}; '
        f"GPUS_PER_NODE={gpus}; sd_split_gpus >/dev/null; "
        'echo "TN=$TEACHER_NODES TPN=$TEACHER_GPUS_PER_NODE SPN=$STUDENT_GPUS_PER_NODE '
        'TASKS=$STUDENT_TASKS_PER_NODE WORLD=$STUDENT_WORLD_SIZE SNODES=$(IFS=,; echo "${STUDENT_NODES[*]}") '
        'RAY0=$(sd_teacher_gpus_of_node 0) RAYLAST=$(sd_teacher_gpus_of_node $((NNODES - 1)))"'
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TEACHER_", "STUDENT_"))}
    p = subprocess.run(["bash", "-c", script], env={**clean, **env}, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": p.stderr.strip()}
    return dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv)


def test_whole_teacher_node_on_four_nodes():
    r = _split(4, 8, TEACHER_GPUS="8")
    assert (r["TN"], r["TPN"], r["SPN"], r["WORLD"], r["RAY0"], r["RAYLAST"]) == ("1", "0", "8", "24", "8", "0")
    assert r["SNODES"] == "g1,g2,g3"


def test_per_node_share_and_defaults():
    r = _split(2, 8, TEACHER_GPUS="4")
    assert (r["TN"], r["TPN"], r["SPN"], r["WORLD"], r["RAY0"], r["RAYLAST"]) == ("0", "2", "6", "12", "2", "2")
    assert r["SNODES"] == "g0,g1"
    assert _split(1, 8)["TPN"] == "4"  # one node: half and half
    assert _split(3, 4)["TN"] == "1"  # several nodes: the first one serves the teacher
    cpu = _split(2, 0)
    assert (cpu["TN"], cpu["TPN"], cpu["TASKS"], cpu["WORLD"]) == ("0", "0", "1", "2")


def test_impossible_splits_are_refused_with_the_numbers():
    assert "cannot be split evenly over 2 node(s) x 8 GPU(s)" in _split(2, 8, TEACHER_GPUS="3")["error"]
    assert "nothing left for the student" in _split(2, 8, TEACHER_GPUS="16")["error"]
    assert "leaves no GPU for the student" in _split(1, 8, TEACHER_GPUS_PER_NODE="8")["error"]


def _step(args: list[str], **env: str) -> dict[str, str]:
    base = {"PATH": os.environ["PATH"], "SLURM_PROCID": "3", "SLURM_NTASKS": "12", "SLURM_LOCALID": "1",
            "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "6(x2)"}
    p = subprocess.run(["bash", str(REPO / "slurm/lib/step.sh"), *args, "--", "env"], env={**base, **env},
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)


def test_step_selects_gpus_of_the_step_and_maps_ranks():
    e = _step(["--gpus", "2:6", "--rank-env"], CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7", RANK_OFFSET="0")
    assert e["CUDA_VISIBLE_DEVICES"] == "2,3,4,5,6,7"
    assert (e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"], e["NODE_RANK"]) == ("3", "12", "1", "6", "1")
    # cgroups may hand a step physical ids: the step keeps its own list, in order
    assert _step(["--gpus", "0:2"], CUDA_VISIBLE_DEVICES="4,5,6,7")["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert _step(["--gpus", "0:0"], CUDA_VISIBLE_DEVICES="0,1")["CUDA_VISIBLE_DEVICES"] == ""
    assert _step(["--gpus", "1:2"], GPUS_PER_NODE="4")["CUDA_VISIBLE_DEVICES"] == "1,2"


def test_step_sets_the_ray_address_of_its_node():
    m = "n1=127.0.0.2,n2=127.0.0.3"
    assert _step([], SD_RAY_IP_MAP=m, SLURMD_NODENAME="n2")["RAY_NODE_IP"] == "127.0.0.3"
    assert "RAY_NODE_IP" not in _step([], SD_RAY_IP_MAP=m, SLURMD_NODENAME="n9")


def test_step_refuses_more_gpus_than_it_sees():
    p = subprocess.run(["bash", str(REPO / "slurm/lib/step.sh"), "--gpus", "2:4", "--", "true"],
                       env={"PATH": os.environ["PATH"], "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, capture_output=True, text=True)
    assert p.returncode == 2 and "asked for GPUs 2..5 but this step sees 4" in p.stderr
