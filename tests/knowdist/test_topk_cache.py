"""The offline top-k cache (distill.teacher.topk_cache, built by python -m distill.knowdist.topk_cache): training from it follows the online
co-located top-k teacher step for step (lean, logits, packed), a cache that does not fit the run is
refused before step 1 with one line naming the manifest and the field, and a rerun does nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ..trainer.conftest import read_metrics, tiny_assets, tiny_cfg_dict  # noqa: F401 - tiny_assets is a fixture

KD = {"kind": "forward_kl", "topk": 8, "temperature": 2.0}


def _cfg(assets, out_dir, **sections):
    from distill.config import RunConfig, from_dict

    sections["kd"] = {**KD, **sections.get("kd", {})}
    sections.setdefault("train", {}).setdefault("steps", 3)
    return from_dict(RunConfig, tiny_cfg_dict(assets, out_dir, **sections))


def _train(cfg):
    from distill.train.build import build_trainer

    tr = build_trainer(cfg)
    tr.train()
    return tr


def _build(assets, cache, **sections):
    from distill.teacher.topk_cache import build_topk_cache

    cfg = _cfg(assets, cache.parent / f"build-{cache.name}", **sections)
    return build_topk_cache(cfg, cache, batch_size=5, shard_examples=40)  # 96 examples: 3 shards, ragged batches


@pytest.fixture(scope="module")
def caches(tiny_assets, tmp_path_factory):  # noqa: F811 - the imported fixture
    root = tmp_path_factory.mktemp("topk_cache")
    return {"plain": _build(tiny_assets, root / "plain"),
            "packed": _build(tiny_assets, root / "packed", data={"max_len": 128})}


def _assert_same_losses(a_dir, b_dir):
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for key in ("loss", "ce", "kd", "grad_norm", "response_tokens"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=2e-5, abs=1e-6), key
    assert a[0]["kd"] > 0.01  # a real teacher signal was compared


@pytest.mark.parametrize("case", ["lean", "logits", "packed"])
def test_training_from_the_cache_equals_the_online_topk_teacher(tiny_assets, caches, tmp_path, case):  # noqa: F811
    extra = {"kd": {"path": "logits"}} if case == "logits" else {}
    if case == "packed":
        extra = {"data": {"packing": True, "max_len": 128}}
    cache = caches["packed" if case == "packed" else "plain"]
    online = _train(_cfg(tiny_assets, tmp_path / "online", **extra))
    cached = _train(_cfg(tiny_assets, tmp_path / "cached", **{**extra, "kd": {
        **extra.get("kd", {}), "teacher_backend": "cache", "cache_dir": str(cache)}}))
    assert type(cached.teacher).__name__ == "CachedTopKTeacher" and not hasattr(cached.teacher, "engine")
    if case == "packed":
        b = cached.micro_batches(0)[0]
        assert b["input_ids"].shape[0] < len(b["example_index"])  # several examples in a row
    _assert_same_losses(tmp_path / "cached", tmp_path / "online")
    assert online.teacher.topk == cached.teacher.topk == 8


def test_rows_follow_supervised_rows_order_packed_and_not(tiny_assets, caches, tmp_path):  # noqa: F811
    """rows() of a batch == the online teacher's rows, for padded and packed layouts of the same examples."""
    import torch

    from distill.data.packing import pack_collate
    from distill.data.sft import collate
    from distill.losses.lean import supervised_rows
    from distill.train.build import build_trainer

    tr = build_trainer(_cfg(tiny_assets, tmp_path / "r", kd={"teacher_backend": "cache", "cache_dir": str(caches["packed"])},
                      data={"max_len": 128}))
    online = build_trainer(_cfg(tiny_assets, tmp_path / "o", data={"max_len": 128}))
    items = [tr.batches.dataset[i] for i in (5, 17, 3, 90, 41, 60)]
    pad = tr.outputs.tokenizer.pad_token_id
    for batch in (collate(items, pad), pack_collate(items, pad, 128)):
        index, _ = supervised_rows(batch["labels"])
        got = tr.teacher.rows(batch, index)
        ref = online.teacher.rows(batch, index)
        assert torch.equal(got.ids, ref.ids.to(torch.int32))
        torch.testing.assert_close(got.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.tail_mass, ref.tail_mass, rtol=1e-5, atol=1e-6)
        full = tr.teacher(batch)  # kd.path=logits layout: the same rows at the supervised positions
        assert full.ids.shape == (*batch["labels"].shape, 8)
        assert torch.equal(full.ids.reshape(-1, 8)[index], got.ids)


