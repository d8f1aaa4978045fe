"""log.report_to: TensorBoard (event file read back), W&B offline, MLflow file store; the config
check; a missing package is one ConfigError naming the pip package; `import distill` stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distill.config import ConfigError, RunConfig, from_dict, load_config

from .conftest import REPO, read_metrics, tiny_cfg_dict

EVAL = {"tasks": "sc/sst2", "limit": 2, "shots": 1, "batch_size": 4}


def _run(assets, out_dir, report_to, **sections):
    from distill.train.build import build_trainer

    d = tiny_cfg_dict(assets, out_dir, train={"steps": 2, "warmup_steps": 0}, checkpoint={"export": False},
                      log={"progress_bar": False, "report_to": report_to}, **sections)
    cfg = from_dict(RunConfig, d)
    cfg.validate()
    tr = build_trainer(cfg)
    return tr, tr.train()


def test_report_to_is_checked():
    assert RunConfig().log.report_to == []
    cfg, _ = load_config(RunConfig, ["--log.report_to=tensorboard,mlflow"])
    assert cfg.log.report_to == ["tensorboard", "mlflow"]
    with pytest.raises(ConfigError, match=r"log\.report_to\[1\].*'comet'.*tensorboard"):
        load_config(RunConfig, ["--log.report_to=tensorboard,comet"])
    cfg = RunConfig()
    cfg.log.report_to = ["wandb", "wandb"]
    with pytest.raises(ConfigError, match="names one twice"):
        cfg.validate()


def test_missing_package_is_one_config_error(monkeypatch, tmp_path):
    from distill.reporting import Reporter

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    cfg = from_dict(RunConfig, {"run": {"out_dir": str(tmp_path)}, "log": {"report_to": ["wandb"]}})
    with pytest.raises(ConfigError, match="pip install wandb"):
        Reporter(cfg, tmp_path)


def test_import_distill_stays_light():
    code = ("import sys, distill, distill.config, distill.train.build, distill.reporting; "
            "print([m for m in ('tensorboard', 'torch.utils.tensorboard', 'wandb', 'mlflow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_tensorboard_scalars_config_and_eval(tiny_assets, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    _run(tiny_assets, run, ["tensorboard"], eval={**EVAL, "at_end": True})
    recs = read_metrics(run)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in recs], rel=1e-6)
    assert {"ce", "kd", "lr", "grad_norm", "tok_per_s"} <= set(tags["scalars"])
    assert "step" not in tags["scalars"]
    assert "eval/sc/sst2/score" in tags["scalars"] and "eval/overall/score" in tags["scalars"]
    assert [e.step for e in acc.Scalars("eval/overall/score")] == [2]
    assert "config/text_summary" in tags["tensors"]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lr: 0.003" in text
    assert acc.summary_metadata.get("_hparams_/session_start_info") is not None


def test_wandb_offline(tiny_assets, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import distill.reporting as rep

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    # wandb (>= 0.2x) keeps an offline run as a binary transaction log that only its Go core reads, so
    # the test looks at the live run: what was logged through run.log, and run.config.
    seen: dict = {"logged": [], "runs": []}
    orig_log, orig_close = rep._WandB.log, rep._WandB.close

    def log(self, scalars, step):
        seen["logged"].append((step, dict(scalars)))
        orig_log(self, scalars, step)

    def close(self):
        seen["runs"].append(self.run)
        seen["summary"] = dict(self.run.summary)
        orig_close(self)

    monkeypatch.setattr(rep._WandB, "log", log)
    monkeypatch.setattr(rep._WandB, "close", close)
    run = tmp_path / "run"
    _run(tiny_assets, run, ["wandb"])
    recs = read_metrics(run)
    assert [(s, v["loss"]) for s, v in seen["logged"]] == [(r["step"], pytest.approx(r["loss"])) for r in recs]
    assert seen["summary"]["loss"] == pytest.approx(recs[0]["loss"])  # step 2's row is committed by finish()
    (wrun,) = seen["runs"]
    assert wrun.config["train"]["lr"] == pytest.approx(3e-3) and wrun.name == "run"
    (offline,) = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*/run-*.wandb")
    assert offline.stat().st_size > 0


def test_mlflow_file_store(tiny_assets, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x: the file store is opt-in
    run = tmp_path / "run"
    _run(tiny_assets, run, ["mlflow"])
    recs = read_metrics(run)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("distill")
    (r,) = client.search_runs([exp.experiment_id])
    hist = client.get_metric_history(r.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, pytest.approx(recs[0]["loss"], rel=1e-6)),
                                                        (2, pytest.approx(recs[1]["loss"], rel=1e-6))]
    assert float(r.data.params["train.lr"]) == pytest.approx(3e-3)
    assert r.info.status == "FINISHED"


def test_mlflow_default_store_in_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from distill.reporting import Reporter

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):  # set first, so teardown restores them
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    cfg = from_dict(RunConfig, {"run": {"out_dir": str(tmp_path)}, "log": {"report_to": ["mlflow"]}})
    r = Reporter(cfg, tmp_path)
    r.log({"step": 1, "loss": 2.5, "note": "x", "ok": True}, 1)
    r.log_eval({"tasks": {"sc/sst2": {"score": 50.0, "n": 2, "seeds": {}}}, "overall": {"score": 50.0}}, 1)
    r.close()
    r.close()  # twice is fine
    import mlflow

    assert (tmp_path / "mlruns").is_dir()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("distill").experiment_id])
    assert run.data.metrics == {"loss": 2.5, "eval/sc/sst2/score": 50.0, "eval/sc/sst2/n": 2.0,
                                "eval/overall/score": 50.0}
    mlflow.set_tracking_uri(None)
