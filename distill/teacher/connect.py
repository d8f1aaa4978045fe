"""One teacher service for all trainer ranks: connecting to Ray, starting the service, sharing it.

Used by every stage whose teacher is served (ICLDist's online teacher, KnowDist's
``teacher.placement=ray``). The settings object ``tcfg`` is a :class:`distill.config.RayTeacherSection`
(``ray_address``, ``ray_node_ip``, ``replicas``, ``shards``, ``num_gpus``, ``quantization``,
``max_batch_tokens``, ``max_restarts``, ``max_retries``), which the trainer's and ICLDist's ``teacher``
sections extend.

* ``ray_address="local"``: :class:`distill.teacher.local.LocalTeacher` in this process, no Ray.
* otherwise the Ray :class:`distill.teacher.ray_service.TeacherService`. Rank 0 creates it (on the
  cluster at ``ray_address``, or on a private Ray node bound to ``ray_node_ip`` when the address is
  empty); with several ranks it parks the service's router handle in a named actor and broadcasts
  the cluster address over the student process group, and every other rank attaches to the SAME
  service (one teacher for all ranks, never one per rank).
* Faults: the service restarts a dead teacher actor at most ``max_restarts`` times and re-sends a
  request at most ``max_retries`` times (:mod:`distill.teacher.ray_service`); past that,
  :func:`resolve` raises :class:`distill.teacher.TeacherUnavailable`, one line naming the actor.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future
from pathlib import Path


def _is_object_ref(x) -> bool:
    try:
        import ray

        return isinstance(x, ray.ObjectRef)
    except ImportError:
        return False


def resolve(handle):
    """Value of an ObjectRef (Ray), a Future (LocalTeacher / thread) or a plain value. A teacher actor
    that died past its budget raises :class:`distill.teacher.TeacherUnavailable` (one line)."""
    if isinstance(handle, Future):
        return handle.result()
    if _is_object_ref(handle):
        import ray

        try:
            return ray.get(handle)
        except Exception as e:
            from distill.teacher.ray_service import teacher_fault

            fault = teacher_fault(e)
            if fault is None:
                raise
            raise fault from e
    return handle


_faults_checked: dict[int, float] = {}  # id(client) -> when warn_faults last asked it


def warn_faults(client, prog: str, every_s: float = 0.0) -> None:
    """Print one ``[prog] warning: ...`` line per teacher actor restart since the last call (the Ray
    service's ``faults()``; other clients have none), asking at most every ``every_s`` seconds."""
    faults = getattr(client, "faults", None)
    if faults is None:
        return
    now = time.monotonic()
    if every_s and now - _faults_checked.get(id(client), -every_s) < every_s:
        return
    _faults_checked[id(client)] = now
    for line in faults():
        print(f"[{prog}] warning: {line}; the run goes on", flush=True)


class AttachedService:
    """A rank's view of a TeacherService created by rank 0 (same router, same replicas)."""

    def __init__(self, router, info, tokenizer, values_dtype: str):
        self._router, self.info, self.tokenizer, self.values_dtype = router, info, tokenizer, values_dtype

    def async_topk(self, sequences, positions, k, *, temperature: float = 1.0, vocab_size: int | None = None):
        from distill.teacher import pipeline as P

        sequences = [list(map(int, s)) for s in sequences]
        positions = [list(map(int, p)) for p in positions]
        P.validate_topk(self.info, sequences, positions, k, temperature=temperature, vocab_size=vocab_size)
        return self._router.topk.remote(sequences, positions, k, self.values_dtype, float(temperature), vocab_size)

    def topk(self, sequences, positions, k, *, temperature: float = 1.0, vocab_size: int | None = None):
        return resolve(self.async_topk(sequences, positions, k, temperature=temperature, vocab_size=vocab_size))

    def shutdown(self) -> None:  # rank 0 owns the service
        self._router = None


def _handoff_actor_cls():
    import ray

    @ray.remote(num_cpus=0)
    class _Handoff:
        """Holds rank 0's service router handle so other ranks can attach to it."""

        def __init__(self, box):
            self.box = box

        def get(self):
            return self.box

    return _Handoff


def _node_ip() -> dict:
    """``$RAY_NODE_IP`` (set per node by the SLURM scripts, e.g. 127.0.0.x in tests) as this driver's address."""
    ip = os.environ.get("RAY_NODE_IP", "")
    return {"_node_ip_address": ip} if ip else {}


def ray_init(tcfg, *, temp_dir: str, namespace: str) -> bool:
    """Connect to (or start) Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if tcfg.ray_address:
        # "auto" with no running cluster starts a private one; an unreachable HOST:PORT is a ConfigError
        from distill.teacher.ray_service import connect_ray

        connect_ray(tcfg.ray_address, num_cpus=max(os.cpu_count() or 1, tcfg.replicas * tcfg.shards),
                    temp_dir=temp_dir, node_ip=tcfg.ray_node_ip, namespace=namespace, **_node_ip())
    else:
        # A private Ray node on a loopback address: no traffic leaves the machine. The starter first
        # ends what a killed earlier run left in the same temp dir (distill.teacher.ray_service).
        from distill.teacher.ray_service import start_local_ray

        start_local_ray(max(os.cpu_count() or 1, tcfg.replicas * tcfg.shards), temp_dir,
                        node_ip=tcfg.ray_node_ip, namespace=namespace)
    return True


def _ray_auth() -> dict:
    """This process's Ray token-auth settings, for other ranks joining the same cluster."""
    mode = os.environ.get("RAY_AUTH_MODE", "")
    token = os.environ.get("RAY_AUTH_TOKEN", "")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if path.is_file():
            token = path.read_text().strip()
    return {"auth_mode": mode, "auth_token": token}


def close_teacher(client) -> None:
    """Shut the client's service down (rank 0) and the Ray instance this process started, if any."""
    if client is None:
        return
    client.shutdown()
    if getattr(client, "started_ray", False):
        from distill.teacher.ray_service import stop_ray

        stop_ray()


def open_teacher(tcfg, model: str, *, dtype: str, rank: int = 0, world: int = 1, broadcast=None,
                 run_id: str = "teacher", temp_dir: str, namespace: str, values_dtype: str = "bfloat16"):
    """A teacher client for this rank (see the module docstring). ``broadcast(obj)`` sends rank 0's
    object to every rank (the student process group) and returns it; needed when ``world > 1``.
    ``values_dtype``: dtype of the top-k log-probs the service ships back."""
    if tcfg.ray_address == "local":
        from distill.teacher.local import LocalTeacher

        return LocalTeacher(model, shards=tcfg.shards, dtype=dtype, quantization=tcfg.quantization or None,
                            max_batch_tokens=tcfg.max_batch_tokens)
    import ray

    name = f"handoff-{run_id}"
    if rank == 0:
        from distill.teacher.ray_service import TeacherService

        started = ray_init(tcfg, temp_dir=temp_dir, namespace=namespace)
        kwargs = dict(replicas=tcfg.replicas, shards=tcfg.shards, dtype=dtype, values_dtype=values_dtype,
                      quantization=tcfg.quantization or None, max_batch_tokens=tcfg.max_batch_tokens,
                      max_restarts=tcfg.max_restarts, max_retries=tcfg.max_retries)
        if tcfg.num_gpus >= 0:
            kwargs["use_gpu"] = tcfg.num_gpus > 0
        svc = TeacherService(model, **kwargs)
        svc.started_ray = started
        if world > 1:
            box = {"router": svc._router, "info": svc.info, "values_dtype": svc.values_dtype}
            svc.handoff = _handoff_actor_cls().options(name=name, namespace=namespace).remote(box)
            ray.get(svc.handoff.get.remote())
            address = ray.get_runtime_context().gcs_address
            broadcast({"address": address, "name": name, **_ray_auth()})
        return svc
    msg = broadcast(None)
    started = False
    if not ray.is_initialized():
        # Ray >= 2.5x clusters started by ray.init() require a token: use rank 0's (sent over the
        # student process group, which is the job's own channel).
        if msg.get("auth_mode"):
            os.environ.setdefault("RAY_AUTH_MODE", msg["auth_mode"])
        if msg.get("auth_token"):
            os.environ.setdefault("RAY_AUTH_TOKEN", msg["auth_token"])
        try:  # Ray caches its config at import: re-read it so the token mode applies (2026-11, Ray 2.60)
            from ray._raylet import Config

            Config.initialize("")
        except Exception:
            pass
        extra = _node_ip() if tcfg.ray_address else {"_node_ip_address": tcfg.ray_node_ip}  # stay on loopback
        ray.init(address=msg["address"], log_to_driver=False, namespace=namespace, **extra)
        started = True
    box = ray.get(ray.get_actor(msg["name"], namespace=namespace).get.remote())
    client = AttachedService(box["router"], box["info"], None, box["values_dtype"])
    client.started_ray = started
    return client
