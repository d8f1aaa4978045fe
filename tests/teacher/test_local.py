"""Stages and LocalTeacher (no Ray): partial loading, exactness vs the unsharded HF model, decoding."""

from __future__ import annotations

import pytest
import torch

from distill.losses.teacher_output import TopKTeacher
from distill.data.batching import plan_batches
from distill.teacher.pipeline import SamplingParams
from distill.teacher.shard import split_layers


def _random_seqs(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _padded_ref(hf, seqs, poss, k, pad):
    """Top-k of the unsharded HF model on the same right-padded batch."""
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits
    return [TopKTeacher.from_logits(logits[b, p], k) for b, p in enumerate(poss)]


def test_split_layers():
    assert split_layers(4, 2) == [(0, 2), (2, 4)]
    assert split_layers(5, 3) == [(0, 2), (2, 4), (4, 5)]
    with pytest.raises(ValueError, match="each shard needs"):
        split_layers(2, 3)


def test_make_batches_respects_token_budget():
    lengths = [5, 30, 7, 12, 30, 1]
    batches = plan_batches(lengths, batch_size=3, max_batch_tokens=60)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 60


def test_two_shards_equal_unsharded(tiny_teacher_dir):
    from distill.teacher.local import LocalTeacher

    hf = _hf(tiny_teacher_dir)
    seqs = _random_seqs([5, 9, 3, 12], hf.config.vocab_size)
    poss = [list(range(len(s))) for s in seqs]
    # One batch holding all four sequences: the same padded batch as the reference.
    teacher = LocalTeacher(tiny_teacher_dir, shards=2, values_dtype=torch.float32)
    got = teacher.topk(seqs, poss, 16)
    ref = _padded_ref(hf, seqs, poss, 16, teacher.info.pad_token_id)
    for g, r in zip(got, ref):
        assert torch.equal(g.ids, r.ids)
        assert torch.equal(g.logprobs, r.logprobs)
        assert torch.equal(g.tail_mass, r.tail_mass)
    # Default payload dtypes: int32 ids, bf16 log-probs, fp32 tail; only the requested rows.
    t = LocalTeacher(tiny_teacher_dir, shards=2).topk([seqs[1]], [[0, 4, 8]], 8)[0]
    assert t.ids.dtype == torch.int32 and t.logprobs.dtype == torch.bfloat16 and t.tail_mass.dtype == torch.float32
    assert t.ids.shape == (3, 8)
    single = _padded_ref(hf, [seqs[1]], [[0, 4, 8]], 8, 0)[0]
    assert torch.equal(t.ids, single.ids)
    torch.testing.assert_close(t.tail_mass, single.tail_mass, rtol=1e-5, atol=1e-7)


def test_stage_reads_only_its_tensors(tiny_teacher_dir, tmp_path, monkeypatch):
    """A teacher saved in several safetensors files: the first stage never opens the lm_head's file."""
    import safetensors

    from distill.teacher import shard as shard_mod

    hf = _hf(tiny_teacher_dir)
    path = tmp_path / "sharded"
    hf.save_pretrained(path, max_shard_size="100KB")
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(files) > 2 and (path / "model.safetensors.index.json").is_file()
    opened = []
    real = safetensors.safe_open

    def spy(name, *a, **kw):
        opened.append(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    stage = shard_mod.build_stage(path, shard_mod.StageSpec(0, 2, 0, 1), config=shard_mod.load_config(path))
    assert stage.embed_tokens is not None and stage.lm_head is None and len(stage.layers) == 1
    import json

    wm = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert wm["lm_head.weight"] not in {p.rsplit("/", 1)[-1] for p in opened} or wm["lm_head.weight"] == wm["model.embed_tokens.weight"]
    assert len(set(opened)) < len(files)
    # The stage's parameters equal the checkpoint's.
    torch.testing.assert_close(stage.layers[0].mlp.up_proj.weight, hf.model.layers[0].mlp.up_proj.weight, rtol=0, atol=0)


def test_qwen2_sliding_window_tied_two_shards(tmp_path, tiny_tokenizer):
    """Qwen2 with tied embeddings and sliding-window layers in the second stage: sharded == unsharded."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distill.teacher.local import LocalTeacher

    cfg = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64, use_sliding_window=True, sliding_window=4,
                      max_window_layers=2, tie_word_embeddings=True, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    seqs = _random_seqs([11, 7], cfg.vocab_size, seed=1)
    poss = [list(range(len(s))) for s in seqs]
    teacher = LocalTeacher(tmp_path, shards=2, values_dtype=torch.float32)
    got = teacher.topk(seqs, poss, 5)
    ref = _padded_ref(_hf(tmp_path), seqs, poss, 5, 2)
    for g, r in zip(got, ref):
        assert torch.equal(g.ids, r.ids)
        torch.testing.assert_close(g.logprobs, r.logprobs, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="context of 64"):
        teacher.topk([list(range(4, 70))], [[0]], 5)


def test_generate_greedy_matches_hf_and_sampling_is_batch_invariant(tiny_teacher_dir):
    from distill.teacher.local import LocalTeacher

    hf = _hf(tiny_teacher_dir)
    teacher = LocalTeacher(tiny_teacher_dir, shards=2)
    prompts = ["this movie was great", "bad", "The service was slow but the food"]
    gens = teacher.generate(prompts, SamplingParams(max_new_tokens=8))
    for p, g in zip(prompts, gens):
        ids = teacher.tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          eos_token_id=1, pad_token_id=2)[0, ids.shape[1]:].tolist()
        if 1 in out:
            assert g.finish_reason == "stop"
            out = out[: out.index(1)]
        else:
            assert g.finish_reason == "length" and len(g.token_ids) == 8
        assert g.token_ids == out
        assert g.text == teacher.tokenizer.decode(out, skip_special_tokens=True)
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9)
    together = teacher.generate(prompts, sp, seeds=[7, 8, 9])
    alone = [teacher.generate([p], sp, seeds=[s])[0] for p, s in zip(prompts, [7, 8, 9])]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    other = teacher.generate(prompts, sp, seeds=[1, 2, 3])
    assert [g.token_ids for g in other] != [g.token_ids for g in together]


def test_local_errors(tiny_teacher_dir):
    from distill.teacher.local import LocalTeacher

    teacher = LocalTeacher(tiny_teacher_dir)
    V = teacher.info.vocab_size
    with pytest.raises(ValueError, match=f"vocabulary size {V}"):
        teacher.topk([[5, 6]], [[0]], V + 1)
    with pytest.raises(ValueError, match="longer than the teacher's context"):
        teacher.topk([[5] * (teacher.info.max_context + 1)], [[0]], 4)
    with pytest.raises(ValueError, match="outside"):
        teacher.topk([[5, 6]], [[2]], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        teacher.generate(["x"], SamplingParams(max_new_tokens=0))
    teacher.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        teacher.topk([[5, 6]], [[0]], 4)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        from distill.teacher.shard import StageSpec, build_stage

        build_stage(tiny_teacher_dir, StageSpec(0, 1, 0, 2), quantization="8bit")


def test_topk_leaves_padded_rows_out_and_is_tempered(tmp_path, tiny_tokenizer):
    """A teacher with lm_head rows beyond its tokenizer (whose logits would win): LocalTeacher's top-k
    at T is the top-k of softmax(logits[:V] / T), shards or not; the padded rows never enter it."""
    from distill.models.tiny import build_tiny_causal_lm
    from distill.teacher.local import LocalTeacher
    from distill_kernels.ref import topk_of_logits_ref

    vocab = len(tiny_tokenizer)
    model = build_tiny_causal_lm(vocab + 24, "micro", seed=5)
    with torch.no_grad():
        model.lm_head.weight[vocab:] = 3.0
    model.save_pretrained(tmp_path / "padded")
    tiny_tokenizer.save_pretrained(tmp_path / "padded")
    hf = _hf(tmp_path / "padded")
    seqs = _random_seqs([6, 11], vocab)
    poss = [list(range(len(s))) for s in seqs]
    with torch.no_grad():
        full = hf(input_ids=torch.tensor([seqs[1]])).logits[0]
    assert int(full.argmax(-1).max()) >= vocab  # padded rows would win a top-1
    for shards in (1, 2):
        teacher = LocalTeacher(tmp_path / "padded", shards=shards, values_dtype=torch.float32)
        assert teacher.info.real_vocab == vocab and teacher.info.vocab_size == vocab + 24
        got = teacher.topk(seqs, poss, 8, temperature=2.0)
        _, lp, tail = topk_of_logits_ref(full, 8, temperature=2.0, vocab_size=vocab)
        assert got[1].temperature == 2.0 and int(got[1].ids.max()) < vocab
        # The same k values (near-ties may swap order) at ids that hold exactly those values.
        torch.testing.assert_close(got[1].logprobs, lp, rtol=0, atol=1e-5)
        own = torch.log_softmax(full[:, :vocab] / 2.0, -1).gather(-1, got[1].ids.long())
        torch.testing.assert_close(got[1].logprobs, own, rtol=0, atol=1e-5)
        torch.testing.assert_close(got[1].tail_mass, tail, rtol=1e-4, atol=1e-7)
        with pytest.raises(ValueError, match="temperature"):
            teacher.topk(seqs, poss, 8, temperature=0.0)
