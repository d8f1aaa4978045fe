"""Online teacher targets with prefetch give the cache's targets (LocalTeacher and a loopback Ray service)."""

from __future__ import annotations

import pytest
import torch

from distill.icldist.cache import TeacherCache
from distill.icldist.online import OnlineTargets


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
    _check_against_cache(OnlineTargets(local_teacher, requests, manifest["k"]), cache, groups, exact=True)


@pytest.mark.ray
def test_online_ray_service_equals_cache(built_cache, micro_teacher_dir, teacher_inputs):
    from distill.icldist.config import TeacherSection
    from distill.icldist.online import close_teacher, open_teacher

    root, manifest, _ = built_cache
    requests, _ = teacher_inputs
    cache = TeacherCache(root, expect=manifest)
    client = open_teacher(TeacherSection(ray_address="", ray_node_ip="127.0.0.2", num_gpus=0), str(micro_teacher_dir))
    try:
        import ray

        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.2"}  # loopback only
        targets = OnlineTargets(client, requests, manifest["k"])
        _check_against_cache(targets, cache, _cache_groups(len(requests)), exact=False)
    finally:
        close_teacher(client)
