"""The Ray teacher service on a loopback-only local Ray: exactness, replicas, fault tolerance, errors.

One service (2 replicas x 2 shards, 4 stage actors) serves every test of this module: starting actors
is what costs time on a 2-core machine.
"""

from __future__ import annotations

import time

import pytest
import torch

from distill.teacher.pipeline import SamplingParams

pytestmark = pytest.mark.ray

BATCH = 2  # sequences per batch: many batches, so work visibly spreads and a kill lands mid-run


@pytest.fixture(scope="module")
def service(ray_session, tiny_teacher_dir):
    from distill.teacher.ray_service import TeacherService

    svc = TeacherService(tiny_teacher_dir, replicas=2, shards=2, values_dtype="float32", max_batch_size=BATCH)
    yield svc
    svc.shutdown()


class _OneThread:
    """The unsharded teacher in-process, batching like the service and, like each stage actor
    (num_cpus=1), on one thread: CPU GEMMs block by thread count, so only then are results bitwise equal."""

    def __init__(self, teacher):
        self.teacher = teacher

    def __getattr__(self, name):
        fn = getattr(self.teacher, name)

        def call(*a, **kw):
            n = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return fn(*a, **kw)
            finally:
                torch.set_num_threads(n)

        return call


@pytest.fixture(scope="module")
def local_ref(tiny_teacher_dir):
    from distill.teacher.local import LocalTeacher

    return _OneThread(LocalTeacher(tiny_teacher_dir, shards=1, values_dtype=torch.float32, max_batch_size=BATCH))


def _seqs(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 24, (n,), generator=g).tolist()
    return [torch.randint(4, vocab, (L,), generator=g).tolist() for L in lengths]


def test_two_shards_exactly_match_unsharded(service, local_ref):
    assert [len(r) for r in service.stage_info] == [2, 2]
    assert service.stage_info[0][0]["layers"] == (0, 1) and service.stage_info[0][1]["layers"] == (1, 2)
    seqs = _seqs(6, service.info.vocab_size)
    poss = [list(range(0, len(s), 2)) for s in seqs]
    got = service.topk(seqs, poss, 16)
    ref = local_ref.topk(seqs, poss, 16)
    assert len(got) == len(seqs)
    for g, r, p in zip(got, ref, poss):
        assert g.ids.shape == (len(p), 16) and g.ids.dtype == torch.int32
        assert torch.equal(g.ids, r.ids)
        assert torch.equal(g.logprobs, r.logprobs)
        assert torch.equal(g.tail_mass, r.tail_mass)


def test_topk_at_temperature_over_the_real_vocabulary_matches_local(service, local_ref):
    """The service's top-k at T over the first vocab_size tokens equals LocalTeacher's, and carries T."""
    seqs = _seqs(3, service.info.vocab_size, seed=7)
    poss = [list(range(len(s))) for s in seqs]
    vocab = service.info.real_vocab - 5
    got = service.topk(seqs, poss, 8, temperature=2.0, vocab_size=vocab)
    ref = local_ref.topk(seqs, poss, 8, temperature=2.0, vocab_size=vocab)
    for g, r in zip(got, ref):
        assert g.temperature == 2.0 and int(g.ids.max()) < vocab
        assert torch.equal(g.ids, r.ids) and torch.equal(g.logprobs, r.logprobs)
        assert torch.equal(g.tail_mass, r.tail_mass)


def test_two_replicas_split_the_work(service):
    before = service.stats()
    seqs = _seqs(16, service.info.vocab_size, seed=1)
    service.topk(seqs, [[len(s) - 1] for s in seqs], 4)
    after = service.stats()
    per = [a - b for a, b in zip(after["batches_per_replica"], before["batches_per_replica"])]
    assert sum(per) == after["batches"] - before["batches"] == 8
    assert min(per) >= 1, per


def test_generate_matches_local(service, local_ref):
    prompts = ["this movie was great", "bad", "the food was cold and the staff"]
    sp = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9)
    got = service.generate(prompts, sp, seeds=[3, 4, 5])
    ref = local_ref.generate(prompts, sp, seeds=[3, 4, 5])
    assert [(g.token_ids, g.finish_reason, g.text) for g in got] == [(r.token_ids, r.finish_reason, r.text) for r in ref]


def test_harvest_through_the_service_equals_local(service, tiny_teacher_dir, sentibench_texts, tmp_path):
    """KnowDist harvesting with the Ray service writes the same corpus as with the local teacher."""
    import json

    from distill.config import load_config
    from distill.knowdist.harvest import HarvestConfig, harvest, load_corpus

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentibench_texts[:6]))
    stop = ",".join(str(i) for i in range(4, 1024))

    def cfg(out, backend):
        return load_config(HarvestConfig, [
            "--input.source=jsonl", f"--input.path={texts}", f"--teacher.model={tiny_teacher_dir}",
            f"--teacher.backend={backend}", "--perspectives.names=overall polarity,irony",
            f"--sampling.stop_token_ids={stop}", "--sampling.max_new_tokens=5", "--sampling.temperature=1.0",
            f"--output.dir={out}", "--output.shard_size=4", "--output.progress=false"])[0]

    via_ray = load_corpus(harvest(cfg(tmp_path / "ray", "ray"), teacher=service, model_name=str(tiny_teacher_dir)))
    local = load_corpus(harvest(cfg(tmp_path / "local", "local")))
    assert via_ray == local and len(local) > 0


