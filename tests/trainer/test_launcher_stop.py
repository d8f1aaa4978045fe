"""Stopping a run started by the ``deepspeed`` CLI, 2 CPU ranks (gloo, loopback; run under ``unshare -n``).

The CLI starts ``python -m deepspeed.launcher.launch``, which starts the ranks. On one node the CLI
forwards no signal (DeepSpeed 0.19.8), so SIGTERM to it used to end the CLI alone while both ranks
trained on to the end, orphaned. Now (distill.dist.stop):

- SIGTERM to the CLI process only: the ranks see their launcher gone, checkpoint after the current
  step and exit 75 (``launch.py`` reports a rank's 75, stops the other and exits).
- Ctrl-C (SIGINT to the whole process group: CLI, ``launch.py``, ranks): the ranks checkpoint and exit
  75 (``launch.py`` also passes SIGTERM to each rank) with no KeyboardInterrupt traceback from a rank;
  the CLI's own KeyboardInterrupt traceback is DeepSpeed's.

Either way the checkpoint is in the run folder and no process of the tree is left. The two cases
run at once, two process trees side by side, so that their serial start-ups (CLI, then launch.py,
then the ranks) overlap.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from distill.train.loop import REQUEUE_EXIT

from .conftest import REPO, read_metrics, tiny_cfg_dict
from .test_multinode_launch import _cli, _free_port, _node_env

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 8
START_TIMEOUT_S = 240  # two trees of two ranks starting through the CLI on a loaded 2-core machine
STOP_TIMEOUT_S = 60  # a step or two, one checkpoint, the launchers' exit
HOWS = ("sigterm_to_cli", "ctrl_c_to_group")


def _start(tiny_assets, tmp_path, how):
    folder = tmp_path / how
    folder.mkdir()
    out_dir = folder / "run"
    ds_json = folder / "zero1.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    sec = {"train": {"steps": STEPS, "warmup_steps": 2, "micro_batch": 2, "grad_accum": 1},
           "checkpoint": {"every": 0}, "deepspeed": {"engine": "deepspeed", "config": str(ds_json)}}
    spec = folder / "spec.json"  # its path is on the command line of every process of this tree
    spec.write_text(json.dumps({"cfg": tiny_cfg_dict(tiny_assets, out_dir, **sec), "sleep_per_step": 0.3}))
    cmd = _cli("deepspeed", "deepspeed.launcher.runner") + [
        "--num_gpus", "2", "--no_local_rank", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(REPO / "tests" / "trainer" / "_child.py"), str(spec)]
    log = folder / "launch.log"
    with open(log, "w") as fh:
        cli = subprocess.Popen(cmd, cwd=REPO, env=_node_env(), stdout=fh, stderr=subprocess.STDOUT,
                               start_new_session=True)  # its own process group, as a terminal's job
    return {"cli": cli, "out_dir": out_dir, "spec": str(spec), "log": log, "tree": []}


def _alive(procs) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_stop_through_deepspeed_cli_checkpoints_and_leaves_nothing(tiny_assets, tmp_path):
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("deepspeed")
    from distill.train.build import build_trainer

    runs = {how: _start(tiny_assets, tmp_path, how) for how in HOWS}
    try:
        deadline, waiting = time.monotonic() + START_TIMEOUT_S, set(HOWS)
        while waiting:
            for how in sorted(waiting):
                r = runs[how]
                assert r["cli"].poll() is None, f"{how}:\n{r['log'].read_text(errors='replace')[-4000:]}"
                if (r["out_dir"] / "metrics.jsonl").is_file() and read_metrics(r["out_dir"]):
                    r["tree"] = psutil.Process(r["cli"].pid).children(recursive=True)
                    assert len(r["tree"]) == 3, (how, r["tree"])  # launch.py and the two ranks
                    if how == "sigterm_to_cli":
                        r["cli"].send_signal(signal.SIGTERM)
                    else:
                        os.killpg(r["cli"].pid, signal.SIGINT)
                    waiting.discard(how)
            assert time.monotonic() < deadline, f"no step 1 within {START_TIMEOUT_S} s: {sorted(waiting)}"
            time.sleep(0.2)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for how, r in runs.items():
            r["cli"].wait(timeout=STOP_TIMEOUT_S)
            while _alive(r["tree"]):
                assert time.monotonic() < deadline, (f"{how}: still running after the stop: {_alive(r['tree'])}\n"
                                                     + r["log"].read_text(errors="replace")[-4000:])
                time.sleep(0.2)
    finally:
        for r in runs.values():  # a failed check leaves nothing running either
            if r["cli"].poll() is None:
                r["tree"].append(psutil.Process(r["cli"].pid))
            for p in _alive(r["tree"]):
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            r["cli"].wait()
    for how, r in runs.items():
        out = r["log"].read_text(errors="replace")
        left = [p.pid for p in psutil.process_iter(["cmdline"])
                if r["spec"] in " ".join(p.info["cmdline"] or []) and _alive([p])]
        assert not left, (how, left)
        ckpts = sorted((r["out_dir"] / "checkpoints").glob("step_*"))
        assert len(ckpts) == 1 and (ckpts[0] / "trainer_state.json").is_file(), (how, ckpts, out[-3000:])
        stop = int(ckpts[0].name.split("_")[1])
        assert 1 <= stop < STEPS and max(x["step"] for x in read_metrics(r["out_dir"])) == stop, (how, out[-3000:])
        final = [x for x in out.splitlines()
                 if f"checkpoint at step {stop}/{STEPS} saved; exiting with status {REQUEUE_EXIT}" in x]
        assert len(final) == 1, (how, out[-3000:])  # rank 0's line, naming why
        if how == "sigterm_to_cli":
            assert f"the deepspeed launcher (pid {r['cli'].pid}) is gone" in final[0], final
            assert f"exits with return code = {REQUEUE_EXIT}" in out, out[-3000:]  # launch.py, of a rank
        else:
            assert final[0].startswith("[trainer] SIGINT: "), final
            assert out.count("press Ctrl-C again to stop at once without one") == 1, out[-3000:]  # local rank 0
            # the only traceback is the CLI's own (DeepSpeed's runner interrupted in Popen.wait)
            assert out.count("Traceback") == 1 and "deepspeed/launcher/runner.py" in out.split("Traceback")[1], out
