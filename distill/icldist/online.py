"""The teacher side of ICLDist: connecting to the teacher, its answers, online top-k with prefetch,
and the offline cache builder.

Teacher clients (all with ``async_topk / topk / async_generate / generate / shutdown``):

* ``teacher.ray_address="local"``: :class:`distill.teacher.local.LocalTeacher` in this process.
* otherwise the Ray :class:`distill.teacher.ray_service.TeacherService`. Rank 0 creates it (on the
  cluster at ``ray_address``, or on a private Ray node bound to ``teacher.ray_node_ip`` when the
  address is empty); with several student ranks it parks the service's router handle in a named
  actor and broadcasts the cluster address over the student process group, and every other rank
  attaches to the SAME service (one teacher for all ranks, never one per rank).

Online targets (:class:`OnlineTargets`): the trainer calls ``prefetch(batch)`` for the next batches
before it trains on the current one; the top-k requests then run on the service while the student
computes. ``get`` waits only for what is not there yet; the time spent waiting is accumulated
(``wait_s``) and the trainer logs it as a fraction of the step time.

The top-k is requested AT THE TEMPERATURE OF USE (the run's ``kd.temperature``) over the teacher
tokenizer's real vocabulary, and every reply is checked where it enters (:func:`check_reply`: the
temperature it carries, ids in range and distinct), online and before a cache shard is written.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from distill.icldist.cache import CachedTarget, CacheWriter, TeacherCache, check_answers, shard_name
from distill.icldist.data import TeacherRequest
from distill.icldist.prompts import Prompt
from distill.teacher.output import TopKTeacher

HANDOFF_NAMESPACE = "distill-icldist"
RAY_TEMP_DIR = "/tmp/ray_icldist"  # the private Ray's temp dir (its records of our sessions live there too)


def _is_object_ref(x) -> bool:
    try:
        import ray

        return isinstance(x, ray.ObjectRef)
    except Exception:
        return False


def resolve(handle):
    """Value of an ObjectRef (Ray), a Future (LocalTeacher / thread) or a plain value."""
    if isinstance(handle, Future):
        return handle.result()
    if _is_object_ref(handle):
        import ray

        return ray.get(handle)
    return handle


# ---------------------------------------------------------------------------------------------------
# Clients


class _AttachedService:
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
    """``$RAY_NODE_IP`` (set per node by slurm/icldist.sh, e.g. 127.0.0.x in tests) as this driver's address."""
    ip = os.environ.get("RAY_NODE_IP", "")
    return {"_node_ip_address": ip} if ip else {}