def test_killed_actor_loses_nothing_and_duplicates_nothing(ray_session, service, local_ref):
    ray = ray_session
    seqs = _seqs(40, service.info.vocab_size, seed=2)
    poss = [list(range(len(s))) for s in seqs]
    ref = local_ref.topk(seqs, poss, 8)
    before = service.stats()
    victim = service.stage_handles()[0][1]  # replica 0, last stage
    pending = service.async_topk(seqs, poss, 8)
    deadline = time.time() + 60
    while service.stats()["batches"] - before["batches"] < 2 and time.time() < deadline:
        time.sleep(0.02)
    ray.kill(victim, no_restart=True)
    got = ray.get(pending, timeout=300)
    after = service.stats()
    assert after["restarts"] >= before["restarts"] + 1
    # One line says which actor died and that its replica was restarted (the harvest prints it).
    (line,) = service.faults()
    assert line.startswith(f"teacher actor died: replica 0, stage 2 of 2 (pid {service.stage_info[0][1]['pid']}, "
                           f"node 127.0.0.2): "), line
    assert line.endswith("; restarted the replica (restart 1 of teacher.max_restarts=3) and re-sent its batches"), line
    assert after["retried_batches"] >= before["retried_batches"] + 1
    # Every sequence scored exactly once, with the right values.
    assert after["sequences"] - before["sequences"] == len(seqs)
    assert after["batches"] - before["batches"] == len(seqs) // BATCH
    assert len(got) == len(seqs)
    for g, r in zip(got, ref):
        assert torch.equal(g.ids, r.ids) and torch.equal(g.logprobs, r.logprobs)
    # The restarted replica serves again.
    assert service.stage_handles()[0][1] != victim
    assert torch.equal(service.topk(seqs[:2], poss[:2], 8)[1].ids, ref[1].ids)


def test_client_serves_another_process(ray_session, service):
    """service.client() pickles to other processes (trainer ranks) and reaches the same replicas."""
    import pickle

    from distill.teacher.ray_service import TeacherClient

    ray = ray_session
    seqs = _seqs(3, service.info.vocab_size, seed=3)
    poss = [[0, len(s) - 1] for s in seqs]

    @ray.remote(num_cpus=0)
    def score(client, seqs, poss):
        return client.topk(seqs, poss, 4)

    got = ray.get(score.remote(service.client(), seqs, poss), timeout=300)
    ref = service.topk(seqs, poss, 4)
    assert all(torch.equal(g.ids, r.ids) and torch.equal(g.logprobs, r.logprobs) for g, r in zip(got, ref))
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(service)
    with pytest.raises(RuntimeError, match="no teacher service named"):
        TeacherClient.connect("no-such-teacher")


def test_errors(service):
    V = service.info.vocab_size
    with pytest.raises(ValueError, match=f"vocabulary size {V}"):
        service.async_topk([[5, 6, 7]], [[0]], V + 1)
    with pytest.raises(ValueError, match="longer than the teacher's context"):
        service.async_topk([[5] * (service.info.max_context + 1)], [[0]], 4)
    with pytest.raises(ValueError, match="outside the teacher's vocabulary"):
        service.async_topk([[5, V]], [[0]], 4)


def test_placement_checked_first_and_the_start_wait_bounded(service, tiny_teacher_dir):
    """Actors the cluster cannot hold are refused before any is created (ICLDist's shipped configs ask
    for a GPU per actor: on a node without GPUs the run waited for ever), and a start that does not
    finish within start_timeout_s ends in one line saying what Ray has; the running service is untouched."""
    import ray

    from distill.errors import one_line
    from distill.teacher.ray_service import TeacherService, TeacherUnavailable

    before = len([a for a in ray.util.list_named_actors(all_namespaces=True)])
    with pytest.raises(TeacherUnavailable) as e:
        TeacherService(tiny_teacher_dir, replicas=2, use_gpu=True)
    msg = str(e.value)
    assert msg == one_line(msg)
    assert msg.startswith("2 teacher actor(s) need 1 GPU each, but the nodes can hold 0: Ray sees 1 node(s) with 0 GPU(s)")
    assert "teacher.num_gpus=0" in msg
    t0 = time.time()
    with pytest.raises(TeacherUnavailable, match=r"did not all start within 0.01 s: Ray sees 1 node\(s\)"):
        TeacherService(tiny_teacher_dir, start_timeout_s=0.01)
    assert time.time() - t0 < 60
    assert len(ray.util.list_named_actors(all_namespaces=True)) == before
    assert service.topk([[5, 6, 7]], [[2]], 3)[0].ids.shape == (1, 3)


def test_call_after_shutdown_is_a_clear_error(service, tiny_teacher_dir):
    """Runs last in this module: it shuts the module's service down."""
    from distill.teacher.ray_service import TeacherService

    with pytest.raises(ValueError, match="each shard needs"):
        TeacherService(tiny_teacher_dir, shards=3)
    assert service.topk([[5, 6, 7]], [[2]], 3)[0].ids.shape == (1, 3)
    service.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        service.async_topk([[5, 6, 7]], [[2]], 3)
    with pytest.raises(RuntimeError, match="shut down"):
        service.generate(["hello"])
    service.shutdown()  # idempotent
