"""Turn a trainer checkpoint into a plain Hugging Face folder (config.json, model.safetensors, tokenizer, README.md).

```bash
python -m distill.export --checkpoint runs/knowdist/checkpoints/step_00000500 --out runs/knowdist/export-500
python -m distill.export --checkpoint runs/knowdist --out exports/latest      # the newest complete checkpoint
python -m distill.export --checkpoint ... --out ... --push_to_hub org/student # also upload (huggingface_hub)
distill-export ...   # the console script, same options
```

Reads the checkpoint's own ``config.yaml`` and ``trainer_state.json`` (distill/train/checkpoint.py
``save_checkpoint``). Weights: the torch engine's ``engine/model.safetensors``; a DeepSpeed checkpoint's
``engine/engine/`` through DeepSpeed's ``zero_to_fp32`` (ZeRO 1-3 partitions merged into fp32 master
weights; ZeRO 0: the module state). The architecture (config.json), tokenizer and generation config
come from the run's student init (``model.student``; ``--student DIR`` when it moved). The folder is
written by distill/models/export.py ``export_hf``, model card included, like the trainer's own export.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from distill.errors import UserError, run_cli


class ExportError(UserError, ValueError):
    """A checkpoint that cannot be exported, or a bad flag of distill.export."""


def find_checkpoint(path: str | Path) -> Path:
    """A ``step_N`` folder as given, else the newest complete one in ``path`` or ``path/checkpoints``."""
    from distill.train.checkpoint import list_checkpoints

    p = Path(path)
    if not p.exists():
        raise ExportError(f"--checkpoint {p}: no such folder")
    if (p / "trainer_state.json").is_file():
        return p
    for d in (p, p / "checkpoints"):
        found = list_checkpoints(d)
        if found:
            return found[-1]
    raise ExportError(f"--checkpoint {p}: not a complete checkpoint (no trainer_state.json) and no step_N checkpoint inside")


# The stages' config schemas, for checkpoints written before trainer_state.json named its class:
# a top-level section only that stage has identifies it.
_STAGE_SECTIONS = {"harvest": "distill.knowdist.stage:KnowDistConfig", "icl": "distill.icldist.stage:ICLDistConfig"}


def config_class(state: dict, raw: dict, cfg_file: Path) -> type:
    """The schema a checkpoint's ``config.yaml`` was written with: the class the trainer recorded in
    ``trainer_state.json`` (``module:Class``, a ``distill`` module), else the stage a stage-only section
    names, else the base :class:`~distill.config.RunConfig`."""
    import importlib

    from distill.config import RunConfig

    name = state.get("config_class") or next((c for sec, c in _STAGE_SECTIONS.items() if sec in raw), None)
    if not name:
        return RunConfig
    module, _, qual = str(name).partition(":")
    if module.split(".")[0] != "distill" or not qual:
        raise ExportError(f"{cfg_file.parent / 'trainer_state.json'}: config_class {name!r} is not a distill config class")
    try:
        cls = getattr(importlib.import_module(module), qual)
    except (ImportError, AttributeError) as e:
        raise ExportError(f"{cfg_file.parent / 'trainer_state.json'}: config_class {name!r} cannot be imported "
                          f"({type(e).__name__}: {e}); export with the distill version that wrote the checkpoint") from None
    if not (isinstance(cls, type) and issubclass(cls, RunConfig)):
        raise ExportError(f"{cfg_file.parent / 'trainer_state.json'}: config_class {name!r} is not a run config")
    return cls


def read_state_dict(ckpt: Path, engine: str) -> dict:
    """The student's full state dict (CPU) from a checkpoint's ``engine/`` folder."""
    eng = ckpt / "engine"
    torch_file = eng / "model.safetensors"
    if engine == "torch" or torch_file.is_file():
        from safetensors.torch import load_file

        if not torch_file.is_file():
            raise ExportError(f"{torch_file}: missing (a torch-engine checkpoint keeps the weights there)")
        try:
            return load_file(str(torch_file))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
            raise ExportError(f"{torch_file}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    tag_dir = eng / "engine"  # DeepSpeedEngine.save: save_checkpoint(folder, tag="engine")
    if not tag_dir.is_dir():
        raise ExportError(f"{tag_dir}: missing (neither a torch engine model.safetensors nor a DeepSpeed 'engine' tag)")
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as e:
            raise ExportError(f"{tag_dir} is a DeepSpeed ZeRO checkpoint: exporting it needs deepspeed ({e})") from None
        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(eng), tag="engine")
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
            raise ExportError(f"{tag_dir}: DeepSpeed cannot merge the ZeRO partitions ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return {k: v.detach().cpu() for k, v in sd.items()}
    import torch

    states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not states:
        raise ExportError(f"{tag_dir}: no mp_rank_*_model_states.pt and no ZeRO partitions")
    obj = torch.load(states[0], map_location="cpu", weights_only=False)
    return {k: v.detach().cpu() for k, v in obj["module"].items()}


def _check_keys(sd: dict, model_config, where: Path) -> None:
    """The state dict fits the architecture (names and shapes), checked on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(model_config).state_dict()
    tied = getattr(model_config, "tie_word_embeddings", False)
    missing = [k for k in ref if k not in sd and not (tied and k == "lm_head.weight")]
    extra = [k for k in sd if k not in ref]
    shape = [k for k in sd if k in ref and tuple(sd[k].shape) != tuple(ref[k].shape)]
    if missing or extra or shape:
        parts = [f"{n} {what} (first {ks[0]!r})" for n, what, ks in
                 ((len(missing), "missing", missing), (len(extra), "unexpected", extra), (len(shape), "of another shape", shape)) if ks]
        raise ExportError(f"{where}: the weights do not fit the student architecture: {', '.join(parts)}; "
                          "give the run's student init with --student DIR")


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, student: str | None = None,
                      dtype: str = "keep") -> Path:
    """Export ``checkpoint`` (a step_N folder or a folder holding them) to ``out``; returns ``out``."""
    import torch
    from transformers import AutoConfig, GenerationConfig

    from distill.config import from_dict, load_yaml, to_dict
    from distill.models import load as ml
    from distill.models.export import card_metadata, export_hf

    ckpt = find_checkpoint(checkpoint)
    cfg_file = ckpt / "config.yaml"
    if not cfg_file.is_file():
        raise ExportError(f"{cfg_file}: missing (every trainer checkpoint holds its resolved config)")
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{ckpt / 'trainer_state.json'}: unreadable ({type(e).__name__})") from None
    raw = load_yaml(cfg_file)
    cfg = from_dict(config_class(state, raw, cfg_file), raw, where=str(cfg_file))
    step = int(state.get("step", 0))
    sd = read_state_dict(ckpt, str(state.get("engine", "")))
    if dtype != "keep":
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ExportError(f"--dtype {dtype}: one of keep, float32, bfloat16, float16")
        sd = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in sd.items()}

    if student:
        student_path = student
        teacher_path = cfg.model.teacher
    else:
        student_path, teacher_path = ml.resolve_builtin(cfg.model, cfg.run.out_dir)
    if cfg.kd.kind == "none":
        teacher_path = ""
    try:
        model_config = AutoConfig.from_pretrained(student_path, trust_remote_code=cfg.model.trust_remote_code)
    except OSError as e:
        raise ExportError(f"student init {student_path!r} (model.student of {cfg_file}): cannot read its config "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); give it with --student DIR") from None
    tokenizer = ml.load_tokenizer(cfg.model.tokenizer or student_path, trust_remote_code=cfg.model.trust_remote_code,
                                  what="tokenizer of the run (model.tokenizer / model.student; --student DIR)")
    try:
        gen_config = GenerationConfig.from_pretrained(student_path)
    except OSError:
        gen_config = GenerationConfig.from_model_config(model_config)
    _check_keys(sd, model_config, ckpt)

    metrics = Path(cfg.run.out_dir) / "metrics.jsonl"
    if not metrics.is_file():
        metrics = ckpt.parent.parent / "metrics.jsonl"
    card = card_metadata(cfg, step=step, student=student_path, teacher=teacher_path, metrics_path=metrics)
    card["source"] = str(ckpt)
    if card.get("sentibench") and (card["sentibench"].get("step") or 0) > step:
        card["sentibench"] = None  # an evaluation after this checkpoint does not describe these weights
    info = json.dumps({"step": step, "student_init": student_path, "teacher": teacher_path, "checkpoint": str(ckpt),
                       "config": to_dict(cfg)}, indent=2)
    return export_hf(sd, model_config, tokenizer, out, generation_config=gen_config,
                     extra_files={"distill_run.json": info}, card=card)


