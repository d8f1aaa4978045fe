"""The teacher side of ICLDist: connecting to the teacher, its answers, online top-k with prefetch,
and the offline cache builder.

Teacher clients (all with ``async_topk / topk / async_generate / generate / shutdown``) come from
:func:`distill.teacher.connect.open_teacher`: ``teacher.ray_address="local"`` runs it in this
process, otherwise rank 0 starts one Ray service that every rank shares; ``teacher.engine=vllm``
gives each rank a vLLM engine in its process instead.

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from distill.icldist.cache import CachedTarget, CacheWriter, TeacherCache, check_answers, shard_name
from distill.icldist.data import TeacherRequest
from distill.icldist.prompts import Prompt
from distill.teacher import connect
from distill.teacher.connect import close_teacher, resolve
from distill.losses.teacher_output import TopKTeacher

HANDOFF_NAMESPACE = "distill-icldist"
RAY_TEMP_DIR = "/tmp/ray_icldist"  # the private Ray's temp dir (its records of our sessions live there too)


def open_teacher(tcfg, model: str, *, rank: int = 0, world: int = 1, broadcast=None, run_id: str = "icldist"):
    """ICLDist's teacher client for this rank (:func:`distill.teacher.connect.open_teacher`: one
    service for all ranks), in ICLDist's Ray namespace and temp dir; with ``teacher.engine=vllm`` a vLLM
    engine in this rank's process (:class:`distill.teacher.vllm_engine.VLLMEngine`, the same calls)."""
    if getattr(tcfg, "engine", "hf") == "vllm":
        from distill.teacher.vllm_engine import VLLMEngine

        return VLLMEngine(model, tcfg.vllm, dtype=tcfg.dtype, max_logprobs=tcfg.k, key="teacher.engine")
    return connect.open_teacher(tcfg, model, dtype=tcfg.dtype, rank=rank, world=world, broadcast=broadcast,
                                run_id=run_id, temp_dir=RAY_TEMP_DIR, namespace=HANDOFF_NAMESPACE)


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
    from distill.progress import progress as progress_bar

    bar = progress_bar(len(todo), "teacher answers", disable=not progress)
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
            connect.warn_faults(client, "icldist")
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
    (:class:`~distill.losses.teacher_output.TopKIdError` for the ids) before anything indexes with it.
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
        connect.warn_faults(self.client, "icldist", every_s=30.0)
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
    from distill.progress import progress as progress_bar

    writer = CacheWriter(root, manifest)
    k = manifest["k"]
    temperature, vocab = float(manifest["temperature"]), int(manifest["vocab_size"])
    done = writer.done_shards()
    todo = [s for s in range(writer.n_shards) if s not in done]
    bar = progress_bar(writer.n_shards, "teacher cache", initial=writer.n_shards - len(todo), unit="shard",
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
        connect.warn_faults(client, "icldist")
        bar.update(1)
    bar.close()
    writer.finalize()
    return writer.root
