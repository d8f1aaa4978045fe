"""Bad inputs to ``python -m distill.predict`` and ``python -m distill.eval.sentibench`` (issue 26): each
ends with exit status 2 and one line naming the folder, file or flag and what to do, before any model
is loaded where the input is known before it (no traceback; in-process through run_cli)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from distill.errors import EXIT_USER_ERROR, run_cli


def _predict(argv, capsys):
    from distill.predict import main

    rc = run_cli(main, "predict", argv)
    return rc, capsys.readouterr().err


def _sentibench(argv, capsys):
    from distill.eval.sentibench import main

    rc = run_cli(main, "sentibench", argv)
    return rc, capsys.readouterr().err


def _one_error(rc, err, *needles):
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == EXIT_USER_ERROR and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model is a test failure: the error must come before it."""
    from distill.eval import sentibench

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(sentibench, "load_model", boom)


def bert_folder(path):
    """A tiny BERT (a masked LM, not a causal one) saved as a model folder."""
    from transformers import BertConfig

    BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               architectures=["BertForMaskedLM"]).save_pretrained(path)
    return path


@pytest.mark.parametrize("case", ["truncated", "no_tokenizer", "bert"])
def test_predict_refuses_a_broken_or_wrong_model_folder(tiny_lm_dir, tmp_path, capsys, case):
    m = tmp_path / "model"
    if case == "bert":
        bert_folder(m)
        needles = [str(m), "is a bert (BertForMaskedLM), not a causal language model"]
    else:
        shutil.copytree(tiny_lm_dir, m)
        if case == "truncated":
            w = m / "model.safetensors"
            w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
            needles = [str(w), "truncated or corrupt", "re-download"]
        else:
            for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                (m / f).unlink(missing_ok=True)
            needles = [str(m), "has no tokenizer files", "tokenizer.save_pretrained"]
    _one_error(*_predict(["--model", str(m), "--task", "sst2", "--text", "fine"], capsys), *needles)


def test_sentibench_run_refuses_a_bert_before_reading_data(tmp_path, capsys):
    m = bert_folder(tmp_path / "bert")
    rc, err = _sentibench(["run", "--model", str(m), "--tasks", "sc/sst2", "--limit", "1", "--out", str(tmp_path / "o"),
                           "--data-dir", "sample", "--no-progress"], capsys)
    _one_error(rc, err, f"--model {m} is a bert (BertForMaskedLM), not a causal language model")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a CPU-only machine")
def test_cuda_device_on_a_cpu_only_machine(tiny_lm_dir, capsys, no_model_load):
    rc, err = _predict(["--model", str(tiny_lm_dir), "--task", "sst2", "--text", "x", "--device", "cuda"], capsys)
    _one_error(rc, err, "--device cuda", "no usable CUDA device", "use --device cpu")
    rc, err = _sentibench(["run", "--model", str(tiny_lm_dir), "--device", "cuda:1", "--data-dir", "sample"], capsys)
    _one_error(rc, err, "--device cuda:1", "no usable CUDA device")


def test_unknown_dtype_and_device_names(tiny_lm_dir, capsys, no_model_load):
    rc, err = _predict(["--model", str(tiny_lm_dir), "--task", "sst2", "--text", "x", "--dtype", "fp8"], capsys)
    _one_error(rc, err, "--dtype 'fp8'", "auto, bfloat16, float16, float32")
    rc, err = _predict(["--model", str(tiny_lm_dir), "--task", "sst2", "--text", "x", "--device", "gpu0"], capsys)
    _one_error(rc, err, "--device 'gpu0' is not a device", "cuda:N")


def test_dtype_the_device_cannot_compute_in(monkeypatch):
    """bfloat16 on a GPU before Ampere, and a half dtype a CPU build cannot compute in: one line naming
    the dtype that works instead (simulated: this machine has neither)."""
    import torch

    from distill.eval.sentibench import SentiBenchUsageError, resolve_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    with pytest.raises(SentiBenchUsageError, match=r"bfloat16: Tesla V100-SXM2-32GB \(cuda:0\) has no bfloat16 "
                                                   r"arithmetic; use --dtype float16 or float32"):
        resolve_dtype("bfloat16", "cuda:0")
    assert resolve_dtype("auto", "cuda:0") is torch.float32  # auto: never a dtype the GPU lacks

    def no_half(self, *a, **k):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')

    monkeypatch.setattr(torch.Tensor, "matmul", no_half)
    with pytest.raises(SentiBenchUsageError, match=r"--dtype float16: .* cannot compute in float16 on the CPU .*"
                                                   r"use --dtype float32"):
        resolve_dtype("float16", "cpu")


