"""Online teacher targets with prefetch give the cache's targets (LocalTeacher and a loopback Ray service);
they are asked at the run's temperature over the real vocabulary, and a bad reply is refused where it enters."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from distill.icldist.cache import TeacherCache
from distill.icldist.online import OnlineTargets
from distill.losses.teacher_output import TopKIdError, TopKTeacher


def _cache_groups(n, shard_size=4, request_size=3):
    """The prompt groups the conftest cache sent to the teacher (same batches -> same numbers)."""
    out = []
    for a in range(0, n, shard_size):
        b = min(a + shard_size, n)
        out += [list(range(s, min(s + request_size, b))) for s in range(a, b, request_size)]
    return out


def _check_against_cache(targets: OnlineTargets, cache: TeacherCache, groups, exact: bool):
    targets.prefetch(groups[0])
    for j, g in enumerate(groups):
        if j + 1 < len(groups):
            targets.prefetch(groups[j + 1])  # next batch requested before this one is used
        got = targets.get(g)
        assert len(got) == len(g)
        for i, t in zip(g, got):
            want = cache[i].topk
            if exact:
                assert torch.equal(t.ids, want.ids) and torch.equal(t.logprobs, want.logprobs)
            else:  # another process: same math, possibly another thread count
                torch.testing.assert_close(t.logprobs.float(), want.logprobs.float(), atol=2e-2, rtol=0)
                assert (t.ids[:, 0] == want.ids[:, 0]).all()
            torch.testing.assert_close(t.tail_mass, want.tail_mass, atol=1e-4, rtol=1e-3)
    assert targets.n_requests == len(groups)  # prefetched once each, never re-requested
    targets.close()


def test_online_local_teacher_with_prefetch_equals_cache(built_cache, local_teacher, teacher_inputs):
    root, manifest, _ = built_cache
    requests, _ = teacher_inputs
    cache = TeacherCache(root, expect=manifest)
    groups = _cache_groups(len(requests))
    targets = OnlineTargets(local_teacher, requests, manifest["k"], temperature=manifest["temperature"],
                            vocab_size=manifest["vocab_size"])
    _check_against_cache(targets, cache, groups, exact=True)


@pytest.mark.ray
def test_online_ray_service_equals_cache(built_cache, micro_teacher_dir, teacher_inputs):
    from distill.icldist.config import TeacherSection
    from distill.icldist.online import close_teacher, open_teacher

    root, manifest, _ = built_cache
    requests, _ = teacher_inputs
    cache = TeacherCache(root, expect=manifest)
    client = open_teacher(TeacherSection(ray_address="", ray_node_ip="127.0.0.2", num_gpus=0, max_restarts=0),
                          str(micro_teacher_dir))
    try:
        import ray

        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.2"}  # loopback only
        targets = OnlineTargets(client, requests, manifest["k"], temperature=manifest["temperature"],
                                vocab_size=manifest["vocab_size"])
        _check_against_cache(targets, cache, _cache_groups(len(requests)), exact=False)
        # The service takes ICLDist's teacher.max_restarts: with 0, a killed router is not restarted
        # and the next request is one line naming it (not Ray's multi-line ActorDiedError).
        from distill.teacher import TeacherUnavailable

        os.kill(client.stats()["router_pid"], signal.SIGKILL)
        with pytest.raises(TeacherUnavailable, match=r"^teacher actor died: the service's router \(pid \d+, node "
                                                     r"127\.0\.0\.2\): its process died \(.*\); not restarted again "
                                                     r"\(teacher\.max_restarts spent, 0 used\)$"):
            targets.get([0, 1])
    finally:
        close_teacher(client)


@pytest.mark.parametrize("T", [0.5, 2.0])
def test_online_asks_at_the_configured_temperature(local_teacher, teacher_inputs, tiny_tokenizer, spy_cls, T):
    requests, _ = teacher_inputs
    V = len(tiny_tokenizer)
    spy = spy_cls(local_teacher)
    targets = OnlineTargets(spy, requests, 8, temperature=T, vocab_size=V)
    targets.prefetch([0, 1, 2])
    got = targets.get([0, 1, 2])
    assert spy.asked == [{"k": 8, "temperature": T, "vocab_size": V, "n": 3}]
    want1 = local_teacher.topk([r.seq for r in requests[:3]], [r.pos for r in requests[:3]], 8)  # T=1, same batch
    for t, w1 in zip(got, want1):
        assert t.temperature == T
        # The same ids (tempering is monotone); log-probs of softmax(z / T), not of softmax(z):
        # log p_T = (log p_1 + logZ_1) / T - logZ_T, so log p_T - log p_1 / T is one constant per row.
        assert torch.equal(t.ids[:, :3], w1.ids[:, :3])
        shift = t.logprobs.float() - w1.logprobs.float() / T
        torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), atol=0.25, rtol=0)  # bf16 log-probs
        assert (shift.abs() > 1).all()
    targets.close()


class _FakeClient:
    """A teacher client whose replies are given: ids from ``make_ids(n_rows, k)``, at ``temperature``."""

    def __init__(self, requests, make_ids, temperature=None):
        self.requests, self.make_ids, self.temperature = requests, make_ids, temperature

    def async_topk(self, seqs, poss, k, *, temperature, vocab_size):
        out = []
        for p in poss:
            ids = self.make_ids(len(p), k)
            lp = torch.log_softmax(torch.zeros(len(p), k + 1), -1)
            out.append(TopKTeacher(ids=ids, logprobs=lp[:, :k], tail_mass=lp[:, k].exp(),
                                   temperature=self.temperature or temperature))
        return out


@pytest.mark.parametrize("bad", ["out_of_range", "repeated", "negative"])
def test_online_reply_with_bad_ids_is_refused(teacher_inputs, bad):
    requests, _ = teacher_inputs
    V, k = 4096, 4

    def make_ids(n, k):
        ids = torch.arange(k, dtype=torch.int32).repeat(n, 1)
        ids[-1, 1] = {"out_of_range": V, "repeated": 0, "negative": -1}[bad]
        return ids

    targets = OnlineTargets(_FakeClient(requests, make_ids), requests, k, temperature=1.0, vocab_size=V)
    targets.prefetch([3, 4])
    msg = "outside the vocabulary" if bad != "repeated" else "repeats top-k ids"
    with pytest.raises(TopKIdError, match=rf"_FakeClient reply for prompts \[3, 4\], prompt 3: .*{msg}"):
        targets.get([3, 4])


def test_online_reply_at_another_temperature_is_refused(teacher_inputs):
    requests, _ = teacher_inputs

    def make_ids(n, k):
        return torch.arange(k, dtype=torch.int32).repeat(n, 1)

    targets = OnlineTargets(_FakeClient(requests, make_ids, temperature=1.0), requests, 4, temperature=2.0,
                            vocab_size=4096)
    with pytest.raises(ValueError, match=r"_FakeClient reply for prompts \[0\], prompt 0: top-k at temperature 1\.0, "
                                         r"but temperature 2\.0 was requested"):
        targets.get([0])
