"""Sequence packing: packed forward + objective == the unpacked (collate) batch, example by example.

The reference is the unpacked batch of distill.data.sft.collate run through the same tiny model;
packed positions are mapped back by plain slicing with each item's (row, offset, length).
"""

from __future__ import annotations

import pytest
import torch

from distill.data.packing import flash_attn_kwargs, pack_collate, packing_stats, plan_rows
from distill.data.sft import IGNORE_INDEX, collate
from distill.losses.objective import DistillObjective, count_targets
from distill.models.tiny import TinySize, build_tiny_causal_lm

V = 300
PAD = 2
SIZE = TinySize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176)
# (length, prompt length): a full row, a row with a pad tail, a single-example row; item 3 has no
# prompt and is packed after another example, so its first label is a real token.
SHAPES = [(9, 4), (17, 6), (12, 11), (5, 0), (3, 1)]
NO_PROMPT = 3
MAX_LEN = 20


def _items(shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, (n, p) in enumerate(shapes):
        ids = torch.randint(4, V, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:], "example_id": f"ex{k}"})
    return out


def _model(attn: str, seed: int):
    model = build_tiny_causal_lm(V, SIZE, seed=seed)
    model.config._attn_implementation = attn
    return model


def _packed_to_unpacked(x, batch, width):
    """[R, W, ...] -> [B, width, ...], zeros after each example (independent of packing.unpack)."""
    out = torch.zeros((len(batch["pack_index"]), width, *x.shape[2:]), dtype=x.dtype)
    for b, (r, off, n) in enumerate(batch["pack_index"]):
        out[b, :n] = x[r, off:off + n]
    return out


def test_layout():
    items = _items()
    batch = pack_collate(items, PAD, MAX_LEN)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (3, 20)  # rows [17+3], [12+5], [9]
    assert batch["n_tokens"] == sum(n for n, _ in SHAPES)
    assert batch["example_id"] == [it["example_id"] for it in items]
    for it, (r, off, n) in zip(items, batch["pack_index"]):
        assert batch["input_ids"][r, off:off + n].tolist() == it["input_ids"]
        assert batch["position_ids"][r, off:off + n].tolist() == list(range(n))
        assert batch["labels"][r, off].item() == IGNORE_INDEX
        assert batch["labels"][r, off + 1:off + n].tolist() == it["labels"][1:]
    r, off, n = batch["pack_index"][0]  # the 9-token item alone: pad tail of 11
    assert batch["input_ids"][r, n:].eq(PAD).all() and batch["labels"][r, n:].eq(IGNORE_INDEX).all()
    assert batch["position_ids"][r, n:].tolist() == list(range(20 - n))
    stats = packing_stats(batch)
    assert stats["rows"] == 3 and stats["tokens"] == 46 and stats["fill"] == pytest.approx(46 / 60)


def test_first_token_label_masked():
    items = _items()
    batch = pack_collate(items, PAD, MAX_LEN)
    r, off, _ = batch["pack_index"][NO_PROMPT]
    assert off > 0, "the no-prompt item must follow another example for this test to bite"
    assert count_targets(batch["labels"]) == count_targets(collate(items, PAD)["labels"])
    unmasked = batch["labels"].clone()
    unmasked[r, off] = items[NO_PROMPT]["input_ids"][0]
    assert count_targets(unmasked) == count_targets(batch["labels"]) + 1


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_matches_unpacked(attn):
    items = _items()
    student, teacher = _model(attn, seed=0), _model(attn, seed=1)
    objective = DistillObjective(kind="forward_kl", vocab_size=V, impl="torch")
    ref, pk = collate(items, PAD), pack_collate(items, PAD, MAX_LEN)
    width = ref["input_ids"].shape[1]
    normalizer = count_targets(ref["labels"])
    assert count_targets(pk["labels"]) == normalizer

    def run(batch):
        student.zero_grad(set_to_none=True)
        kw = dict(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"),
                  attention_mask=batch.get("attention_mask"), use_cache=False)
        with torch.no_grad():
            t_logits = teacher(**kw).logits
        s_logits = student(**kw).logits
        out = objective(s_logits, t_logits, batch["labels"], normalizer)
        out.loss.backward()
        grads = {k: p.grad.clone() for k, p in student.named_parameters()}
        return s_logits.detach(), t_logits, out, grads

    s_ref, t_ref, out_ref, g_ref = run(ref)
    s_pk, t_pk, out_pk, g_pk = run(pk)
    real = ref["attention_mask"].bool()
    for got, want in ((s_pk, s_ref), (t_pk, t_ref)):
        got = _packed_to_unpacked(got, pk, width)
        torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
    for f in ("loss", "ce_sum", "kd_sum"):
        torch.testing.assert_close(getattr(out_pk, f), getattr(out_ref, f), rtol=1e-5, atol=1e-6)
    assert out_pk.n_tokens.item() == out_ref.n_tokens.item() == normalizer
    assert g_pk.keys() == g_ref.keys()
    for k in g_ref:
        torch.testing.assert_close(g_pk[k], g_ref[k], rtol=1e-4, atol=1e-7, msg=k)


@pytest.mark.parametrize("extra", [{"attention_mask": "ones", "use_cache": False}, {}],
                         ids=["attention_mask", "use_cache_default"])
