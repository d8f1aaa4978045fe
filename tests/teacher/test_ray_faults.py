"""Teacher actors killed mid-harvest (loopback-only local Ray, the tiny teacher, one stage per replica).

Within the budget (``teacher.max_restarts`` / ``max_retries``) the service restarts what died and the
harvest finishes with the records of an undisturbed run, printing one warning per restart; with
``teacher.max_restarts=0`` the launcher stops with one line (exit 2) naming the actor, what is kept
and the command that resumes, and that command completes the corpus. (A stage actor killed inside
the service, rebuilt by the router: tests/teacher/test_ray_service.py.) Every service start costs
seconds on a 2-core machine: three in all here (the module's, the router Ray restarts, the one
with no restart budget).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.ray

STOP = ",".join(str(i) for i in range(4, 1024))  # a random tiny teacher rarely writes eos
N_SHARDS = 6  # 6 texts x 2 perspectives, 2 jobs per shard


@pytest.fixture(scope="module")
def texts(tmp_path_factory, sentibench_texts):
    path = tmp_path_factory.mktemp("faults") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentibench_texts[:6]))
    return path


def _argv(teacher, texts, out, *extra):
    return ["--input.source=jsonl", f"--input.path={texts}", f"--teacher.model={teacher}",
            "--teacher.backend=ray", "--teacher.max_batch_size=1", "--perspectives.names=overall polarity,irony",
            f"--sampling.stop_token_ids={STOP}", "--sampling.max_new_tokens=5", "--sampling.temperature=1.0",
            f"--output.dir={out}", "--output.shard_size=2", "--output.progress=false", *extra]


def _cfg(*argv):
    from distill.config import load_config
    from distill.knowdist.harvest import HarvestConfig

    return load_config(HarvestConfig, list(argv))[0]


@pytest.fixture(scope="module")
def service(ray_session, tiny_teacher_dir, texts, tmp_path_factory):
    """The service as the harvest builds it from its config (default budgets), on the session's Ray."""
    from distill.knowdist.harvest import build_teacher

    cfg = _cfg(*_argv(tiny_teacher_dir, texts, tmp_path_factory.mktemp("unused")))
    svc = build_teacher(cfg.teacher, str(tiny_teacher_dir))
    yield svc
    svc.shutdown()


@pytest.fixture(scope="module")
def undisturbed(service, tiny_teacher_dir, texts, tmp_path_factory):
    from distill.knowdist.harvest import harvest, load_corpus

    out = tmp_path_factory.mktemp("undisturbed")
    records = load_corpus(harvest(_cfg(*_argv(tiny_teacher_dir, texts, out)), teacher=service,
                                  model_name=str(tiny_teacher_dir)))
    assert len(records) >= 3
    return SimpleNamespace(records=records, shards=_shards(out))


def _shards(out) -> dict:
    """Per finished shard, the manifest's counts (kept / empty / truncated / duplicate, prompt and
    generated tokens): they cover every generation, also those the filters dropped."""
    man = json.loads((out / "manifest.json").read_text())
    return {int(i): {k: v for k, v in e.items() if k != "file"} for i, e in man["completed"].items()}


class _KillAt:
    """The harvest's teacher, except that just before its n-th ``get`` it SIGKILLs the process of
    the actor ``kills[n](service)`` names (a pid the actor reported itself), while requests are in flight."""

    def __init__(self, svc, kills: dict):
        self.svc, self.kills, self.calls, self.killed = svc, kills, 0, []

    def get(self, handle, timeout=None):
        self.calls += 1
        if self.calls in self.kills:
            pid = int(self.kills[self.calls](self.svc))
            assert pid > 1 and pid != os.getpid()
            os.kill(pid, signal.SIGKILL)
            self.killed.append(pid)
        return self.svc.get(handle, timeout)

    def __getattr__(self, name):
        return getattr(self.svc, name)


def _router_pid(svc) -> int:
    return svc.stats()["router_pid"]


def _stage_pid(svc) -> int:
    import ray

    return ray.get(svc.stage_handles()[0][0].ready.remote(), timeout=120)["pid"]


