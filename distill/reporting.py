"""Experiment trackers for ``log.report_to``: TensorBoard, Weights & Biases, MLflow, through their own APIs.

Rank 0 only (the trainer builds one :class:`Reporter` there and a no-op one elsewhere). Each tracker
gets the resolved config once at start (TensorBoard: hparams + the YAML as text; W&B: ``config``;
MLflow: params), every metrics.jsonl record (its numbers only, at its ``step``) and the evaluation
scores when the student is evaluated (``eval/<task>/score``, ``eval/overall/score``, ...).

The tracker packages are imported here, when a run names them, never by ``import distill``; a missing
one is a :class:`~distill.config.ConfigError` that names the pip package. Where the trackers write
follows their own conventions: TensorBoard ``<out_dir>/tensorboard``; W&B ``WANDB_PROJECT``
(default ``distill``), ``WANDB_MODE`` and ``WANDB_DIR`` (default ``<out_dir>``); MLflow
``MLFLOW_TRACKING_URI`` (default ``file://<out_dir>/mlruns``, with ``MLFLOW_ALLOW_FILE_STORE=true``) and ``MLFLOW_EXPERIMENT_NAME``
(default ``distill``). The run name is ``run.name`` or the out_dir's folder name.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from distill.config import REPORTERS, ConfigError, to_dict

_PIP = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def numbers(rec: dict) -> dict[str, float]:
    """The finite int/float values of a flat record (``step`` and booleans left out)."""
    return {k: float(v) for k, v in rec.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def eval_scalars(result: Any) -> dict[str, float]:
    """SentiBench results (distill.eval.sentibench.evaluate) as flat ``eval/...`` scalars."""
    if not isinstance(result, dict):
        return {"eval/score": float(result)} if isinstance(result, (int, float)) and not isinstance(result, bool) else {}
    out: dict[str, float] = {}
    for task, entry in (result.get("tasks") or {}).items():
        for k, v in numbers(entry if isinstance(entry, dict) else {}).items():
            out[f"eval/{task}/{k}"] = v
    for cat, entry in (result.get("categories") or {}).items():
        for k, v in numbers(entry if isinstance(entry, dict) else {}).items():
            out[f"eval/category/{cat}/{k}"] = v
    for k, v in numbers(result.get("overall") or {}).items():
        out[f"eval/overall/{k}"] = v
    return out


def _flat(tree: dict) -> dict[str, Any]:
    """:func:`distill.config.flatten` with every non-scalar leaf as its string (what trackers take)."""
    from distill.config import flatten

    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(tree).items()}


def _import(name: str, module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"log.report_to has {name!r} but {module} cannot be imported ({e}); "
                          f"pip install {_PIP[name]}") from None


class _TensorBoard:
    def __init__(self, cfg, out_dir: Path, name: str):
        _import("tensorboard", "tensorboard")  # torch.utils.tensorboard needs it; say so by its pip name
        tb = _import("tensorboard", "torch.utils.tensorboard")
        self.writer = tb.SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.writer.add_text("config", "```yaml\n" + _yaml(cfg) + "```", 0)
        from torch.utils.tensorboard.summary import hparams

        # hparams into this run's own event file (SummaryWriter.add_hparams would start a sub-run).
        for summary in hparams(_flat(to_dict(cfg)), {}):
            self.writer.file_writer.add_summary(summary)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, cfg, out_dir: Path, name: str):
        wandb = _import("wandb", "wandb")
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "distill"), name=name,
                              dir=os.environ.get("WANDB_DIR") or str(out_dir), config=to_dict(cfg))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, cfg, out_dir: Path, name: str):
        mlflow = _import("mlflow", "mlflow")
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # 2026-12: MLflow 3.x refuses its file store unless opted in; it is the default here
            # because it needs no server and no database package.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((out_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "distill"))
        self.run = mlflow.start_run(run_name=name)
        params = {k: str(v)[:500] for k, v in _flat(to_dict(cfg)).items()}  # MLflow's value limit is >= 500 chars
        mlflow.log_params(params)
        mlflow.log_text(_yaml(cfg), "config.yaml")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
assert tuple(_BACKENDS) == REPORTERS


def _yaml(cfg) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


class Reporter:
    """The trackers of ``cfg.log.report_to`` (none: every call is a no-op). Built on rank 0."""

    def __init__(self, cfg=None, out_dir: str | Path | None = None):
        self.backends: list = []
        names = list(cfg.log.report_to) if cfg is not None else []
        for n in names:
            if n not in _BACKENDS:
                raise ConfigError(f"log.report_to: unknown {n!r}; known: {list(REPORTERS)}")
        if not names:
            return
        out = Path(out_dir if out_dir is not None else cfg.run.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = cfg.run.name or out.resolve().name
        try:
            for n in names:
                self.backends.append(_BACKENDS[n](cfg, out, name))
        except BaseException:
            self.close()
            raise

    def log(self, rec: dict, step: int) -> None:
        """One metrics.jsonl record: its numbers at ``step``."""
        scalars = numbers(rec)
        for b in self.backends:
            b.log(scalars, step)

    def log_eval(self, result: Any, step: int) -> None:
        scalars = eval_scalars(result)
        if scalars:
            for b in self.backends:
                b.log(scalars, step)

    def close(self) -> None:
        """Flush and end every tracker's run; safe to call twice."""
        backends, self.backends = self.backends, []
        for b in backends:
            b.close()
