"""Several teachers through the trainer (plain engine, tiny models built in-process): fixed (1, 0)
is the single-teacher run, routing, the logits path, checkpoints (the gate and the meta weights
resume exactly; exports hold no gate), the per-teacher weights logged, config errors."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import mt_cfg_dict, read_metrics


def _trainer(d):
    from distill.config import RunConfig, from_dict
    from distill.multiteacher.stage import make_trainer

    cfg = from_dict(RunConfig, d)
    cfg.validate()
    return make_trainer(cfg)


def _train(d):
    tr = _trainer(d)
    tr.train()
    return tr


def _weights(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _assert_same_metrics(a, b, keys=("loss", "ce", "kd", "grad_norm", "response_tokens"), rel=2e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for key in keys:
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=rel, abs=1e-6), key


def test_fixed_one_zero_equals_the_single_teacher_run(mt_assets, tmp_path, capsys):
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    teachers = [{"name": "good", "path": mt_assets["good"], "temperature": 2.0, "weight": 1.0},
                {"name": "noise", "path": mt_assets["noise"], "weight": 0.0}]
    multi = _train(mt_cfg_dict(mt_assets, tmp_path / "multi", teachers=teachers, kd={"temperature": 2.0}))
    assert multi.teacher.children[1] is None  # a weight-0 teacher is not run
    single = mt_cfg_dict(mt_assets, tmp_path / "single", kd={"temperature": 2.0, "teacher_backend": "colocated"})
    single.pop("multiteacher")
    build_trainer(from_dict(RunConfig, single)).train()
    a, b = read_metrics(tmp_path / "multi"), read_metrics(tmp_path / "single")
    _assert_same_metrics(a, b)
    assert a[0]["kd"] > 0.01 and all(r["w_good"] == pytest.approx(1.0) and r["w_noise"] == 0.0 for r in a)
    wa, wb = _weights(tmp_path / "multi" / "export"), _weights(tmp_path / "single" / "export")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    assert "| w good=1.00 noise=0.00" in capsys.readouterr().out  # on the progress line


def test_route_column(mt_assets, tmp_path):
    """Every example routed to `good` is the fixed (1, 0) run; a mixed routing logs each teacher's
    share of the supervised rows."""
    recs = [json.loads(x) for x in open(mt_assets["data"])]
    for name, pick in (("all", lambda i: "good"), ("mixed", lambda i: ["good", 1][i % 2])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r | {"teacher_id": pick(i)}) + "\n" for i, r in enumerate(recs)))
        _train(mt_cfg_dict(mt_assets, tmp_path / name, "route", train={"steps": 3},
                           data={"name": "sft_routed", "path": str(path)}))
    fixed = mt_cfg_dict(mt_assets, tmp_path / "fixed", train={"steps": 3}, teachers=[
        {"name": "good", "path": mt_assets["good"]}, {"name": "noise", "path": mt_assets["noise"], "weight": 0.0}])
    _train(fixed)
    _assert_same_metrics(read_metrics(tmp_path / "all"), read_metrics(tmp_path / "fixed"))
    mixed = read_metrics(tmp_path / "mixed")
    assert all(0.0 < r["w_noise"] < 1.0 and r["w_good"] + r["w_noise"] == pytest.approx(1.0) for r in mixed)


@pytest.mark.parametrize("weighting", ["fixed", "confidence"])
def test_logits_path_matches_lean(mt_assets, tmp_path, weighting):
    for path in ("lean", "logits"):
        _train(mt_cfg_dict(mt_assets, tmp_path / path, weighting, train={"steps": 2},
                           kd={"path": path}, multiteacher={"confidence": {"signal": "neg_entropy"}}))
    a, b = read_metrics(tmp_path / "lean"), read_metrics(tmp_path / "logits")
    _assert_same_metrics(a, b, keys=("loss", "ce", "kd", "grad_norm", "w_good", "kd_noise"))


@pytest.mark.parametrize("weighting", ["attention", "meta"])
def test_checkpoint_resume_reproduces_learned_weights(mt_assets, tmp_path, weighting):
    from safetensors import safe_open

    from distill.multiteacher.weighting import GATE_NAME

    knobs = {"meta": {"every": 2, "heldout_path": mt_assets["heldout"], "heldout_batch": 4}}
    d = mt_cfg_dict(mt_assets, tmp_path / "a", weighting, checkpoint={"every": 3}, multiteacher=knobs)
    a = _train(d)
    b_dict = mt_cfg_dict(mt_assets, tmp_path / "b", weighting, multiteacher=knobs,
                         checkpoint={"resume": str(tmp_path / "a" / "checkpoints" / "step_00000003")})
    b = _train(b_dict)
    assert b.history[0]["step"] == 4
    _assert_same_metrics(read_metrics(tmp_path / "a")[3:], read_metrics(tmp_path / "b"),
                         keys=("loss", "kd", "grad_norm", "w_good"), rel=1e-6)
    if weighting == "attention":
        ga = getattr(a.engine.module, GATE_NAME).state_dict()
        gb = getattr(b.engine.module, GATE_NAME).state_dict()
        assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
        assert any(float(v.abs().max()) > 0 for v in ga.values())  # trained away from its zero init
        assert a.engine.optimizer.param_groups[0]["params"][-1] is getattr(a.engine.module, GATE_NAME).out.bias
    else:
        sa, sb = a.callbacks[0].strategy.state_dict(), b.callbacks[0].strategy.state_dict()
        assert sa["t"] == sb["t"] == 3
        assert all(torch.equal(sa[k], sb[k]) for k in ("a", "m", "v"))
        assert float(sa["a"].abs().max()) > 0
        assert any("meta_update" in r for r in read_metrics(tmp_path / "b"))
    # the export is a plain HF folder: no gate keys, loads in transformers
    with safe_open(str(tmp_path / "a" / "export" / "model.safetensors"), "pt") as fh:
        assert not [k for k in fh.keys() if k.startswith(GATE_NAME)]
    _weights(tmp_path / "a" / "export")


@pytest.mark.slow
def test_learned_weights_prefer_the_useful_teacher(mt_assets, tmp_path):
    """One useful and one pure-noise teacher: confidence, attention and meta each put most of the
    weight on the useful one within 150 tiny steps, and the student ends with a lower held-out loss
    than with equal fixed weights."""
    from distill.multiteacher.study import heldout_loss

    common = dict(train={"steps": 150, "grad_accum": 1, "warmup_steps": 5}, log={"every": 5})
    knobs = {"meta": {"every": 5, "heldout_path": mt_assets["heldout"]}}
    held = {}
    for w in ("fixed", "confidence", "attention", "meta"):
        _train(mt_cfg_dict(mt_assets, tmp_path / w, w, multiteacher=knobs, **common))
        held[w] = heldout_loss(tmp_path / w / "export", mt_assets["heldout_pairs"])
        recs = read_metrics(tmp_path / w)
        last = sum(r["w_good"] for r in recs[-5:]) / 5
        if w == "fixed":
            assert last == pytest.approx(0.5)
        else:
            assert last > 0.7, (w, last)
    for w in ("confidence", "attention", "meta"):
        assert held[w] < held["fixed"], held


def test_config_errors():
    from distill.config import ConfigError, RunConfig, from_dict

    def cfg(**sections):
        c = from_dict(RunConfig, sections)
        c.validate()

    two = [{"name": "a", "path": "x"}, {"name": "b", "path": "y"}]
    with pytest.raises(ConfigError, match="kd.teacher_backend=multiteacher"):
        cfg(multiteacher={"teachers": two})
    with pytest.raises(ConfigError, match="needs multiteacher.teachers"):
        cfg(kd={"teacher_backend": "multiteacher"})
    with pytest.raises(ConfigError, match="unique"):
        cfg(kd={"teacher_backend": "multiteacher"}, multiteacher={"teachers": [two[0], two[0]]})
    with pytest.raises(ConfigError, match="kd.path=lean"):
        cfg(kd={"teacher_backend": "multiteacher", "path": "logits"},
            multiteacher={"teachers": two, "weighting": "attention"})
    with pytest.raises(ConfigError, match="serves top-k"):
        cfg(kd={"teacher_backend": "multiteacher"},
            multiteacher={"teachers": [two[0], {"name": "c", "path": "z", "backend": "cache"}]})
    with pytest.raises(ConfigError, match="unknown key"):
        cfg(kd={"teacher_backend": "multiteacher"}, multiteacher={"teachers": [{"name": "a", "path": "x", "T": 2}]})
    # before any teacher is built (they were a KeyError once the student was loaded, or at the first step)
    with pytest.raises(ConfigError, match=r"multiteacher.teachers\[1\] \(b\): backend='colocatd' is not a teacher "
                                          r"backend; known: \['cache', 'colocated', (?!.*multiteacher)"):
        cfg(kd={"teacher_backend": "multiteacher"}, multiteacher={"teachers": [two[0], two[1] | {"backend": "colocatd"}]})
    with pytest.raises(ConfigError, match="set data.name=sft_routed"):
        cfg(kd={"teacher_backend": "multiteacher"}, multiteacher={"teachers": two, "weighting": "route"})
    with pytest.raises(ConfigError, match="multiteacher.weighting='learned'"):
        cfg(multiteacher={"weighting": "learned"})  # no teachers: was ignored


def test_mixed_backends_cache_teacher_equals_colocated_topk(mt_assets, tmp_path):
    """A teacher served from its offline top-k cache (kd.teacher_backend=cache, built by
    distill.teacher.topk_cache) beside a co-located full-logits one gives the same run as the same
    teacher co-located at the same k and temperature; confidence weighting reads both."""
    from distill.config import RunConfig, from_dict
    from distill.teacher.topk_cache import build_topk_cache

    cache = tmp_path / "noise_topk"
    one = mt_cfg_dict(mt_assets, tmp_path / "build", kd={"topk": 8, "temperature": 2.0, "cache_dir": str(cache),
                                                          "teacher_backend": "colocated"},
                      model={"teacher": mt_assets["noise"]})
    one.pop("multiteacher")
    build_topk_cache(from_dict(RunConfig, one))
    noise = {"name": "noise", "path": mt_assets["noise"], "topk": 8, "temperature": 2.0}
    for name, extra in (("cache", {"backend": "cache", "cache_dir": str(cache)}), ("coloc", {})):
        _train(mt_cfg_dict(mt_assets, tmp_path / name, "confidence", train={"steps": 2},
                           teachers=[{"name": "good", "path": mt_assets["good"]}, noise | extra]))
    _assert_same_metrics(read_metrics(tmp_path / "cache"), read_metrics(tmp_path / "coloc"),
                         keys=("loss", "ce", "kd", "grad_norm", "w_good", "w_noise", "kd_noise"))


@pytest.fixture(scope="module")
def padded_student(mt_assets):
    """The fixtures' student with 13 extra head and embedding rows (random) past the tokenizer's
    vocabulary, as Qwen2.5 pads 151,665 tokens to 151,936 rows; the first rows are the student's."""
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(mt_assets["student"])
    n = src.config.vocab_size
    g = torch.Generator().manual_seed(11)
    src.resize_token_embeddings(n + 13, mean_resizing=False)
    with torch.no_grad():
        for w in (src.get_input_embeddings().weight, src.get_output_embeddings().weight):
            w[n:] = torch.randn(w[n:].shape, generator=g) * 0.5
    folder = mt_assets["root"] / "student_padded"
    src.save_pretrained(folder)
    mt_assets["tokenizer"].save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("weighting", ["fixed", "confidence", "attention", "meta"])