def push_to_hub(folder: Path, repo: str, *, private: bool = False) -> str:
    """Upload ``folder`` to the hub repository ``repo`` (created if missing); returns its URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise ExportError(f"--push_to_hub needs huggingface_hub ({e})") from None
    try:
        api = HfApi()
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="distill export")
    except Exception as e:  # noqa: BLE001 - network, auth, offline mode: all mean "not pushed"
        msg = (str(e).strip().splitlines() or [""])[0]
        raise ExportError(f"--push_to_hub {repo}: upload failed ({type(e).__name__}: {msg}); the export in {folder} "
                          "is complete (log in with `huggingface-cli login`, check the network)") from None
    return f"https://huggingface.co/{repo}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="distill-export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a step_N checkpoint folder, or a run/checkpoints folder (newest)")
    ap.add_argument("--out", required=True, help="the HF folder to write (replaced atomically)")
    ap.add_argument("--student", default=None, help="the student init folder (config + tokenizer), if moved since the run")
    ap.add_argument("--dtype", default="keep", help="keep (as stored; ZeRO: fp32 master weights) | float32 | bfloat16 | float16")
    ap.add_argument("--push_to_hub", "--push-to-hub", dest="push_to_hub", default=None, metavar="REPO",
                    help="also upload the folder to this hub repository (huggingface_hub)")
    ap.add_argument("--private", action="store_true", help="with --push_to_hub: create the repository private")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out, student=args.student, dtype=args.dtype)
    print(f"[export] wrote {out}", flush=True)
    if args.push_to_hub:
        url = push_to_hub(Path(out), args.push_to_hub, private=args.private)
        print(f"[export] pushed to {url}", flush=True)
    return 0


def cli() -> int:
    """The ``distill-export`` console script."""
    return run_cli(main, "export")


if __name__ == "__main__":
    sys.exit(run_cli(main, "export"))