def test_outputs_where_a_file_sits_in_place_of_a_folder(tiny_lm_dir, tmp_path, capsys, no_model_load):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    rc, err = _predict(["--model", str(tiny_lm_dir), "--task", "sst2", "--text", "x",
                        "--output", str(blocker / "preds.jsonl")], capsys)
    _one_error(rc, err, f"--output {blocker}", f"{blocker} is a file, not a folder")
    rc, err = _sentibench(["run", "--model", str(tiny_lm_dir), "--out", str(blocker / "run1"), "--data-dir", "sample"],
                          capsys)
    _one_error(rc, err, f"--out {blocker / 'run1' / 'predictions'}", f"{blocker} is a file, not a folder")
    rc, err = _predict(["--model", str(tiny_lm_dir), "--task", "sst2", "--text", "x", "--output", str(tmp_path)],
                       capsys)
    _one_error(rc, err, f"--output {tmp_path} is a folder; give a file name")


def test_outputs_in_a_read_only_folder(tiny_lm_dir, tmp_path, capsys, no_model_load, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root writes through chmod: the kernel's answer, simulated
        import errno

        import distill.fileio

        def denied(*a, **k):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(distill.fileio, "open", denied, raising=False)  # the write probe's open()
    try:
        rc, err = _predict(["--model", str(tiny_lm_dir), "--task", "sst2", "--text", "x",
                            "--output", str(ro / "preds.jsonl")], capsys)
        _one_error(rc, err, f"--output {ro} is not writable (permission denied (EACCES))")
    finally:
        ro.chmod(0o755)


def test_max_new_tokens_below_one_is_refused(tiny_lm_dir, capsys, no_model_load):
    for bad in ("0", "-3"):
        rc, err = _predict(["--model", str(tiny_lm_dir), "--task", "absa/atsa_rest16", "--text", "x",
                            "--max-new-tokens", bad], capsys)
        _one_error(rc, err, "--max-new-tokens must be >= 1", f"got {bad}")
        with pytest.raises(SystemExit) as e:  # argparse: usage and one error line
            _sentibench(["run", "--model", str(tiny_lm_dir), "--max-new-tokens", bad], capsys)
        assert e.value.code == 2 and f"--max-new-tokens: must be >= 1, got {bad}" in capsys.readouterr().err


def test_gold_labels_outside_the_label_set_warn_once_naming_file_record_label(tmp_path, capsys):
    """The authors' scorer counts such rows (always a miss, and a class of F1 0 in the macro average):
    scored the same, with one warning naming the file, the first record and its label."""
    folder = tmp_path / "sb" / "sc" / "sst2"
    folder.mkdir(parents=True)
    rows = [{"sentence": f"text {i}", "label": lab} for i, lab in
            enumerate(["positive", "negative", "pos", "positive", "neg", "negative"])]
    (folder / "test.json").write_text(json.dumps(rows), encoding="utf-8")
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"index": i, "prediction": "positive"}) + "\n" for i in range(6)))
    argv = ["score", "--task", "sc/sst2", "--predictions", str(preds), "--data-dir", str(tmp_path / "sb")]
    from distill.eval.sentibench import main

    for run in range(2):
        rc = run_cli(main, "sentibench", argv)
        cap = capsys.readouterr()
        warn = [x for x in cap.err.splitlines() if "gold labels" in x]
        assert rc == 0 and len(warn) == (1 if run == 0 else 0), cap.err  # once per file and process
        if run == 0:
            assert warn[0].startswith(f"sentibench: warning: {folder / 'test.json'}: 2 of 6 gold labels are not in "
                                      f"the sc/sst2 label set (negative, positive), the first 'pos' at record 2"), warn
    # Scored as the authors' macro-F1 over the union of labels: positive 2*2/(2+6) = 0.5; negative, pos and
    # neg 0 each -> 0.125 (x100).
    assert json.loads(cap.out)["f1"] == pytest.approx(12.5)