def test_padded_student_head_equals_the_unpadded_run(mt_assets, padded_student, tmp_path, weighting):
    """Head rows past the real vocabulary take no part: a padded student logs the losses of the same
    student without them (rel 1e-5), for every weighting (meta's held-out head gradient used to keep the padding
    rows and meet the teachers' [n, V] rows with [n, V_padded])."""
    knobs = {"meta": {"every": 1, "heldout_path": mt_assets["heldout"], "heldout_batch": 4}}
    for name, student in (("plain", mt_assets["student"]), ("padded", padded_student)):
        d = mt_cfg_dict(mt_assets, tmp_path / name, weighting, train={"steps": 3}, multiteacher=knobs,
                        checkpoint={"export": False})
        d["model"]["student"] = student
        _train(d)
    a, b = read_metrics(tmp_path / "padded"), read_metrics(tmp_path / "plain")
    _assert_same_metrics(a, b, keys=("loss", "ce", "kd", "w_good"), rel=1e-5)
    if weighting == "meta":
        assert all("meta_update" in r for r in a)


def _flip_label(response: str) -> str:
    return response.replace("positive", "@").replace("negative", "positive").replace("@", "negative")


@pytest.fixture(scope="module")
def confident_pair(mt_assets):
    """Two equally trained teachers (400 steps): ``right`` on the training pairs, ``wrong`` on the same
    pairs with the label word flipped. Both are confident (low entropy); ``wrong`` is confidently wrong
    about the one token that matters, the noise teacher of the fixtures only diffuse."""
    from distill.multiteacher.study import train_teacher

    pairs = [(p["prompt"], p["response"]) for p in (json.loads(x) for x in open(mt_assets["data"]))]
    root, tok = mt_assets["root"], mt_assets["tokenizer"]
    right = train_teacher(tok, pairs, root / "right400", size="micro", steps=400)
    wrong = train_teacher(tok, [(p, _flip_label(r)) for p, r in pairs], root / "wrong400", size="micro", steps=400)
    return {"right": str(right), "wrong": str(wrong), "pairs": pairs}


