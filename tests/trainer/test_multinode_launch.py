"""Multi-node launchers on one host: two emulated nodes x 1 rank, ZeRO-3 on CPU (gloo, loopback).

``launchers/knowdist.py`` (the user's entry point) trains the tiny assets for 3 steps under each
launcher, started once per emulated node, concurrently, as on two real machines:

- ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank N --rdzv-backend c10d --rdzv-endpoint
  127.0.0.1:PORT --rdzv-id ID``. With c10d, ``--node-rank`` is ignored (torchrun warns so): the
  rendezvous hands out the ranks, so either process may be rank 0; both agents find the endpoint on
  their own host, and the one that fails to bind the store joins as a client (torch's own fallback).
- ``deepspeed --hostfile H --no_ssh --node_rank N --master_addr 127.0.0.1 --master_port PORT``, where
  the hostfile names two made-up hosts with ``slots=1``. With ``--no_ssh`` the names are never
  resolved or contacted: they only label the world info the launcher passes to each node. Without a
  hostfile the launcher refuses more than one node.

Both must give the loss trajectory (metrics.jsonl ``loss`` / ``ce`` / ``kd``) of the single-node
2-rank run (``run_child(world=2)``, same config, seed and global batch) within rel 1e-6. The third
common way, ``srun`` inside ``sbatch -N 2 slurm/knowdist.sh``, runs in
tests/slurm/test_knowdist_harvest_sbatch.py on a local 2-node SLURM cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, read_metrics, run_child, tiny_cfg_dict

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 3
LAUNCH_TIMEOUT_S = 180  # one launcher pair; about 20-60 s on a loaded 2-core machine
KNOWDIST = str(REPO / "launchers" / "knowdist.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(name: str, module: str) -> list[str]:
    """The console script when on PATH, else ``python -m module`` (same code)."""
    return [name] if shutil.which(name) else [sys.executable, "-m", module]


def _node_env() -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # the launchers set these; a value from the calling shell would shadow them
    return env


def _run_nodes(cmds: list[list[str]], logdir: Path, timeout: float = LAUNCH_TIMEOUT_S) -> list[str]:
    """Start one launcher per emulated node at once; their outputs. A hang or a failure kills both
    process groups (the launchers and the ranks they spawned) and fails with every log's tail."""
    logs = [logdir / f"node{n}.log" for n in range(len(cmds))]
    procs = []
    for cmd, log in zip(cmds, logs):
        with open(log, "w") as fh:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=_node_env(), stdout=fh, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    deadline = time.monotonic() + timeout
    failed = None
    while failed is None:
        codes = [p.poll() for p in procs]  # every one polled: a node that failed ends the wait at once
        failed = next((f"node {n} exited {c}" for n, c in enumerate(codes) if c), None)
        if failed is None and None not in codes:
            break
        if failed is None and time.monotonic() > deadline:
            failed = f"timed out after {timeout:.0f} s"
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    outs = [log.read_text(errors="replace") for log in logs]
    if failed:
        tails = "\n".join(f"--- node {n}: {' '.join(c)}\n{o[-3000:]}" for n, (c, o) in enumerate(zip(cmds, outs)))
        raise AssertionError(f"{failed}\n{tails}")
    return outs


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory):
    """The config (as a YAML file for the launcher) and the metrics of the single-node 2-rank run."""
    pytest.importorskip("deepspeed")
    from distill.config import RunConfig, dump_yaml, from_dict

    tmp = tmp_path_factory.mktemp("multinode_ref")
    ds_json = tmp / "zero3_test.json"
    ds_json.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 1000,
        "reduce_bucket_size": 1000}}))
    cfg = tiny_cfg_dict(tiny_assets, tmp / "ref", train={"steps": STEPS, "warmup_steps": 1, "grad_clip": 1.0,
                                                         "micro_batch": 4, "grad_accum": 1},
                        checkpoint={"every": 0, "export": False})
    cfg["deepspeed"] = {"engine": "deepspeed", "config": str(ds_json)}
    cfg["teacher"] = {"placement": "partitioned"}
    out = run_child({"cfg": cfg}, tmp, world=2, timeout=300)
    assert "zero_stage=3 world=2" in out[0]
    # Every field written out: the launcher's own defaults (KnowDistConfig) differ from RunConfig's.
    yaml_path = tmp / "run.yaml"
    dump_yaml(from_dict(RunConfig, cfg), yaml_path)
    ref = read_metrics(tmp / "ref")
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    return yaml_path, ref


def _assert_same_losses(out_dir: Path, ref: list[dict], outs: list[str]) -> None:
    # exactly one process (rank 0) prints the trainer's line, and it saw both nodes' ranks
    assert sum("zero_stage=3 world=2" in o for o in outs) == 1, [o[-2000:] for o in outs]
    got = read_metrics(out_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for key in ("loss", "ce", "kd"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in ref], rel=1e-6), key


def test_torchrun_two_nodes_c10d(reference, tmp_path):
    yaml_path, ref = reference
    port, out_dir = _free_port(), tmp_path / "run"
    cmds = [_cli("torchrun", "torch.distributed.run")
            + ["--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(n), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"kd-{port}",
               KNOWDIST, "--config", str(yaml_path), f"--run.out_dir={out_dir}"] for n in (0, 1)]
    outs = _run_nodes(cmds, tmp_path)
    _assert_same_losses(out_dir, ref, outs)


def test_deepspeed_two_nodes_hostfile_no_ssh(reference, tmp_path):
    yaml_path, ref = reference
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # made-up names: never resolved with --no_ssh
    port, out_dir = _free_port(), tmp_path / "run"
    cmds = [_cli("deepspeed", "deepspeed.launcher.runner")
            + ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n), "--master_addr", "127.0.0.1",
               "--master_port", str(port), KNOWDIST, "--config", str(yaml_path), f"--run.out_dir={out_dir}"]
            for n in (0, 1)]
    outs = _run_nodes(cmds, tmp_path)
    assert "zero_stage=3 world=2" in outs[0]  # --node_rank is honoured: node 0 holds rank 0
    _assert_same_losses(out_dir, ref, outs)
