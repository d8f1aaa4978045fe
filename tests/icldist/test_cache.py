"""Teacher top-k cache: round trip, resume after kill -9, refusal of a mismatched, format-1 or corrupt cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from distill.icldist.cache import CacheIncomplete, CacheMismatch, CacheWriter, TeacherCache
from distill.icldist.online import CachedTargets, build_cache
from distill.losses.teacher_output import TopKIdError

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
        assert got.topk.temperature == want.temperature == manifest["temperature"] == 1.0
        assert got.topk.ids.shape == (len(requests[i].pos), K)
        assert got.answer_ids == list(answers[i])
        n_fg += bool(answers[i])
    assert n_fg > 0  # fine-grained prompts (several rows each) are covered
    index = json.loads((root / "index.json").read_text())
    assert [e["shard"] for e in index["shards"]] == list(range(-(-len(requests) // 4)))


def test_mismatch_is_refused(built_cache, other_tokenizer, prompt_config):
    from distill.icldist.prompts import build_prompt_set, prompt_set_hash
    from distill.models.fingerprint import tokenizer_hash

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


def test_other_temperature_is_refused(built_cache, tmp_path):
    root, manifest, _ = built_cache
    with pytest.raises(CacheMismatch, match=r"temperature=1\.0, but this run needs temperature=2\.0"):
        TeacherCache(root, expect=dict(manifest, temperature=2.0))
    with pytest.raises(CacheMismatch, match=r"vocab_size=4096, but this run needs vocab_size=4000"):
        TeacherCache(root, expect=dict(manifest, vocab_size=4000))
    with pytest.raises(CacheMismatch, match=r"temperature=1\.0.*temperature=2\.0"):  # nor extended at another T
        CacheWriter(root, dict(manifest, temperature=2.0))


def _copy(root, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def test_format_1_cache_is_refused_with_how_to_rebuild(built_cache, tmp_path):
    root, manifest, _ = built_cache
    old = _copy(root, tmp_path)
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = 1
    del m["temperature"], m["vocab_size"]  # format 1 recorded neither
    (old / "manifest.json").write_text(json.dumps(m))
    for open_ in (lambda: TeacherCache(old, expect=manifest), lambda: TeacherCache(old),
                  lambda: CacheWriter(old, manifest)):
        with pytest.raises(CacheMismatch) as e:
            open_()
        msg = str(e.value)
        assert "\n" not in msg and "format 1" in msg
        assert "temperature 1" in msg and "padded" in msg  # why
        assert "python launchers/icldist.py --stage cache" in msg and "teacher.cache_dir" in msg  # how


@pytest.mark.parametrize("bad", ["out_of_range", "repeated"])
def test_bad_id_in_a_shard_is_refused_naming_the_file(built_cache, tmp_path, bad):
    from safetensors.torch import load_file, save_file

    root, manifest, _ = built_cache
    broken = _copy(root, tmp_path)
    f = broken / "shard-00001.safetensors"
    t = load_file(str(f))
    ids = t["ids"].clone()
    if bad == "out_of_range":
        ids[2, 3] = manifest["vocab_size"]  # a padded lm_head row, say
        want = r"top-k id 4096 at position 2 is outside the vocabulary \[0, 4096\)"
    else:
        ids[2, 3] = ids[2, 0]
        want = r"position 2 repeats top-k ids"
    t["ids"] = ids
    save_file(t, str(f))
    cache = TeacherCache(broken, expect=manifest)
    assert cache[0].topk.k == K  # shard 0 is fine and read lazily
    with pytest.raises(TopKIdError, match=rf"{re.escape(str(f))}.*{want}"):
        CachedTargets(cache)  # what training reads the cache through: refused before any step
    with pytest.raises(TopKIdError, match=rf"{re.escape(str(f))}.*{want}"):
        TeacherCache(broken, expect=manifest)[manifest["shard_size"]]  # the first prompt of shard 1


class _BadIdsClient:
    """Answers like the teacher, but with an id past the real vocabulary in the given prompt's reply."""

    def __init__(self, teacher, bad_prompt: int, vocab: int):
        self.teacher, self.bad_prompt, self.vocab, self.offset = teacher, bad_prompt, vocab, 0

    def async_topk(self, seqs, poss, k, *, temperature, vocab_size):
        out = self.teacher.topk(seqs, poss, k, temperature=temperature, vocab_size=vocab_size)
        j = self.bad_prompt - self.offset
        if 0 <= j < len(out):
            out[j].ids[0, 1] = self.vocab + 3
        self.offset += len(seqs)
        return out


def test_cache_at_temperature_2(tmp_path, local_teacher, teacher_inputs, small_prompts, tiny_tokenizer,
                                make_manifest, spy_cls, built_cache):
    """The cache asks the teacher at its temperature, stores that top-k, and hands it back carrying T."""
    requests, answers = teacher_inputs
    n = 5
    manifest = make_manifest(small_prompts[:n], tiny_tokenizer, k=K, temperature=2.0)
    spy = spy_cls(local_teacher)
    root = build_cache(spy, requests[:n], answers[:n], tmp_path / "t2", manifest, request_size=3, progress=False)
    assert {(a["temperature"], a["vocab_size"]) for a in spy.asked} == {(2.0, len(tiny_tokenizer))}
    assert json.loads((root / "manifest.json").read_text())["temperature"] == 2.0
    cache, t1 = TeacherCache(root, expect=manifest), TeacherCache(built_cache[0])
    for i in range(n):
        want = spy.seen[(tuple(requests[i].seq), tuple(requests[i].pos))]  # the teacher's reply at T=2
        got = cache[i].topk
        assert got.temperature == 2.0
        assert torch.equal(got.ids, want.ids) and torch.equal(got.logprobs, want.logprobs)
        assert torch.equal(got.tail_mass, want.tail_mass)
        assert not torch.equal(got.logprobs, t1[i].topk.logprobs)  # really another distribution than T=1
    with pytest.raises(CacheMismatch, match=r"temperature=2\.0, but this run needs temperature=1\.0"):
        TeacherCache(root, expect=dict(manifest, temperature=1.0))