@pytest.mark.slow
def test_confidently_wrong_teacher_what_each_strategy_does(mt_assets, confident_pair, tmp_path, capsys):
    """A confidently wrong teacher beside an equally confident right one (the failure case of
    confidence weighting that the diffuse noise teacher never tests). Asserted, as it follows from the
    construction: negative-entropy confidence cannot tell them apart (it sees confidence, not
    correctness: equal weights within 0.1), and gold_prob confidence, which scores the reference token,
    gives the right teacher more weight than neg_entropy does. Printed, not asserted: attention and
    meta, whose outcome here moved between runs (meta 0.33-0.87 on the right teacher; see
    docs/multiteacher.md)."""
    from distill.multiteacher.study import heldout_loss, response_entropy

    pairs = confident_pair["pairs"]
    ent = {n: response_entropy(confident_pair[n], pairs) for n in ("right", "wrong")}
    ent["noise"] = response_entropy(mt_assets["noise"], pairs)
    ce = {n: heldout_loss(confident_pair[n], pairs) for n in ("right", "wrong")}
    assert ent["wrong"] < 2 * ent["right"] and ent["wrong"] < 0.25 * ent["noise"], ent  # confident
    assert ce["wrong"] > 10 * ce["right"], ce  # and wrong
    teachers = [{"name": "good", "path": confident_pair["right"]}, {"name": "noise", "path": confident_pair["wrong"]}]
    common = dict(train={"steps": 100, "grad_accum": 1, "warmup_steps": 5}, log={"every": 5},
                  checkpoint={"export": False})
    w_good = {}
    for name, w, extra in (("neg_entropy", "confidence", {"confidence": {"signal": "neg_entropy"}}),
                           ("gold_prob", "confidence", {"confidence": {"signal": "gold_prob"}}),
                           ("attention", "attention", {}),
                           ("meta", "meta", {"meta": {"every": 5, "heldout_path": mt_assets["heldout"]}})):
        _train(mt_cfg_dict(mt_assets, tmp_path / name, w, teachers=teachers, multiteacher=extra, **common))
        recs = read_metrics(tmp_path / name)
        w_good[name] = sum(r["w_good"] for r in recs[-3:]) / 3
    with capsys.disabled():
        print(f"\nconfidently wrong teacher: entropy {ent}, CE {ce}, weight on the right teacher {w_good}")
    assert abs(w_good["neg_entropy"] - 0.5) < 0.1, w_good
    assert w_good["gold_prob"] > w_good["neg_entropy"], w_good


