"""Teacher service on Ray: one causal-LM teacher held as ``replicas x shards`` actors.

Each replica is a pipeline of ``shards`` stage actors (:mod:`distill.teacher.shard`); hidden states
move stage to stage through the object store, never through the driver. One async router actor
splits each request into length-sorted, padded batches, sends each to the least-busy healthy replica
and assembles the results. ``async_topk``/``async_generate`` return the router's ObjectRef: the
caller sees only the top-k it asked for, and full logits never leave the last stage.

Fault tolerance, two budgets: a dead stage actor rebuilds its whole replica (at most ``max_restarts``
times per replica; each failed batch re-sent at most ``max_retries`` times, each result accepted
once); Ray restarts the router and re-sends the requests it held, which are idempotent. Every
restart is one line from :meth:`TeacherClient.faults`; a spent budget raises one-line
:class:`TeacherUnavailable`; an ordinary exception in the model code is raised at once.

``ray_address=None`` joins this process's Ray, else ``$RAY_ADDRESS``, else starts a private Ray on
loopback (127.0.0.2) that :meth:`shutdown` stops. See docs/teacher.md, sections "How it is built"
(batching, top-k, generation, budgets) and "Stray Ray processes" (:func:`cleanup_local_ray`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch

from distill.data.batching import plan_batches
from distill.teacher import pipeline as P
from distill.teacher.pipeline import DEFAULT_MAX_RESTARTS, DEFAULT_MAX_RETRIES, Generation, SamplingParams, TeacherUnavailable

_VALUE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


DEFAULT_TEMP_DIR = "/tmp/ray_distill"
_RECORD_PREFIX = "distill-ray-"
_record: Path | None = None  # this process's record of the private Ray it started


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): tells a live pid from a reused one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return None if fields[0] == b"Z" else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _belongs_to(pid: int, session_dir: str) -> bool:
    """True when the process names ``session_dir`` in its command line or environment, or has a file
    under it open (Ray's agents retitle themselves, so the command line alone is not enough)."""
    if _start_time(pid) is None:
        return False
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return False
        for what in ("cmdline", "environ"):
            with open(f"/proc/{pid}/{what}", "rb") as fh:
                if session_dir.encode() in fh.read():
                    return True
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(session_dir + "/"):
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


def session_pids(session_dir: str, recorded=()) -> list[int]:
    """Live processes of this user that belong to the Ray session ``session_dir`` (see :func:`_belongs_to`)."""
    candidates = {int(p) for p in recorded} | {int(d) for d in os.listdir("/proc") if d.isdigit()}
    candidates.discard(os.getpid())
    return sorted(p for p in candidates if _belongs_to(p, session_dir))


def _terminate(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace_s``."""
    starts = {p: _start_time(p) for p in pids}
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
        alive = [p for p in pids if starts[p] is not None and _start_time(p) == starts[p]]
        for p in alive:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in alive if _start_time(p) == starts[p]]
        if not alive:
            return


def cleanup_local_ray(temp_dir: str | os.PathLike = DEFAULT_TEMP_DIR) -> list[int]:
    """End the processes left by private Ray sessions of ours under ``temp_dir`` whose driver died
    (``kill -9``); returns their pids. A record whose driver still runs is left alone."""
    ended: list[int] = []
    root = Path(temp_dir)
    if not root.is_dir():
        return ended
    for path in sorted(root.glob(f"{_RECORD_PREFIX}*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            driver, session_dir = int(rec["driver_pid"]), str(rec["session_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # torn or foreign: not ours to act on
        if _start_time(driver) is not None and _start_time(driver) == rec.get("driver_start"):
            continue  # that run is alive
        pids = session_pids(session_dir, rec.get("pids", []))
        if pids:
            print(f"[ray] ending {len(pids)} process(es) left by a killed run (driver pid {driver}, "
                  f"session {session_dir}): {pids}", flush=True)
            _terminate(pids)
        ended += pids
        path.unlink(missing_ok=True)
    return ended


def _actor_need(use_gpu: bool, num_cpus: float) -> str:
    return "1 GPU" if use_gpu else f"{num_cpus:g} CPU"


def _resources_now() -> str:
    """What Ray has: live nodes, total and free GPUs / CPUs (one phrase for a message)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total, free = ray.cluster_resources(), ray.available_resources()
    return (f"Ray sees {len(nodes)} node(s) with {total.get('GPU', 0):g} GPU(s) ({free.get('GPU', 0):g} free) and "
            f"{total.get('CPU', 0):g} CPU(s) ({free.get('CPU', 0):g} free)")


def check_placement(n_actors: int, use_gpu: bool, num_cpus_per_shard: float) -> None:
    """Before any actor is created: the cluster can hold ``n_actors`` stage actors at all (a GPU each,
    or ``num_cpus_per_shard`` CPUs each, on some node). Ray would otherwise keep them pending for ever
    with no word. Resources another job holds right now are the bounded start wait's business."""
    key, per = ("GPU", 1.0) if use_gpu else ("CPU", float(num_cpus_per_shard))
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = sum(int(n.get("Resources", {}).get(key, 0) // per) for n in nodes) if per > 0 else n_actors
    if fits < n_actors:
        fix = ("run the teacher's actors on CPU with teacher.num_gpus=0, or start Ray where the GPUs are "
               "(teacher.ray_address)") if use_gpu else "lower teacher.replicas / teacher.shards or add CPUs to the cluster"
        raise TeacherUnavailable(f"{n_actors} teacher actor(s) need {_actor_need(use_gpu, per)} each, but the nodes "
                                 f"can hold {fits}: {_resources_now()}; {fix}")


def start_local_ray(num_cpus: int | None = None, temp_dir: str | None = None, *, node_ip: str = "127.0.0.2",
                    namespace: str | None = None) -> Path:
    """A private single-node Ray bound to ``node_ip`` (loopback): nothing it opens leaves the machine.

    First ends what killed runs left under ``temp_dir`` (:func:`cleanup_local_ray`), then records this
    session (returns the record's path; :func:`stop_ray` removes it)."""
    global _record
    temp_dir = temp_dir or DEFAULT_TEMP_DIR
    cleanup_local_ray(temp_dir)
    ray.init(_node_ip_address=node_ip, include_dashboard=False, num_cpus=num_cpus, _temp_dir=temp_dir,
             log_to_driver=False, namespace=namespace)
    node = ray._private.worker._global_node
    pids = [pi.process.pid for infos in node.all_processes.values() for pi in infos if pi.process is not None]
    rec = {"driver_pid": os.getpid(), "driver_start": _start_time(os.getpid()),
           "session_dir": str(node.get_session_dir_path()), "temp_dir": str(temp_dir), "pids": pids}
    from distill.fileio import atomic_write_text

    _record = Path(temp_dir) / f"{_RECORD_PREFIX}{os.getpid()}.json"
    atomic_write_text(_record, json.dumps(rec))
    return _record


def _ray_reachable(address: str, timeout_s: float = 5.0) -> bool:
    """A TCP connect to ``HOST:PORT`` (or ``ray://HOST[:PORT]``) within ``timeout_s``. Ray itself
    retries an unreachable GCS for about 80 s before it fails (2026-12, Ray 2.60), so we ask first."""
    import socket

    rest = address.split("://", 1)[1] if "://" in address else address
    host, _, port = rest.split("/", 1)[0].rpartition(":")
    if not host:
        host, port = rest.split("/", 1)[0], "10001" if address.startswith("ray://") else "6379"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def connect_ray(address: str | None = "auto", *, num_cpus: int | None = None, temp_dir: str | None = None,
                node_ip: str = "127.0.0.2", **init_kwargs) -> bool:
    """Join a running Ray cluster (never recorded, so never cleaned up by us); True when a private Ray
    was started instead.

    ``address`` (``None`` reads ``$RAY_ADDRESS``, which also overrides "auto", as in ``ray.init``):
    "auto" with no reachable cluster starts a private local Ray (:func:`start_local_ray`, with
    ``num_cpus``, ``temp_dir``, ``node_ip``) and says so in one line; an explicit ``HOST:PORT`` or
    ``ray://...`` that cannot be reached is a :class:`distill.config.ConfigError` naming it.
    ``init_kwargs`` (e.g. ``namespace``, ``_node_ip_address``) go to ``ray.init`` when joining."""
    env = os.environ.get("RAY_ADDRESS", "")
    target = env or address or "auto"
    where = f"RAY_ADDRESS={env}" if env else f"ray_address={target}"
    found = None
    if target == "auto":
        try:  # Ray's own lookup: the latest `ray start` of this machine, else any running GCS
            from ray._private.services import get_ray_address_from_environment

            found = get_ray_address_from_environment("auto", None)
        except ConnectionError:
            found = None
        except Exception:  # a private API that moved: let ray.init decide
            found = "auto"
        if found is None or (found != "auto" and not _ray_reachable(found)):
            print(f"[ray] ray_address=auto: no running Ray cluster found; starting a private local Ray on "
                  f"{node_ip} (temp dir {temp_dir or DEFAULT_TEMP_DIR})", flush=True)
            start_local_ray(num_cpus, temp_dir, node_ip=node_ip, namespace=init_kwargs.get("namespace"))
            return True
    elif not _ray_reachable(target):
        from distill.config import ConfigError

        raise ConfigError(f"{where}: no Ray cluster reachable at {target} (connection refused or timed out); "
                          f"start one there (ray start --head) or set ray_address=auto for a local one")
    try:
        ray.init(address=found or target, log_to_driver=False, **init_kwargs)
    except ConnectionError as e:
        from distill.config import ConfigError

        raise ConfigError(f"{where}: could not join the Ray cluster at {found or target}: {e}") from e
    return False


def stop_ray() -> None:
    """``ray.shutdown()``, and forget the record of the private Ray this process started."""
    global _record
    if ray.is_initialized():
        ray.shutdown()
    if _record is not None:
        _record.unlink(missing_ok=True)
        _record = None


def put(value):
    """``ray.put``: an ObjectRef of ``value`` in the object store."""
    return ray.put(value)


def object_store_bytes(ref) -> int:
    """Size of an object as stored in the Ray object store (what moving it costs)."""
    return int(ray.experimental.get_object_locations([ref])[ref]["object_size"])


def _actor_error(e: BaseException):
    """The RayActorError behind ``e`` (itself, or the cause of a RayTaskError raised downstream), or None."""
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

    if isinstance(e, (RayActorError, ActorUnavailableError)):
        return e
    if isinstance(e, RayTaskError):
        cause = getattr(e, "cause", None)
        if isinstance(cause, (RayActorError, ActorUnavailableError)):
            return cause
    return None


_RAY_ID_LINES = ("class_name:", "actor_id:", "pid:", "name:", "namespace:", "ip:")


def _death_cause(e: BaseException, limit: int = 240) -> str:
    """The cause Ray gave for an actor's death, on one line: Ray's message runs over several lines
    (identity fields, then the cause, then a list of common causes, which we leave out)."""
    err = _actor_error(e) or e
    text = str(getattr(err, "error_msg", "") or err)
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    body = [x for x in lines if not x.startswith(_RAY_ID_LINES)
            and x != "The actor died unexpectedly before finishing this task."]
    msg = " ".join(body or lines[:1]).split(" Some common causes include")[0].strip()
    m = re.search(r"Worker exit type: (\S+) Worker exit detail: (.*)", msg)
    if m:  # "The actor is dead because its worker process has died. Worker exit type: ..."
        msg = f"its process died ({m.group(1)}: {m.group(2).strip()})"
    msg = msg or type(err).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _error_field(e: BaseException, name: str) -> str:
    """``pid`` / ``ip`` from Ray's actor-death message ("" when it does not say)."""
    err = _actor_error(e) or e
    for line in str(getattr(err, "error_msg", "") or err).splitlines():
        if line.strip().startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def _actor_table(actor_id: str) -> dict:
    """Ray's record of an actor: ``State`` (ALIVE, RESTARTING, DEAD, ...), ``NumRestarts``, ``Pid``.
    2026-12, Ray 2.60: the public state API (``ray.util.state``) needs the dashboard, which our private
    Ray does not start; this is the GCS table that ``RuntimeContext.was_current_actor_reconstructed``
    reads. {} when it cannot be read (the record is then left out of messages)."""
    try:
        from ray._private.state import actors

        return dict(actors(actor_id=actor_id) or {})
    except Exception:
        return {}


def teacher_fault(e: BaseException, *, max_restarts: int | None = None,
                  max_retries: int | None = None) -> TeacherUnavailable | None:
    """The :class:`TeacherUnavailable` that ``e`` (raised by ``ray.get`` of a service call) means, or
    None when ``e`` is something else: the router's own one-line error, or the router actor's death
    once Ray's restarts (``max_restarts``) or this request's re-sends (``max_retries``) are spent."""
    from ray.exceptions import RayTaskError

    if isinstance(e, TeacherUnavailable) and not isinstance(e, RayTaskError):
        return e
    cause = getattr(e, "cause", None) if isinstance(e, RayTaskError) else None
    if isinstance(cause, TeacherUnavailable):
        return TeacherUnavailable(str(cause))
    err = _actor_error(e)
    if err is None:
        return None
    pid, ip = _error_field(err, "pid"), _error_field(err, "ip")
    where = ", ".join(x for x in (f"pid {pid}" if pid else "", f"node {ip}" if ip else "") if x)
    cls = _error_field(err, "class_name")
    actor = "the service's router" if cls in ("", "_Router") else f"the teacher's {cls} actor"
    rec = _actor_table(err.actor_id) if getattr(err, "actor_id", None) else {}
    deadline = time.monotonic() + 10
    while rec.get("State") == "ALIVE" and rec.get("NumRestarts") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)  # the caller saw the death before Ray's control store did: wait for its verdict
        rec = _actor_table(err.actor_id)
    restarts = rec.get("NumRestarts")
    knob_r = "teacher.max_restarts" + (f"={max_restarts}" if max_restarts is not None else "")
    knob_t = "teacher.max_retries" + (f"={max_retries}" if max_retries is not None else "")
    if rec.get("State") in ("ALIVE", "RESTARTING", "PENDING_CREATION"):
        budget = (f"Ray restarted it ({restarts} restart(s) so far), but this request was already re-sent "
                  f"the {knob_t} times allowed")
    else:
        budget = (f"not restarted again ({knob_r} spent, {restarts} used)" if restarts is not None
                  else f"not restarted again ({knob_r} spent)")
    return TeacherUnavailable(f"teacher actor died: {actor}{f' ({where})' if where else ''}: "
                              f"{_death_cause(err)}; {budget}")


def get_reply(handle, timeout: float | None = None, *, max_restarts: int | None = None,
              max_retries: int | None = None):
    """``ray.get(handle)``; an actor that died past its budget raises the one-line
    :class:`TeacherUnavailable` of :func:`teacher_fault` instead of Ray's error."""
    try:
        return ray.get(handle, timeout=timeout)
    except Exception as e:
        fault = teacher_fault(e, max_restarts=max_restarts, max_retries=max_retries)
        if fault is None:
            raise
        raise fault from e


def join_ray(address: str | None, temp_dir: str | None, n_actors: int) -> bool:
    """Join Ray for a service of ``n_actors`` actors, unless this process already has: a private
    single-node Ray on loopback when ``address`` is None and ``$RAY_ADDRESS`` unset (nothing leaves the
    machine), else the cluster at ``address`` ("auto" with no cluster starts a private one too; an
    unreachable address is a ConfigError). True when this call started or joined it (the caller then
    stops it with :func:`stop_ray`)."""
    if ray.is_initialized():
        return False
    cpus = max(os.cpu_count() or 1, n_actors)
    if address is None and not os.environ.get("RAY_ADDRESS"):
        start_local_ray(cpus, temp_dir)
    else:
        connect_ray(address, num_cpus=cpus, temp_dir=temp_dir)
    return True


@ray.remote(max_restarts=0, max_task_retries=0)
class _StageActor:
    """Holds one stage (a contiguous layer range) of one replica."""

    def __init__(self, model: str, spec, dtype: str, quantization, use_gpu: bool, num_threads: int):
        from distill.teacher.shard import build_stage

        torch.set_num_threads(max(1, num_threads))
        device = "cuda" if use_gpu else "cpu"
        t0 = time.perf_counter()
        self.stage = build_stage(model, spec, device=device, dtype=dtype, quantization=quantization)
        self.load_s = time.perf_counter() - t0

    def ready(self) -> dict:
        return {"pid": os.getpid(), "ip": ray.util.get_node_ip_address(),
                "layers": (self.stage.spec.start, self.stage.spec.end), "load_s": self.load_s,
                "device": str(self.stage.device)}

    def usage(self) -> dict:
        """CPU seconds this actor process has used, and its torch threads (benchmarks, monitoring)."""
        return {"cpu_s": time.process_time(), "torch_threads": torch.get_num_threads()}

    def forward(self, payload):
        return self.stage(payload)


async def _all(coros) -> None:
    """Await every batch of a request; when one fails, cancel the others (their replicas go back to
    the requests still running) and raise its error."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


@dataclass
class _Replica:
    index: int
    stages: list  # actor handles, stage order
    epoch: int = 0  # bumped at every restart
    inflight: int = 0
    healthy: bool = True
    restarts: int = 0  # rebuilds so far (at most max_restarts)
    dead: str = ""  # set when the replica is gone for good: what happened, one line
    procs: list = field(default_factory=list)  # the stages' ready() info (pid, node), once known
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@ray.remote(max_restarts=0)  # TeacherService sets the router's restart and retry budget in .options()
class _Router:
    """Batches requests, spreads them over replicas, restarts dead replicas, re-sends lost batches."""

    def __init__(self, model: str, replicas: int, shards: int, dtype: str, quantization, use_gpu: bool,
                 num_cpus_per_shard: float, max_batch_tokens: int, max_batch_size: int, max_retries: int,
                 max_inflight: int | None, info, vocab_limit, max_restarts: int = DEFAULT_MAX_RESTARTS,
                 start_timeout_s: float = 900.0):
        from distill.teacher.shard import StageSpec, split_layers

        self.model, self.dtype, self.quantization, self.use_gpu = model, dtype, quantization, use_gpu
        self.num_cpus_per_shard = num_cpus_per_shard
        self.info = info
        self.vocab_limit = vocab_limit
        self.max_batch_tokens, self.max_batch_size, self.max_retries = max_batch_tokens, max_batch_size, max_retries
        self.max_restarts, self.start_timeout_s = max_restarts, start_timeout_s
        self.specs = [StageSpec(i, shards, s, e) for i, (s, e) in enumerate(split_layers(info.num_layers, shards))]
        self.max_inflight = max_inflight or (shards + 1)
        self.replicas = [_Replica(r, self._make_stages()) for r in range(replicas)]
        self._cond: asyncio.Condition | None = None
        self._tokenizer = None
        self.events: list[str] = []  # one line per replica restart or loss (TeacherClient.faults)
        self.stats = {"batches": 0, "sequences": 0, "tokens": 0, "retried_batches": 0, "restarts": 0,
                      "batches_per_replica": [0] * replicas}

    def _make_stages(self) -> list:
        opts = {"num_gpus": 1} if self.use_gpu else {"num_cpus": self.num_cpus_per_shard}
        threads = int(max(1, self.num_cpus_per_shard))
        return [_StageActor.options(**opts).remote(self.model, spec, self.dtype, self.quantization, self.use_gpu, threads)
                for spec in self.specs]

    async def ready(self) -> list:
        for r in self.replicas:
            r.procs = await asyncio.gather(*[h.ready.remote() for h in r.stages])
        return [list(r.procs) for r in self.replicas]

    def stage_handles(self) -> list:
        return [list(r.stages) for r in self.replicas]

    def describe(self) -> dict:
        return {"model": self.model, "info": self.info, "max_restarts": self.max_restarts,
                "max_retries": self.max_retries}

    def get_stats(self) -> dict:
        return dict(self.stats, batches_per_replica=list(self.stats["batches_per_replica"]),
                    epochs=[r.epoch for r in self.replicas], router_pid=os.getpid(),
                    lost_replicas=[r.index for r in self.replicas if r.dead])

    def get_events(self) -> dict:
        """This router's pid (a new one after Ray restarted it) and its restart lines so far."""
        return {"pid": os.getpid(), "events": list(self.events)}

    # -- scheduling ---------------------------------------------------------------------------
    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def _acquire(self) -> _Replica:
        cond = self._condition()
        async with cond:
            while True:
                if not self.replicas:
                    raise RuntimeError(f"teacher service ({self.model}) was shut down")
                alive = [r for r in self.replicas if not r.dead]
                if not alive:
                    lost = [r.dead for r in self.replicas]
                    raise TeacherUnavailable(lost[-1] + (f" (all {len(lost)} replicas are gone)" if len(lost) > 1 else ""))
                free = [r for r in alive if r.healthy and r.inflight < self.max_inflight]
                if free:
                    rep = min(free, key=lambda r: (r.inflight, self.stats["batches_per_replica"][r.index]))
                    rep.inflight += 1
                    return rep
                await cond.wait()

    async def _release(self, rep: _Replica) -> None:
        cond = self._condition()
        async with cond:
            rep.inflight -= 1
            cond.notify_all()

    async def _run_on(self, rep: _Replica, stages: list, payload):
        ref = payload
        for h in stages:
            ref = h.forward.remote(ref)
        return await ref

    def _who(self, rep: _Replica, stages: list, err: BaseException) -> str:
        """Which actor ``err`` says died: replica, stage, pid and node."""
        actor = getattr(_actor_error(err), "actor_id", None)
        ids = [h._actor_id.hex() for h in stages]
        S = len(self.specs)
        if actor in ids:
            s = ids.index(actor)
            proc = rep.procs[s] if s < len(rep.procs) else {}
            pid = _error_field(err, "pid") or proc.get("pid", "?")
            ip = _error_field(err, "ip") or proc.get("ip", "?")
            return f"replica {rep.index}, stage {s + 1} of {S} (pid {pid}, node {ip})"
        return f"replica {rep.index} (one of its {S} stage actors)"

    @staticmethod
    def _kill(stages: list) -> None:
        for h in stages:
            try:
                ray.kill(h, no_restart=True)
            except Exception:
                pass

    async def _restart(self, rep: _Replica, epoch: int, who: str, cause: str) -> None:
        """Rebuild every stage of ``rep`` (once per failure epoch, however many batches saw it die),
        within the replica's restart budget; past it, or when new actors do not start within
        ``start_timeout_s`` on every try, the replica is gone for good (``rep.dead``)."""
        async with rep.lock:
            if rep.epoch != epoch or rep.dead:  # another batch of this replica already handled it
                return
            rep.healthy = False
            self._kill(rep.stages)
            what = f"teacher actor died: {who}: {cause}"
            while True:
                if rep.restarts >= self.max_restarts:
                    rep.dead = (f"{what}; not restarted again (teacher.max_restarts={self.max_restarts} "
                                f"per replica spent, {rep.restarts} used)")
                    others = [r for r in self.replicas if not r.dead]
                    self.events.append(rep.dead + (f"; the other {len(others)} replica(s) go on" if others else ""))
                    break
                rep.restarts += 1
                rep.stages = self._make_stages()
                try:
                    rep.procs = await asyncio.wait_for(asyncio.gather(*[h.ready.remote() for h in rep.stages]),
                                                       self.start_timeout_s)
                except Exception as e:  # the new actors failed to load, or never got a place to run
                    self._kill(rep.stages)
                    why = (f"no place to start within {self.start_timeout_s:g} s: its node may be gone"
                           if isinstance(e, asyncio.TimeoutError) else _death_cause(e))
                    what = f"{what}; restart {rep.restarts} failed ({why})"
                    continue
                rep.epoch += 1
                rep.healthy = True
                self.stats["restarts"] += 1
                self.events.append(f"{what}; restarted the replica (restart {rep.restarts} of "
                                   f"teacher.max_restarts={self.max_restarts}) and re-sent its batches")
                break
        cond = self._condition()
        async with cond:
            cond.notify_all()

    async def _dispatch(self, work, what: str):
        """Run ``work(run)`` on some replica; on actor death restart that replica and try again
        (at most ``max_retries`` times)."""
        failures = 0
        while True:
            rep = await self._acquire()
            epoch, stages = rep.epoch, list(rep.stages)
            try:
                result = await work(lambda payload: self._run_on(rep, stages, payload))
                self.stats["batches_per_replica"][rep.index] += 1
                return result
            except Exception as e:
                if _actor_error(e) is None:  # not an actor death: the model code's own error
                    raise
                if rep.epoch == epoch:  # keep new batches off this replica until it is rebuilt
                    rep.healthy = False
                failures += 1
                who, cause = self._who(rep, stages, e), _death_cause(e)
            finally:
                await self._release(rep)
            # Shielded: when another batch of the request fails and _all cancels this one, the
            # replica's rebuild still completes (else it would stay unhealthy, and calls would wait on it).
            await asyncio.shield(self._restart(rep, epoch, who, cause))
            if failures > self.max_retries:
                raise TeacherUnavailable(
                    f"teacher actor died: {what} was sent {failures} time(s) and each time a teacher actor died "
                    f"(last: {who}: {cause}); teacher.max_retries={self.max_retries} is spent")
            self.stats["retried_batches"] += 1

    # -- requests -----------------------------------------------------------------------------
    async def topk(self, sequences, positions, k: int, values_dtype: str, temperature: float = 1.0,
                   vocab_size: int | None = None):
        vd = _VALUE_DTYPES[values_dtype]
        batches = plan_batches([len(s) for s in sequences], self.max_batch_size, self.max_batch_tokens)
        out: list = [None] * len(sequences)

        async def one(bi, batch):
            seqs, poss = [sequences[i] for i in batch], [positions[i] for i in batch]
            res = await self._dispatch(lambda run: P.topk_batch(run, self.info, seqs, poss, k, vd, temperature, vocab_size), f"top-k batch {bi}")
            for i, r in zip(batch, res):
                if out[i] is not None:  # cannot happen: each batch is accepted once
                    raise RuntimeError(f"teacher service: sequence {i} scored twice")
                out[i] = r
            self.stats["batches"] += 1
            self.stats["sequences"] += len(batch)
            self.stats["tokens"] += sum(len(s) for s in seqs)

        await _all([one(bi, b) for bi, b in enumerate(batches)])
        missing = [i for i, r in enumerate(out) if r is None]
        if missing:
            raise RuntimeError(f"teacher service: sequences {missing[:5]} got no result")
        return out

    async def generate(self, prompt_ids, sampling: SamplingParams, seeds):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model)
        lengths = [len(p) + sampling.max_new_tokens for p in prompt_ids]
        batches = plan_batches(lengths, self.max_batch_size, self.max_batch_tokens)
        out: list = [None] * len(prompt_ids)

        async def one(bi, batch):
            ids, sd = [prompt_ids[i] for i in batch], [seeds[i] for i in batch]
            res = await self._dispatch(
                lambda run: P.generate_batch(run, self.info, ids, sampling, sd, self.vocab_limit), f"generate batch {bi}")
            for i, (toks, reason) in zip(batch, res):
                out[i] = Generation(self._tokenizer.decode(toks, skip_special_tokens=True), toks, reason,
                                    len(prompt_ids[i]))
            self.stats["batches"] += 1
            self.stats["sequences"] += len(batch)
            self.stats["tokens"] += sum(len(x) + len(t) for x, (t, _) in zip(ids, res))

        await _all([one(bi, b) for bi, b in enumerate(batches)])
        return out

    async def shutdown(self) -> None:
        for r in self.replicas:
            for h in r.stages:
                try:
                    ray.kill(h, no_restart=True)
                except Exception:
                    pass
        self.replicas = []


class TeacherClient:
    """The calls of a running teacher service; picklable, so other processes (trainer ranks) can use it.

    Get one with ``TeacherService.client()`` (send it to the ranks) or
    ``TeacherClient.connect(name)`` for a service started with ``name=``. A client never stops the
    service; its calls fail once the service's owner shut it down.
    """

    def __init__(self, router, model: str, info, values_dtype: str = "bfloat16", *,
                 max_restarts: int = DEFAULT_MAX_RESTARTS, max_retries: int = DEFAULT_MAX_RETRIES):
        self._router, self.model, self.info, self.values_dtype = router, str(model), info, values_dtype
        self.max_restarts, self.max_retries = max_restarts, max_retries
        self._tokenizer = None
        self._tokenizer_loaded = False
        self._seen: tuple[int, int] | None = None  # (router pid, events reported) for faults()

    @classmethod
    def connect(cls, name: str, namespace: str = "distill_teacher", values_dtype: str = "bfloat16") -> "TeacherClient":
        """Attach to the service whose router was named ``name`` (this process must have joined its Ray cluster)."""
        try:
            router = ray.get_actor(name, namespace=namespace)
        except ValueError as e:
            raise RuntimeError(f"no teacher service named {name!r} in Ray namespace {namespace!r}") from e
        d = ray.get(router.describe.remote())
        return cls(router, d["model"], d["info"], values_dtype, max_restarts=d["max_restarts"],
                   max_retries=d["max_retries"])

    def __getstate__(self):
        return {"_router": self._router, "model": self.model, "info": self.info, "values_dtype": self.values_dtype,
                "max_restarts": self.max_restarts, "max_retries": self.max_retries}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tokenizer, self._tokenizer_loaded, self._seen = None, False, None

    @property
    def tokenizer(self):
        if not self._tokenizer_loaded:
            try:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.model)
            except Exception:  # top-k scoring works on ids alone
                self._tokenizer = None
            self._tokenizer_loaded = True
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok):
        self._tokenizer, self._tokenizer_loaded = tok, True

    def _check_open(self) -> None:
        if self._router is None:
            raise RuntimeError(f"teacher service ({self.model}) was shut down; create a new one")

    # -- calls --------------------------------------------------------------------------------
    def async_topk(self, sequences: list[list[int]], positions: list[list[int]], k: int, *,
                   temperature: float = 1.0, vocab_size: int | None = None):
        """ObjectRef of list[TopKTeacher]: per sequence, rows = ``positions[i]`` (logits at those indices),
        at ``temperature`` over the first ``vocab_size`` tokens (default: the tokenizer's real vocabulary)."""
        self._check_open()
        sequences = [list(map(int, s)) for s in sequences]
        positions = [list(map(int, p)) for p in positions]
        P.validate_topk(self.info, sequences, positions, k, temperature=temperature, vocab_size=vocab_size)
        return self._router.topk.remote(sequences, positions, k, self.values_dtype, float(temperature), vocab_size)

    def topk(self, sequences, positions, k, *, temperature: float = 1.0, vocab_size: int | None = None):
        return self.get(self.async_topk(sequences, positions, k, temperature=temperature, vocab_size=vocab_size))

    def async_generate(self, prompts: list[str], sampling: SamplingParams | None = None, *, seeds: list[int] | None = None):
        """ObjectRef of list[Generation], one per prompt."""
        self._check_open()
        sampling, ids, seeds = P.prepare_generation(self.info, self.tokenizer, prompts, sampling, seeds)
        return self._router.generate.remote(ids, sampling, seeds)

    def generate(self, prompts, sampling=None, *, seeds=None) -> list[Generation]:
        return self.get(self.async_generate(prompts, sampling, seeds=seeds))

    def get(self, handle, timeout: float | None = None):
        """Resolve an ``async_*`` result (``ray.get``), so callers need not import ray. A teacher actor
        that died past its budget raises :class:`TeacherUnavailable` (one line: which actor, the cause
        Ray gave, the budget); restarts within the budget are invisible here (see :meth:`faults`)."""
        return get_reply(handle, timeout, max_restarts=self.max_restarts, max_retries=self.max_retries)

    def faults(self) -> list[str]:
        """One line per teacher actor restart (or replica lost) since the last call: the router
        restarted by Ray, or a replica rebuilt by the router. The first call only takes note of the
        current router."""
        self._check_open()
        ev = ray.get(self._router.get_events.remote())
        out: list[str] = []
        seen_pid, seen_n = self._seen if self._seen is not None else (ev["pid"], 0)
        if ev["pid"] != seen_pid:
            rec = _actor_table(self._router._actor_id.hex())
            n = f" (restart {rec['NumRestarts']} of" if "NumRestarts" in rec else " (within"
            out.append(f"teacher actor died: the service's router (pid {seen_pid}); Ray restarted it as pid "
                       f"{ev['pid']}{n} teacher.max_restarts={self.max_restarts}) with fresh stage actors and "
                       f"re-sent the requests it held")
            seen_n = 0
        out += ev["events"][seen_n:]
        self._seen = (ev["pid"], len(ev["events"]))
        return out

    # -- operations ---------------------------------------------------------------------------
    def stats(self) -> dict:
        self._check_open()
        return ray.get(self._router.get_stats.remote())