def _ray_init(tcfg) -> bool:
    """Connect to (or start) Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if tcfg.ray_address:
        # "auto" with no running cluster starts a private one; an unreachable HOST:PORT is a ConfigError
        from distill.teacher.ray_service import connect_ray

        connect_ray(tcfg.ray_address, num_cpus=max(os.cpu_count() or 1, tcfg.replicas * tcfg.shards),
                    temp_dir=RAY_TEMP_DIR, node_ip=tcfg.ray_node_ip, namespace=HANDOFF_NAMESPACE, **_node_ip())
    else:
        # A private Ray node on a loopback address: no traffic leaves the machine. The starter first
        # ends what a killed earlier run left in the same temp dir (distill.teacher.ray_service).
        from distill.teacher.ray_service import start_local_ray

        start_local_ray(max(os.cpu_count() or 1, tcfg.replicas * tcfg.shards), RAY_TEMP_DIR,
                        node_ip=tcfg.ray_node_ip, namespace=HANDOFF_NAMESPACE)
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
    if getattr(client, "_icldist_started_ray", False):
        from distill.teacher.ray_service import stop_ray

        stop_ray()


def open_teacher(tcfg, model: str, *, rank: int = 0, world: int = 1, broadcast=None, run_id: str = "icldist"):
    """A teacher client for this rank (see the module docstring). ``broadcast(obj)`` sends rank 0's
    object to every rank (the student process group) and returns it; needed when ``world > 1``."""
    if tcfg.ray_address == "local":
        from distill.teacher.local import LocalTeacher

        return LocalTeacher(model, shards=tcfg.shards, dtype=tcfg.dtype, quantization=tcfg.quantization or None,
                            max_batch_tokens=tcfg.max_batch_tokens)
    import ray

    name = f"handoff-{run_id}"
    if rank == 0:
        from distill.teacher.ray_service import TeacherService

        started = _ray_init(tcfg)
        kwargs = dict(replicas=tcfg.replicas, shards=tcfg.shards, dtype=tcfg.dtype,
                      quantization=tcfg.quantization or None, max_batch_tokens=tcfg.max_batch_tokens)
        if tcfg.num_gpus >= 0:
            kwargs["use_gpu"] = tcfg.num_gpus > 0
        svc = TeacherService(model, **kwargs)
        svc._icldist_started_ray = started
        if world > 1:
            box = {"router": svc._router, "info": svc.info, "values_dtype": svc.values_dtype}
            svc._icldist_handoff = _handoff_actor_cls().options(name=name, namespace=HANDOFF_NAMESPACE).remote(box)
            ray.get(svc._icldist_handoff.get.remote())
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
        ray.init(address=msg["address"], log_to_driver=False, namespace=HANDOFF_NAMESPACE, **extra)
        started = True
    box = ray.get(ray.get_actor(msg["name"], namespace=HANDOFF_NAMESPACE).get.remote())
    client = _AttachedService(box["router"], box["info"], None, box["values_dtype"])
    client._icldist_started_ray = started
    return client


# ---------------------------------------------------------------------------------------------------
# Teacher answers for fine-grained prompts


def newline_token_ids(tokenizer) -> list[int]:
    """Ids of every token whose text contains a newline: the evaluation reads the first line only."""
    out = []
    for tok, i in tokenizer.get_vocab().items():
        text = tokenizer.convert_tokens_to_string([tok])
        if "\n" in text:
            out.append(int(i))
    return sorted(out)


def generate_answers(client, prompts: Sequence[Prompt], path: str | os.PathLike, *, tokenizer, max_new_tokens: int,
                     request_size: int = 32, progress: bool = True, fingerprint: dict | None = None) -> dict[str, list[int]]:
    """The teacher's greedy answer (token ids, first line) to every fine-grained prompt.

    Appends ``{"id", "answer_ids", "text", "finish_reason"}`` lines to ``path`` as requests finish, so a
    rerun after a crash only asks for the missing prompts (a torn last line is ignored). Returns
    ``{prompt id: answer ids}``. With ``fingerprint`` (the teacher's, :data:`~distill.icldist.cache.ANSWER_FIELDS`)
    the file's first line is ``{"fingerprint": ...}`` and an existing file recording another one (or
    none) is refused (:class:`~distill.icldist.cache.CacheMismatch`), so a changed teacher never
    reuses the previous teacher's answers.
    """
    from distill.teacher.pipeline import SamplingParams

    path = Path(path)
    done: dict[str, list[int]] = {}
    header = None
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if n == 0 and "fingerprint" in rec:
                    header = rec
                elif "id" in rec:
                    done[rec["id"]] = rec["answer_ids"]
        if fingerprint is not None:
            if header is None and not done:
                path.unlink()  # nothing but a torn header: start again
            else:
                check_answers(path, header, fingerprint)
    todo = [p for p in prompts if p.kind == "fine-grained" and p.id not in done]
    if fingerprint is not None and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"fingerprint": fingerprint}) + "\n")
    if not todo:
        return done
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                              stop_token_ids=newline_token_ids(tokenizer))
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="teacher answers", disable=not progress)
    with open(path, "a", encoding="utf-8") as fh:
        if fh.tell() and not path.read_bytes().endswith(b"\n"):
            fh.write("\n")
        chunks = [todo[i:i + request_size] for i in range(0, len(todo), request_size)]
        pending = [(c, client.async_generate([p.prompt for p in c], sampling)) for c in chunks[:2]]
        nxt = 2
        while pending:
            chunk, ref = pending.pop(0)
            if nxt < len(chunks):
                pending.append((chunks[nxt], client.async_generate([p.prompt for p in chunks[nxt]], sampling)))
                nxt += 1
            for p, g in zip(chunk, resolve(ref)):
                ids = list(g.token_ids)
                if not ids:  # an empty answer still needs one target token: the teacher's stop token
                    ids = [tokenizer.eos_token_id]
                done[p.id] = ids
                fh.write(json.dumps({"id": p.id, "answer_ids": ids, "text": g.text, "finish_reason": g.finish_reason}) + "\n")
            fh.flush()
            bar.update(len(chunk))
    bar.close()
    return done


# ---------------------------------------------------------------------------------------------------
# Targets: online (prefetched) and cached


def _ids_text(ids: Sequence[int]) -> str:
    ids = list(ids)
    return str(ids) if len(ids) <= 8 else f"[{', '.join(map(str, ids[:8]))}, ... ({len(ids)} prompts)]"


def check_reply(topks, prompts: Sequence[int], *, temperature: float, vocab_size: int,
                source: str) -> list[TopKTeacher]:
    """Refuse a teacher reply that is not one top-k teacher per prompt of ``prompts``, at
    ``temperature``, with ids in ``[0, vocab_size)`` and distinct per position.

    ``source`` names where the reply came from (the client, the request); raises ValueError
    (:class:`~distill.teacher.output.TopKIdError` for the ids) before anything indexes with it.
    """
    topks, prompts = list(topks), list(prompts)
    if len(topks) != len(prompts):
        raise ValueError(f"{source}: {len(topks)} top-k teachers for {len(prompts)} prompts")
    for i, t in zip(prompts, topks):
        if not isinstance(t, TopKTeacher):
            raise ValueError(f"{source}, prompt {i}: a {type(t).__name__}, not a TopKTeacher")
        if t.temperature != float(temperature):
            raise ValueError(f"{source}, prompt {i}: top-k at temperature {t.temperature}, but temperature "
                             f"{float(temperature)} was requested (a top-k is valid only at its own temperature)")
        t.check(vocab_size, source=f"{source}, prompt {i}")
    return topks


class OnlineTargets:
    """Top-k per prompt from the live service, requested ahead of use.

    ``temperature``: the run's KD temperature, the one the losses use (the teacher's top-k is taken
    at it); ``vocab_size``: the teacher tokenizer's real vocabulary (the top-k is taken over it and
    the reply's ids are checked against it).
    """

    def __init__(self, client, requests: Sequence[TeacherRequest], k: int, *, temperature: float, vocab_size: int):
        self.client, self.requests, self.k = client, requests, k
        self.temperature, self.vocab_size = float(temperature), int(vocab_size)
        self._pending: dict[tuple[int, ...], object] = {}
        self._pool = None
        self.wait_s = 0.0
        self.n_requests = 0

    def _submit(self, ids: tuple[int, ...]):
        seqs = [self.requests[i].seq for i in ids]
        poss = [self.requests[i].pos for i in ids]
        self.n_requests += 1
        kw = dict(temperature=self.temperature, vocab_size=self.vocab_size)
        if type(self.client).__name__ != "LocalTeacher":
            return self.client.async_topk(seqs, poss, self.k, **kw)  # an ObjectRef: already asynchronous
        # An in-process teacher computes eagerly: run it on a worker thread so it overlaps the step.
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="icldist-teacher")
        return self._pool.submit(self.client.topk, seqs, poss, self.k, **kw)

    def prefetch(self, ids: Sequence[int]) -> None:
        key = tuple(int(i) for i in ids)
        if key not in self._pending:
            self._pending[key] = self._submit(key)

    def get(self, ids: Sequence[int]) -> list[TopKTeacher]:
        key = tuple(int(i) for i in ids)
        handle = self._pending.pop(key, None)
        if handle is None:
            handle = self._submit(key)
        t0 = time.perf_counter()
        out = resolve(handle)
        self.wait_s += time.perf_counter() - t0
        return check_reply(out, key, temperature=self.temperature, vocab_size=self.vocab_size,
                           source=f"{type(self.client).__name__} reply for prompts {_ids_text(key)}")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class CachedTargets:
    """Top-k per prompt read back from a :class:`TeacherCache` (no teacher running).

    Every shard is loaded and its ids checked here, so a bad shard stops the run before any step;
    the top-k carry the cache's temperature (the manifest check made it the run's).
    """

    def __init__(self, cache: TeacherCache):
        self.cache = cache
        cache.verify()
        self.wait_s = 0.0
        self.n_requests = 0

    def prefetch(self, ids) -> None:
        pass

    def get(self, ids: Sequence[int]) -> list[TopKTeacher]:
        t0 = time.perf_counter()
        out = [self.cache[int(i)].topk for i in ids]
        self.wait_s += time.perf_counter() - t0
        return out

    def close(self) -> None:
        pass


def build_cache(client, requests: Sequence[TeacherRequest], answers: Sequence[list[int]], root, manifest: dict, *,
                request_size: int = 32, window: int = 4, progress: bool = True) -> Path:
    """Write the teacher's top-k for every request to ``root`` (resumable, see distill.icldist.cache).

    The top-k is requested at ``manifest["temperature"]`` over ``manifest["vocab_size"]`` tokens, and
    each reply is checked (:func:`check_reply`) before its shard is written.
    """
    from tqdm import tqdm

    writer = CacheWriter(root, manifest)
    k = manifest["k"]
    temperature, vocab = float(manifest["temperature"]), int(manifest["vocab_size"])
    done = writer.done_shards()
    todo = [s for s in range(writer.n_shards) if s not in done]
    bar = tqdm(total=writer.n_shards, initial=writer.n_shards - len(todo), desc="teacher cache", unit="shard",
               disable=not progress)

    def submit(s):
        start, end = writer.shard_range(s)
        refs = []
        for a in range(start, end, request_size):
            b = min(a + request_size, end)
            refs.append((a, b, client.async_topk([requests[i].seq for i in range(a, b)],
                                                 [requests[i].pos for i in range(a, b)], k,
                                                 temperature=temperature, vocab_size=vocab)))
        return s, refs

    pending = [submit(s) for s in todo[:window]]
    nxt = window
    while pending:
        s, refs = pending.pop(0)
        if nxt < len(todo):
            pending.append(submit(todo[nxt]))
            nxt += 1
        shard_file = writer.root / f"{shard_name(s)}.safetensors"
        topks = []
        for a, b, r in refs:
            source = f"{type(client).__name__} reply for cache shard {s} ({shard_file}), prompts [{a}, {b})"
            topks += check_reply(resolve(r), range(a, b), temperature=temperature, vocab_size=vocab, source=source)
        start, end = writer.shard_range(s)
        writer.write_shard(s, [CachedTarget(t, list(answers[i])) for t, i in zip(topks, range(start, end))])
        bar.update(1)
    bar.close()
    writer.finalize()
    return writer.root
