"""Teacher top-k cache: round trip, resume after kill -9, refusal of a mismatched cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from distill.icldist.cache import CacheIncomplete, CacheMismatch, CacheWriter, TeacherCache
from distill.icldist.online import build_cache

K = 8  # the conftest cache's k


def test_round_trip_equals_teacher_topk(built_cache, teacher_inputs):
    root, manifest, seen = built_cache
    requests, answers = teacher_inputs
    cache = TeacherCache(root, expect=manifest)
    assert len(cache) == len(requests)
    n_fg = 0
    for i in range(len(cache)):
        got, want = cache[i], seen[(tuple(requests[i].seq), tuple(requests[i].pos))]
        assert torch.equal(got.topk.ids, want.ids)
        assert torch.equal(got.topk.logprobs, want.logprobs)
        assert torch.equal(got.topk.tail_mass, want.tail_mass)
        assert got.topk.ids.shape == (len(requests[i].pos), K)
        assert got.answer_ids == list(answers[i])
        n_fg += bool(answers[i])
    assert n_fg > 0  # fine-grained prompts (several rows each) are covered
    index = json.loads((root / "index.json").read_text())
    assert [e["shard"] for e in index["shards"]] == list(range(-(-len(requests) // 4)))


def test_mismatch_is_refused(built_cache, other_tokenizer, prompt_config):
    from distill.icldist.prompts import build_prompt_set, prompt_set_hash
    from distill.icldist.targets import tokenizer_hash

    root, manifest, _ = built_cache
    with pytest.raises(CacheMismatch, match=r"k=8.*k=16"):
        TeacherCache(root, expect=dict(manifest, k=16))
    with pytest.raises(CacheMismatch, match="tokenizer_hash"):
        TeacherCache(root, expect=dict(manifest, tokenizer_hash=tokenizer_hash(other_tokenizer)))
    other = prompt_set_hash(build_prompt_set(prompt_config(seed=99)))
    with pytest.raises(CacheMismatch, match="prompt_set_hash"):
        TeacherCache(root, expect=dict(manifest, prompt_set_hash=other))
    with pytest.raises(CacheMismatch, match="teacher='micro'"):
        TeacherCache(root, expect=dict(manifest, teacher="another/teacher"))
    # extending the folder with another prompt set is refused too (nothing overwritten)
    with pytest.raises(CacheMismatch, match="prompt_set_hash"):
        CacheWriter(root, dict(manifest, prompt_set_hash=other))
    assert TeacherCache(root, expect=manifest)[0].topk.k == K


_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from distill.icldist import cache as C
    from distill.icldist.data import TeacherRequest
    from distill.icldist.online import build_cache
    from distill.teacher.local import LocalTeacher

    spec = json.load(open(sys.argv[1]))
    real = C.CacheWriter.write_shard

    def write_shard(self, s, targets):
        meta = real(self, s, targets)
        print("WROTE", s, flush=True)
        if s == 1:
            time.sleep(600)  # killed here
        return meta

    C.CacheWriter.write_shard = write_shard
    reqs = [TeacherRequest(**r) for r in spec["requests"]]
    build_cache(LocalTeacher(spec["teacher"]), reqs, spec["answers"], spec["root"], spec["manifest"],
                request_size=3, window=1, progress=False)
    """
)


def test_resume_after_kill_9(tmp_path, micro_teacher_dir, local_teacher, teacher_inputs, small_prompts,
                             tiny_tokenizer, make_manifest, built_cache):
    requests, answers = teacher_inputs
    root = tmp_path / "c"
    manifest = make_manifest(small_prompts, tiny_tokenizer, k=K)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"teacher": str(micro_teacher_dir), "root": str(root), "manifest": manifest,
                                "answers": answers, "requests": [{"seq": r.seq, "pos": r.pos} for r in requests]}))
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(spec)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "WROTE 1":
                break
        else:
            pytest.fail(f"cache child exited early with {proc.wait()}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(CacheIncomplete):
        TeacherCache(root, expect=manifest)
    kept = {s: os.stat(root / f"shard-{s:05d}.safetensors") for s in (0, 1)}
    # debris of an interrupted write: a temporary file and a shard without its index entry
    (root / "shard-00002.safetensors.tmp").write_bytes(b"torn")
    (root / "shard-00003.safetensors").write_bytes(b"no index entry")

    build_cache(local_teacher, requests, answers, root, manifest, request_size=3, progress=False)

    for s, st in kept.items():  # finished shards were kept, not redone
        now = os.stat(root / f"shard-{s:05d}.safetensors")
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    n_shards = -(-len(requests) // 4)
    files = sorted(p.name for p in root.iterdir() if p.suffix == ".safetensors")
    assert files == [f"shard-{s:05d}.safetensors" for s in range(n_shards)]
    assert not list(root.glob("*.tmp"))
    resumed, clean = TeacherCache(root, expect=manifest), TeacherCache(built_cache[0], expect=manifest)
    for i in range(len(requests)):
        assert torch.equal(resumed[i].topk.ids, clean[i].topk.ids)
        assert torch.equal(resumed[i].topk.logprobs, clean[i].topk.logprobs)
        assert resumed[i].answer_ids == clean[i].answer_ids
