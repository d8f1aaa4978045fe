"""Preemption: SIGUSR1 (SLURM ``--signal=B:USR1@N``, forwarded by slurm/*.sh), SIGTERM or SIGINT
(Ctrl-C) to a running run makes it checkpoint after the current optimizer step and exit with
``REQUEUE_EXIT``; a resumed run then continues from that step; a second SIGINT interrupts at
once. With 2 ranks a signal to one rank stops both at one step. Run the 2-rank case under ``unshare
-n`` (gloo on loopback). Through the ``deepspeed`` CLI: test_launcher_stop.py."""

from __future__ import annotations

import os
import signal
import time

import pytest

from distill.train.loop import REQUEUE_EXIT

from .conftest import read_metrics, run_child, tiny_cfg_dict

STEPS = 8


def _signal_when_running(procs, out_dir, sig, target, deadline_s=240):
    """Send ``sig`` to ``procs[target]`` once rank 0 has logged step 2; return every exit status."""
    deadline = time.time() + deadline_s
    metrics = out_dir / "metrics.jsonl"
    while not (metrics.is_file() and len(read_metrics(out_dir)) >= 2):
        assert all(p.poll() is None for p in procs), procs[0].stdout.read()[-3000:]
        assert time.time() < deadline, "no step 2 within the deadline"
        time.sleep(0.1)
    os.kill(procs[target].pid, sig)
    out = []
    for p in procs:
        p.wait(timeout=deadline_s)
        out.append(p.stdout.read())
        p.stdout.close()
    return [p.returncode for p in procs], out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_and_exits_for_requeue_then_resumes(tiny_assets, tmp_path, sig):
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    out_dir = tmp_path / "run"
    sec = {"train": {"steps": STEPS, "warmup_steps": 2}, "checkpoint": {"every": 0, "keep_last": 2}}
    procs = run_child({"cfg": tiny_cfg_dict(tiny_assets, out_dir, **sec), "sleep_per_step": 0.5}, tmp_path, wait=False)
    rcs, outs = _signal_when_running(procs, out_dir, sig, 0)
    assert rcs == [REQUEUE_EXIT], outs[0][-3000:]
    ckpts = sorted((out_dir / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and (ckpts[0] / "trainer_state.json").is_file(), ckpts
    stop = int(ckpts[0].name.split("_")[1])
    assert 2 <= stop < STEPS and max(r["step"] for r in read_metrics(out_dir)) == stop
    assert f"{signal.Signals(sig).name}: checkpoint at step {stop}/{STEPS} saved" in outs[0]
    resume = {"train": sec["train"], "checkpoint": {**sec["checkpoint"], "resume": "latest"}}
    res = build_trainer(from_dict(RunConfig, tiny_cfg_dict(tiny_assets, out_dir, **resume))).train()
    assert res["steps"] == STEPS
    assert [r["step"] for r in read_metrics(out_dir)] == list(range(1, STEPS + 1))  # no step lost or repeated


@pytest.mark.slow
@pytest.mark.dist
def test_signal_to_one_rank_stops_both_at_one_step(tiny_assets, tmp_path):
    pytest.importorskip("deepspeed")
    import json

    from distill.train.build import build_trainer

    out_dir = tmp_path / "run"
    ds_json = tmp_path / "zero1.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    sec = {"train": {"steps": STEPS, "warmup_steps": 2, "micro_batch": 2}, "checkpoint": {"every": 0},
           "deepspeed": {"engine": "deepspeed", "config": str(ds_json)}}
    procs = run_child({"cfg": tiny_cfg_dict(tiny_assets, out_dir, **sec), "sleep_per_step": 0.5}, tmp_path,
                      world=2, wait=False, env_extra={"GLOO_SOCKET_IFNAME": "lo"})
    rcs, outs = _signal_when_running(procs, out_dir, signal.SIGUSR1, 1)
    assert rcs == [REQUEUE_EXIT] * 2, outs[0][-2000:] + outs[1][-2000:]
    ckpts = sorted((out_dir / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and (ckpts[0] / "trainer_state.json").is_file(), ckpts
    assert "a stop request on another rank: checkpoint at step" in outs[0]
    # before step 1, rank 0 says what the rendezvous waits for (rank 1 says nothing of it)
    assert "[dist] starting the process group: 2 ranks, backend gloo, rendezvous at 127.0.0.1:" in outs[0]
    assert "[dist] starting the process group" not in outs[1]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT], ids=["SIGUSR1", "SIGINT"])
def test_signal_during_a_step_checkpoints_at_that_step(tiny_assets, tmp_path, capfd, sig):
    """A signal arriving in step 3's first micro-batch: the run checkpoints at step 3 and exits for requeue
    (the flag used to be read at the start of a step, so the run trained step 4 before stopping). SIGINT
    (Ctrl-C) does the same, saying that a second one stops at once (it used to raise KeyboardInterrupt)."""
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    out_dir = tmp_path / "run"
    sec = {"train": {"steps": STEPS, "warmup_steps": 2, "grad_accum": 2}, "checkpoint": {"every": 0, "keep_last": 2}}
    tr = build_trainer(from_dict(RunConfig, tiny_cfg_dict(tiny_assets, out_dir, **sec)))
    backward, calls = tr.engine.backward, []

    def signalling_backward(loss):
        calls.append(1)
        if len(calls) == 5:  # step 3, micro-batch 1 of 2
            os.kill(os.getpid(), sig)
        return backward(loss)

    tr.engine.backward = signalling_backward
    handler = signal.getsignal(sig)
    with pytest.raises(SystemExit) as e:
        try:
            tr.train()
        except KeyboardInterrupt:  # would end the whole pytest session
            pytest.fail("SIGINT raised KeyboardInterrupt: no checkpoint")
    assert e.value.code == REQUEUE_EXIT
    assert signal.getsignal(sig) is handler  # put back
    assert [p.name for p in sorted((out_dir / "checkpoints").glob("step_*"))] == ["step_00000003"]
    assert max(r["step"] for r in read_metrics(out_dir)) == 3 and len(calls) == 6
    out, err = capfd.readouterr()
    assert f"{signal.Signals(sig).name}: checkpoint at step 3/{STEPS} saved; exiting with status 75" in out
    assert ("press Ctrl-C again to stop at once without one" in err) == (sig == signal.SIGINT)


def test_second_sigint_interrupts_at_once(tiny_assets, tmp_path):
    """Ctrl-C twice: KeyboardInterrupt in the step where the second came, no checkpoint."""
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    out_dir = tmp_path / "run"
    cfg = tiny_cfg_dict(tiny_assets, out_dir, train={"steps": STEPS, "warmup_steps": 2})
    tr = build_trainer(from_dict(RunConfig, cfg))
    backward, calls = tr.engine.backward, []

    def signalling_backward(loss):
        calls.append(1)
        if len(calls) in (3, 4):  # both micro-batches of step 2
            os.kill(os.getpid(), signal.SIGINT)
        return backward(loss)

    tr.engine.backward = signalling_backward
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    assert len(calls) == 4 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not list((out_dir / "checkpoints").glob("step_*"))


def test_launcher_watch_stops_when_a_launcher_is_gone_and_only_then():
    """The watch behind SIGTERM to the ``deepspeed`` CLI (test_launcher_stop.py runs the real one): a
    watched process that exits is a stop request within a poll, also while it is a zombie (as the CLI
    is until its parent reaps it); live ones are not; a process not started by deepspeed's launch.py
    (this one, as under srun, torchrun or run_child) has nothing to watch."""
    import subprocess

    psutil = pytest.importorskip("psutil")
    from distill.dist.stop import POLL_S, launcher_chain, watch_for_stop

    assert launcher_chain() == []
    live, dying = (subprocess.Popen(["sleep", "60"]) for _ in range(2))
    reasons: list[str] = []
    undo = watch_for_stop(reasons, [(psutil.Process(live.pid), "live"), (psutil.Process(dying.pid), "dying")],
                          announce=False)
    try:
        time.sleep(3 * POLL_S)
        assert reasons == []
        dying.kill()  # not reaped: a zombie
        deadline = time.monotonic() + 10 * POLL_S
        while not reasons and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reasons == ["dying is gone"]  # `dying` is not reaped before this line: a zombie
    finally:
        undo()
        for p in (live, dying):
            p.kill()
            p.wait()