def _manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def test_rerun_is_a_noop(tiny_assets, caches, monkeypatch, capsys):  # noqa: F811
    from distill.teacher import registry as trainer

    cache = caches["plain"]
    before = {f.name: f.stat().st_mtime_ns for f in cache.iterdir()}
    monkeypatch.setitem(trainer.TEACHER_BACKENDS, "colocated", lambda *a: pytest.fail("the teacher was loaded"))
    assert _build(tiny_assets, cache) == cache
    assert {f.name: f.stat().st_mtime_ns for f in cache.iterdir()} == before
    assert "nothing to do" in capsys.readouterr().err
    m = _manifest(cache)
    assert m["complete"] and m["k"] == 8 and m["temperature"] == 2.0 and m["n_examples"] == 96
    assert [s["file"] for s in m["shards"]] == [f"shard-{s:05d}.safetensors" for s in range(3)]


def test_interrupted_build_resumes(tiny_assets, caches, tmp_path):  # noqa: F811
    """A build cut after some shards (manifest not complete, a temporary left) writes only the rest."""
    import shutil

    from safetensors.torch import load_file

    cache = tmp_path / "cut"
    shutil.copytree(caches["plain"], cache)
    m = _manifest(cache)
    (cache / "manifest.json").write_text(json.dumps({k: v for k, v in m.items() if k not in ("shards", "n_rows")}
                                                    | {"complete": False}))
    (cache / "shard-00001.safetensors").rename(cache / ".shard-00001.safetensors.tmp123")
    kept = {n: (cache / n).stat().st_mtime_ns for n in ("shard-00000.safetensors", "shard-00002.safetensors")}
    _build(tiny_assets, cache)
    assert {n: (cache / n).stat().st_mtime_ns for n in kept} == kept
    assert sorted(f.name for f in cache.iterdir()) == ["manifest.json"] + [f"shard-{s:05d}.safetensors" for s in range(3)]
    assert _manifest(cache)["complete"] and _manifest(cache)["n_rows"] == m["n_rows"]
    a, b = load_file(cache / "shard-00001.safetensors"), load_file(caches["plain"] / "shard-00001.safetensors")
    assert a["ids"].equal(b["ids"]) and a["offsets"].equal(b["offsets"])


@pytest.mark.parametrize("change,field", [({"kd": {"temperature": 1.0}}, "temperature"),
                                          ({"kd": {"topk": 4}}, "k"),
                                          ({"data": {"max_len": 48}}, "data.max_len"),
                                          ({"data": {"limit": 90}}, "data.limit")])