def test_bad_reply_is_refused_before_its_shard_is_written(tmp_path, local_teacher, teacher_inputs, small_prompts,
                                                          tiny_tokenizer, make_manifest):
    requests, answers = teacher_inputs
    n = 8
    manifest = make_manifest(small_prompts[:n], tiny_tokenizer, k=K)
    root = tmp_path / "bad"
    client = _BadIdsClient(local_teacher, bad_prompt=5, vocab=len(tiny_tokenizer))
    shard = root / "shard-00001.safetensors"
    want = (rf"_BadIdsClient reply for cache shard 1 \({re.escape(str(shard))}\), prompts \[4, 7\), "
            rf"prompt 5: top-k id 4099 .* outside the vocabulary")
    with pytest.raises(TopKIdError, match=want):
        build_cache(client, requests[:n], answers[:n], root, manifest, request_size=3, window=1, progress=False)
    assert (root / "shard-00000.safetensors").is_file() and not shard.exists()


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


# -- the teacher fingerprint: weights, dtype, generation budget, icl.max_len (issue 11) --------------


def test_changed_teacher_settings_and_weights_are_refused(built_cache, tmp_path, micro_teacher_dir, tiny_tokenizer):
    from distill.models.fingerprint import weights_fingerprint
    from distill.models.tiny import build_tiny_causal_lm

    root, manifest, _ = built_cache
    for field, value in (("max_len", 200), ("teacher_dtype", "bfloat16"), ("max_new_tokens", 12),
                         ("teacher_quantization", "8bit")):
        with pytest.raises(CacheMismatch, match=f"built with {field}={manifest[field]!r}, but this run needs "
                                                f"{field}={value!r}"):
            TeacherCache(root, expect=dict(manifest, **{field: value}))
    teacher = tmp_path / "teacher"
    shutil.copytree(micro_teacher_dir, teacher)
    before = weights_fingerprint(teacher)
    assert "model.safetensors" in before["files"] and "config.json" in before
    cache = _copy(root, tmp_path)
    m = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps(dict(m, teacher_weights=before)))
    assert TeacherCache(cache, expect=dict(manifest, teacher_weights=weights_fingerprint(teacher)))[0].topk.k == K
    # the weights overwritten in place (same names): only sizes and mtimes say so, no GB is hashed
    build_tiny_causal_lm(len(tiny_tokenizer), "micro", seed=99).save_pretrained(teacher, safe_serialization=True)
    after = weights_fingerprint(teacher)
    with pytest.raises(CacheMismatch) as e:
        TeacherCache(cache, expect=dict(manifest, teacher_weights=after))
    msg = str(e.value)
    assert "teacher_weights.files.model.safetensors=" in msg and str(before["files"]["model.safetensors"]) in msg
    assert str(after["files"]["model.safetensors"]) in msg and "\n" not in msg


def test_format_2_cache_without_fingerprint_is_refused_with_how_to_rebuild(built_cache, tmp_path):
    root, manifest, _ = built_cache
    old = _copy(root, tmp_path)
    m = json.loads((old / "manifest.json").read_text())
    for k in ("max_len", "teacher_weights", "teacher_dtype", "teacher_quantization", "max_new_tokens"):
        del m[k]  # what a format-2 cache of before the fingerprint recorded
    (old / "manifest.json").write_text(json.dumps(m))
    for open_ in (lambda: TeacherCache(old, expect=manifest), lambda: CacheWriter(old, manifest)):
        with pytest.raises(CacheMismatch, match=r"records no max_len: .*rebuild it: delete .*--stage cache"):
            open_()


def test_answers_file_records_the_teacher(tmp_path, local_teacher, small_prompts, tiny_tokenizer, make_manifest):
    from distill.icldist.online import generate_answers
    from distill.icldist.stage import answers_fingerprint

    prompts = [p for p in small_prompts if p.kind == "fine-grained"][:2]
    fp = answers_fingerprint(make_manifest(prompts, tiny_tokenizer))
    path = tmp_path / "teacher_answers.jsonl"
    kw = dict(tokenizer=tiny_tokenizer, max_new_tokens=6, progress=False)
    first = generate_answers(local_teacher, prompts, path, fingerprint=fp, **kw)
    assert json.loads(path.read_text().splitlines()[0]) == {"fingerprint": fp} and len(first) == 2

    class NoTeacher:
        def async_generate(self, *a, **k):
            raise AssertionError("the answers on disk were asked again")

    assert generate_answers(NoTeacher(), prompts, path, fingerprint=fp, **kw) == first  # same teacher: reused
    with pytest.raises(CacheMismatch, match=r"teacher answers .* were generated with teacher='micro', but this run "
                                            r"needs teacher='other'.*delete .*teacher_answers\.jsonl"):
        generate_answers(NoTeacher(), prompts, path, fingerprint=dict(fp, teacher="other"), **kw)
    with pytest.raises(CacheMismatch, match="max_new_tokens=6, but this run needs max_new_tokens=9"):
        generate_answers(NoTeacher(), prompts, path, fingerprint=dict(fp, max_new_tokens=9), **kw)
    path.write_text("\n".join(path.read_text().splitlines()[1:]) + "\n")  # a file of before the fingerprint
    with pytest.raises(CacheMismatch, match="record no teacher fingerprint"):
        generate_answers(NoTeacher(), prompts, path, fingerprint=fp, **kw)