def test_on_policy_through_several_teachers_equals_the_single_teacher_run(mt_assets, tmp_path):
    """kd.on_policy with the multiteacher backend: the student's samples are scored through the
    several-teachers path exactly as through the single co-located teacher (fixed weights 1, 0)."""
    from distill.config import RunConfig, from_dict
    from distill.train.build import build_trainer

    on = {"temperature": 2.0, "on_policy": {"fraction": 0.5, "max_new_tokens": 10}}
    teachers = [{"name": "good", "path": mt_assets["good"], "temperature": 2.0, "weight": 1.0},
                {"name": "noise", "path": mt_assets["noise"], "weight": 0.0}]
    _train(mt_cfg_dict(mt_assets, tmp_path / "multi", train={"steps": 3}, teachers=teachers, kd=on))
    single = mt_cfg_dict(mt_assets, tmp_path / "single", train={"steps": 3}, kd={**on, "teacher_backend": "colocated"})
    single.pop("multiteacher")
    build_trainer(from_dict(RunConfig, single)).train()
    a, b = read_metrics(tmp_path / "multi"), read_metrics(tmp_path / "single")
    _assert_same_metrics(a, b, keys=("loss", "ce", "kd", "grad_norm", "response_tokens", "gen_tokens"))
    assert all(r["gen_seqs"] > 0 and r["gen_tokens"] > 0 for r in a)