def test_training_with_a_mismatched_cache_stops_before_step_1(tiny_assets, caches, tmp_path, change,  # noqa: F811
                                                               field):
    from distill.teacher.topk_cache import TopKCacheError
    from distill.train.build import build_trainer

    kd = {"teacher_backend": "cache", "cache_dir": str(caches["plain"]), **change.get("kd", {})}
    cfg = _cfg(tiny_assets, tmp_path / "run", **{**change, "kd": kd})
    with pytest.raises(TopKCacheError) as e:
        build_trainer(cfg)
    msg = str(e.value)
    assert "\n" not in msg and f"{caches['plain'] / 'manifest.json'}: field '{field}'" in msg
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_incomplete_and_other_tokenizer_are_one_line_errors(tiny_assets, caches, tmp_path):  # noqa: F811
    import shutil

    from distill.teacher.topk_cache import TopKCacheError
    from distill.train.build import build_trainer

    def setup_with(cache):
        return build_trainer(_cfg(tiny_assets, tmp_path / f"run-{cache.name}",
                            kd={"teacher_backend": "cache", "cache_dir": str(cache)}))

    with pytest.raises(TopKCacheError, match=r"manifest\.json: missing"):
        setup_with(tmp_path / "nowhere")
    bad = tmp_path / "incomplete"
    shutil.copytree(caches["plain"], bad)
    m = _manifest(bad)
    (bad / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    with pytest.raises(TopKCacheError, match=r"manifest\.json: field 'complete' is false"):
        setup_with(bad)
    (bad / "manifest.json").write_text(json.dumps({**m, "tokenizer": "0123456789abcdef"}))
    with pytest.raises(TopKCacheError, match=r"manifest\.json: field 'tokenizer' is '0123456789abcdef'"):
        setup_with(bad)
    (bad / "manifest.json").write_text(json.dumps(m))
    (bad / "shard-00001.safetensors").unlink()
    with pytest.raises(TopKCacheError, match=r"shard-00001\.safetensors: missing"):
        setup_with(bad)


def test_cli_builds_then_refuses_another_manifest(tiny_assets, tmp_path, launcher, capsys):  # noqa: F811
    from distill.knowdist.topk_cache import main

    d = tiny_cfg_dict(tiny_assets, tmp_path / "run", kd=KD, data={"limit": 12})
    cfg = tmp_path / "tiny_to_tiny_knowdist.yaml"
    cfg.write_text(yaml.safe_dump(d))
    out = tmp_path / "cache"
    assert main(["--config", str(cfg), "--out", str(out), "--batch-size=4"]) == 0
    m = _manifest(out)
    assert m["complete"] and m["n_examples"] == 12 and m["data"]["limit"] == 12 and m["k"] == 8
    assert main(["--config", str(cfg), f"--out={out}"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    # the module's entry point: a one-line user error (rc 2, no traceback) naming the manifest and the field
    p = launcher.run("-m distill.knowdist.topk_cache", "--config", str(cfg), "--kd.temperature=1.5", f"--out={out}")
    launcher.assert_user_error(p, str(out / "manifest.json"), "field 'temperature'")


@pytest.mark.dist
@pytest.mark.slow
def test_cache_backend_zero3_two_ranks_matches_one_rank_online(tiny_assets, caches, tmp_path):  # noqa: F811
    """2 ranks x 2 micro-batches under ZeRO-3 reading the cache == 1 rank on the whole batch with the
    online co-located top-k teacher (plain engine)."""
    pytest.importorskip("deepspeed")
    from ..trainer.conftest import run_child

    ds_json = tmp_path / "zero3_test.json"
    ds_json.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 1000,
        "reduce_bucket_size": 1000, "stage3_gather_16bit_weights_on_model_save": True}}))
    common = {"train": {"steps": 2, "warmup_steps": 0, "grad_clip": 1.0}, "kd": dict(KD)}
    ds_cfg = tiny_cfg_dict(tiny_assets, tmp_path / "zero3", **common)
    ds_cfg["train"].update(micro_batch=2, grad_accum=2)
    ds_cfg["deepspeed"] = {"engine": "deepspeed", "config": str(ds_json)}
    ds_cfg["kd"].update(teacher_backend="cache", cache_dir=str(caches["plain"]))
    out = run_child({"cfg": ds_cfg}, tmp_path, world=2)
    assert "zero_stage=3 world=2" in out[0]
    ref_cfg = tiny_cfg_dict(tiny_assets, tmp_path / "one", **common)
    ref_cfg["train"].update(micro_batch=8, grad_accum=1)
    from distill.config import RunConfig, from_dict

    _train(from_dict(RunConfig, ref_cfg))
    a, b = read_metrics(tmp_path / "zero3"), read_metrics(tmp_path / "one")
    for key in ("loss", "ce", "kd", "response_tokens"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=2e-4, abs=1e-6), key