class TeacherService(TeacherClient):
    """A teacher served by ``replicas x shards`` Ray actors (see the module docstring).

    ``model``: a local HF folder or a hub name (each stage downloads only its safetensors files).
    ``dtype``: ``auto`` (checkpoint dtype on GPU, fp32 on CPU) | bfloat16 | float16 | float32.
    ``quantization``: None | ``"8bit"`` | ``"4bit"`` (bitsandbytes; CUDA only).
    ``values_dtype``: dtype of the top-k log-probs shipped back (bfloat16, float16 or float32).
    ``name``: register the router under this Ray actor name (namespace ``distill_teacher``) so other
    drivers of the cluster can ``TeacherClient.connect(name)``; it lives as long as this service.
    ``max_restarts``: restarts of the router (by Ray) and of each replica (by the router) after an actor
    died; ``max_retries``: re-sends of one request (by Ray) or one batch (by the router) after the actor
    serving it died; ``start_timeout_s``: how long a restarted replica may take to load before the
    try counts as failed (no node can take it). See the module docstring.
    """

    def __init__(self, model: str | os.PathLike, *, replicas: int = 1, shards: int = 1, dtype: str = "auto",
                 quantization: str | None = None, max_batch_tokens: int = 16384, max_batch_size: int = 64,
                 ray_address: str | None = None, use_gpu: bool | None = None, num_cpus_per_shard: float = 1,
                 values_dtype: str = "bfloat16", max_retries: int = DEFAULT_MAX_RETRIES,
                 max_restarts: int = DEFAULT_MAX_RESTARTS, start_timeout_s: float = 900.0,
                 max_inflight_per_replica: int | None = None, ray_temp_dir: str | None = None, name: str | None = None):
        from distill.teacher.shard import load_config

        if replicas < 1:
            raise ValueError(f"replicas={replicas} must be >= 1")
        if values_dtype not in _VALUE_DTYPES:
            raise ValueError(f"values_dtype={values_dtype!r} must be one of {sorted(_VALUE_DTYPES)}")
        if max_batch_tokens < 1 or max_batch_size < 1:
            raise ValueError(f"max_batch_tokens={max_batch_tokens} and max_batch_size={max_batch_size} must be >= 1")
        if max_restarts < 0 or max_retries < 0:
            raise ValueError(f"max_restarts={max_restarts} and max_retries={max_retries} must be >= 0")
        if not start_timeout_s > 0:
            raise ValueError(f"start_timeout_s={start_timeout_s} must be > 0")
        TeacherClient.__init__(self, None, model, None, values_dtype, max_restarts=max_restarts,
                               max_retries=max_retries)
        self.replicas, self.shards = replicas, shards
        self._owns_ray = False
        config = load_config(self.model)
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model)
        except Exception:
            self.tokenizer = None
        self.info = P.teacher_info(self.model, config, self.tokenizer)
        from distill.teacher.shard import split_layers

        split_layers(self.info.num_layers, shards)  # clear error before any actor starts
        if use_gpu is None:
            use_gpu = torch.cuda.is_available()
        if quantization is not None and not use_gpu:
            raise RuntimeError(f"quantization={quantization!r} needs CUDA GPUs (bitsandbytes); this service runs on CPU")
        self._owns_ray = join_ray(ray_address, ray_temp_dir, replicas * shards)
        try:
            check_placement(replicas * shards, use_gpu, num_cpus_per_shard)
        except TeacherUnavailable:
            self.shutdown()  # the local Ray _connect started, if any
            raise
        vocab_limit = len(self.tokenizer) if self.tokenizer is not None else None
        opts = {"name": name, "namespace": "distill_teacher"} if name else {}
        # Ray restarts the router and re-sends its calls (each a whole, idempotent request); the
        # router restarts the stage actors itself (see the module docstring).
        self._router = _Router.options(num_cpus=0, max_concurrency=10000, max_restarts=max_restarts,
                                       max_task_retries=max_retries, **opts).remote(
            self.model, replicas, shards, dtype, quantization, use_gpu, num_cpus_per_shard, max_batch_tokens,
            max_batch_size, max_retries, max_inflight_per_replica, self.info, vocab_limit, max_restarts,
            start_timeout_s)
        try:
            try:
                self.stage_info = ray.get(self._router.ready.remote(), timeout=start_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise TeacherUnavailable(
                    f"the teacher's {replicas * shards} actor(s) ({replicas} replica(s) x {shards} shard(s), "
                    f"{_actor_need(use_gpu, num_cpus_per_shard)} each) did not all start within {start_timeout_s:g} s: "
                    f"{_resources_now()}; a larger teacher may need a longer start_timeout_s, else free or add "
                    f"those resources (or lower teacher.replicas / teacher.shards)") from None
            self.faults()  # takes note of the router's pid: a later one means Ray restarted it
        except BaseException:
            self.shutdown()
            raise

    def client(self) -> TeacherClient:
        """A picklable client of this service, e.g. to hand to the other trainer ranks."""
        self._check_open()
        return TeacherClient(self._router, self.model, self.info, self.values_dtype,
                             max_restarts=self.max_restarts, max_retries=self.max_retries)

    def __reduce__(self):
        raise TypeError("a TeacherService owns its actors and is not picklable; send service.client() instead")

    def stage_handles(self) -> list[list]:
        """Actor handles, ``[replica][stage]`` (for monitoring, and for the fault-injection tests)."""
        self._check_open()
        return ray.get(self._router.stage_handles.remote())

    def shutdown(self) -> None:
        """Stop every actor of this service (and the local Ray it started, if any). Idempotent."""
        router, self._router = self._router, None
        if router is not None:
            try:
                ray.get(router.shutdown.remote(), timeout=60)
            except Exception:
                pass
            try:
                ray.kill(router, no_restart=True)
            except Exception:
                pass
        if self._owns_ray and ray.is_initialized():
            stop_ray()
            self._owns_ray = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