def test_what_breaks_packing(extra):
    """transformers detects packing only with attention_mask None AND no cache: an all-ones mask,
    or the config's default use_cache=True (the forward then makes a DynamicCache), silently lets
    the examples of a row attend to each other."""
    items = _items()
    model = _model("sdpa", seed=0)
    assert model.config.use_cache  # the default the trainer's use_cache=False overrides
    pk = pack_collate(items, PAD, MAX_LEN)
    extra = {k: torch.ones_like(pk["input_ids"]) if v == "ones" else v for k, v in extra.items()}
    with torch.no_grad():
        good = model(input_ids=pk["input_ids"], position_ids=pk["position_ids"], use_cache=False).logits
        bad = model(input_ids=pk["input_ids"], position_ids=pk["position_ids"], **extra).logits
    r, off, n = pk["pack_index"][4]  # the 3-token item, second in its row
    assert off > 0
    assert not torch.allclose(good[r, off:off + n], bad[r, off:off + n], atol=1e-3)


def test_flash_attn_kwargs_match_transformers_and_a_varlen_reference(monkeypatch):
    """The varlen kwargs equal transformers' own derivation from the flattened position ids, and a
    varlen attention driven only by them (as flash_attention_2's is) reproduces the unpacked logits."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
    from transformers.modeling_utils import AttentionInterface

    items = _items()
    pk, ref = pack_collate(items, PAD, MAX_LEN), collate(items, PAD)
    kw = flash_attn_kwargs(pk)
    (cu_q, cu_k), (mq, mk) = prepare_fa_kwargs_from_position_ids(pk["position_ids"].reshape(1, -1))
    assert kw["cu_seq_lens_q"].tolist() == cu_q.tolist() == cu_k.tolist()
    assert kw["max_length_q"] == kw["max_length_k"] == int(mq) == int(mk)

    def varlen_ref(module, q, k, v, attention_mask, scaling=None, cu_seq_lens_q=None, **_):
        assert attention_mask is None and cu_seq_lens_q is not None
        b, h, w, d = q.shape
        rep = h // k.shape[1]
        q, k, v = (x.transpose(0, 1).reshape(x.shape[1], b * w, d) for x in (q, k, v))
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        out = torch.empty_like(q)
        bounds = cu_seq_lens_q.tolist()
        for a, z in zip(bounds, bounds[1:]):
            out[:, a:z] = torch.nn.functional.scaled_dot_product_attention(
                q[:, a:z], k[:, a:z], v[:, a:z], is_causal=True, scale=scaling)
        return out.reshape(h, b, w, d).permute(1, 2, 0, 3), None

    monkeypatch.setitem(AttentionInterface._global_mapping, "test_varlen_ref", varlen_ref)
    model = _model("test_varlen_ref", seed=0)
    sdpa = _model("sdpa", seed=0)
    with torch.no_grad():
        got = model(input_ids=pk["input_ids"], position_ids=pk["position_ids"], use_cache=False, **kw).logits
        want = sdpa(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], use_cache=False).logits
    got = _packed_to_unpacked(got, pk, ref["input_ids"].shape[1])
    real = ref["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)


def test_long_item_packs_alone():
    items = _items([(4, 1), (25, 3), (6, 2), (5, 5)])
    pk = pack_collate(items, PAD, max_len=10)
    r_long = pk["pack_index"][1][0]
    assert [i for i, (r, _, _) in enumerate(pk["pack_index"]) if r == r_long] == [1]
    assert pk["input_ids"].shape[1] == 25
    used = [sum(n for rr, _, n in pk["pack_index"] if rr == r) for r in range(pk["input_ids"].shape[0])]
    assert used == [25, 15]  # the short items share one row of the 25-token capacity
    model = _model("sdpa", seed=0)
    ref = collate(items, PAD)
    with torch.no_grad():
        got = model(input_ids=pk["input_ids"], position_ids=pk["position_ids"], use_cache=False).logits
        want = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], use_cache=False).logits
    real = ref["attention_mask"].bool()
    torch.testing.assert_close(_packed_to_unpacked(got, pk, 25)[real], want[real], rtol=0, atol=1e-5)


def test_deterministic_and_first_fit_decreasing():
    items = _items()
    a, b = pack_collate(items, PAD, MAX_LEN), pack_collate([dict(it) for it in items], PAD, MAX_LEN)
    for k in ("input_ids", "labels", "position_ids"):
        assert torch.equal(a[k], b[k])
    assert a["pack_index"] == b["pack_index"]
    assert plan_rows([9, 17, 12, 5, 3], 20) == [[1, 4], [2, 3], [0]]
    assert plan_rows([5, 5, 5], 10) == [[0, 1], [2]]  # ties keep item order
    single = pack_collate(items[:1], PAD, MAX_LEN)
    assert single["input_ids"].shape == (1, 9) and single["pack_index"] == [(0, 0, 9)]


@pytest.mark.parametrize("bad, msg", [([], "empty"), ([{"input_ids": [], "labels": []}], "non-zero"),
                                      ([{"input_ids": [5, 6], "labels": [5]}], "same")])
def test_rejects_malformed(bad, msg):
    with pytest.raises(ValueError, match=msg):
        pack_collate(bad, PAD, MAX_LEN)