def test_killed_router_is_restarted_and_the_harvest_completes(service, undisturbed, tiny_teacher_dir, texts,
                                                              tmp_path, capsys):
    """The router's process is killed mid-harvest (two shards in flight): Ray restarts it, it
    rebuilds the replica, Ray re-sends its requests (same seeds, same generations); the corpus is the
    undisturbed run's, record for record and shard for shard, and the restart is one warning line."""
    from distill.knowdist.harvest import harvest, load_corpus

    capsys.readouterr()
    teacher = _KillAt(service, {2: _router_pid})
    out = harvest(_cfg(*_argv(tiny_teacher_dir, texts, tmp_path / "killed")), teacher=teacher,
                  model_name=str(tiny_teacher_dir))
    (router_pid,) = teacher.killed
    assert load_corpus(out) == undisturbed.records
    assert _shards(out) == undisturbed.shards
    lines = capsys.readouterr().out.splitlines()
    warnings = [x for x in lines if "warning: teacher actor" in x]
    assert len(warnings) == 1, lines  # exactly one restart line (the tiny teacher's truncation warning aside)
    assert warnings[0].startswith(f"[harvest] warning: teacher actor died: the service's router (pid {router_pid}); "
                                  f"Ray restarted it as pid "), warnings[0]
    assert warnings[0].endswith("(restart 1 of teacher.max_restarts=3) with fresh stage actors and re-sent the "
                                "requests it held; the harvest goes on"), warnings[0]
    assert _router_pid(service) != router_pid


def test_restart_budget_spent_stops_in_one_line_and_the_named_command_resumes(
        service, undisturbed, tiny_teacher_dir, texts, tmp_path, launcher, monkeypatch, capsys):
    """teacher.max_restarts=0: a killed stage actor ends the launcher with exit 2 and one line naming
    the actor, the cause, the shards kept and the command to resume; the finished shards are intact
    and that command completes the corpus."""
    import distill.knowdist.harvest as H
    from distill.errors import run_cli

    mod = launcher.load("harvest.py")
    build = H.build_teacher
    kill = {}
    monkeypatch.setattr(H, "build_teacher", lambda cfg, model: kill.setdefault("t", _KillAt(build(cfg, model), {2: _stage_pid})))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    out = tmp_path / "stopped"
    capsys.readouterr()
    rc = run_cli(mod.main, "harvest.py", _argv(tiny_teacher_dir, texts, out, "--teacher.max_restarts=0"))
    cap = capsys.readouterr()
    pid = kill["t"].killed[0]
    man = json.loads((out / "manifest.json").read_text())
    done = len(man["completed"])
    line = launcher.assert_user_error(
        SimpleNamespace(returncode=rc, stdout=cap.out, stderr=cap.err),
        f"harvest.py: error: teacher actor died: replica 0, stage 1 of 1 (pid {pid}, node 127.0.0.2): its process died (",
        "not restarted again (teacher.max_restarts=0 per replica spent, 0 used)",
        f"the harvest stopped: {done}/{N_SHARDS} shards", f"are written in {out} and kept", "; resume with: python ")
    assert 1 <= done < N_SHARDS
    # What is kept is what the undisturbed run wrote for those shards.
    by_id = {r["id"]: r for r in undisturbed.records}
    kept = [json.loads(x) for e in man["completed"].values() for x in (out / e["file"]).read_text().splitlines()]
    assert len(kept) == sum(e["kept"] for e in man["completed"].values()) and f"({len(kept)} records)" in line
    assert all(by_id[r["id"]] == r for r in kept)
    assert _shards(out) == {i: undisturbed.shards[i] for i in _shards(out)}

    # The rerun borrows the module's running service (same teacher and settings; starting another
    # costs seconds): the harvest would shut down what it built, so shutdown is a no-op here.
    monkeypatch.setattr(H, "build_teacher", lambda cfg, model: SimpleNamespace(
        tokenizer=service.tokenizer, async_generate=service.async_generate, get=service.get,
        faults=service.faults, shutdown=lambda: None))
    cmd = shlex.split(line.split("; resume with: ", 1)[1])
    assert cmd[0] == "python" and os.path.samefile(cmd[1], os.path.join(os.path.dirname(mod.__file__), "harvest.py"))
    assert run_cli(mod.main, "harvest.py", cmd[2:]) == 0
    assert f"resuming: {done}/{N_SHARDS} shards done" in capsys.readouterr().out
    assert H.load_corpus(out) == undisturbed.records and _shards(out) == undisturbed.shards
