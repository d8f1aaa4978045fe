"""Export a trained model as a Hugging Face folder: ``model.safetensors`` + config + tokenizer.

The state dict comes from the engine (gathered from ZeRO-3 shards on rank 0). The folder is written
under a temporary name and renamed, so a crash never leaves a half-written export; it loads with
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``. Every export has a model
card (``README.md``): student init, teacher, data, objective, steps and SentiBench scores where known.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

MAX_SHARD_BYTES = 5 * 1024**3  # one safetensors file up to 5 GiB; larger models get shards + index
PROJECT = "distill"  # the project name on every model card
PROJECT_DESC = "knowledge distillation for sentiment analysis (Targeted Distillation, Zhang et al., EMNLP 2025)"


def sentibench_scores(metrics_path: str | Path | None) -> dict | None:
    """``{"step", "overall", "tasks": {task: score}}`` of the last eval record of a metrics.jsonl, else None."""
    import json

    if metrics_path is None or not Path(metrics_path).is_file():
        return None
    last = None
    for line in Path(metrics_path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("eval"), dict):
            last = rec
    if last is None:
        return None
    ev = last["eval"]
    tasks = {t: v.get("score") for t, v in (ev.get("tasks") or {}).items() if isinstance(v, dict)}
    overall = (ev.get("overall") or {}).get("score") if isinstance(ev.get("overall"), dict) else None
    return {"step": last.get("step"), "overall": overall, "tasks": tasks, "sample": ev.get("sample"),
            "limit": ev.get("limit"), "shots": ev.get("shots"), "split": ev.get("split")}


def card_metadata(cfg, *, step: int | None, student: str | None = None, teacher: str | None = None,
                  metrics_path: str | Path | None = None) -> dict:
    """What a model card says about a run, from its RunConfig (``student``/``teacher``: resolved paths)."""
    k = cfg.kd
    objective = {"kind": k.kind, "temperature": k.temperature, "ce_weight": k.ce_weight, "kd_weight": k.kd_weight,
                 "topk": k.topk, "teacher_backend": k.teacher_backend}
    if k.kind == "jsd":
        objective["beta"] = k.beta
    if k.kind.startswith("skew"):
        objective["alpha"] = k.alpha
    return {"project": PROJECT, "run": cfg.run.name or Path(cfg.run.out_dir).name,
            "base_model": student or cfg.model.student, "teacher": (teacher or cfg.model.teacher) if k.kind != "none" else None,
            "data": {"name": cfg.data.name, "path": cfg.data.path, "max_len": cfg.data.max_len},
            "objective": objective, "steps": step,
            "train": {"lr": cfg.train.lr, "micro_batch": cfg.train.micro_batch, "grad_accum": cfg.train.grad_accum,
                      "seed": cfg.train.seed},
            "sentibench": sentibench_scores(metrics_path)}


def model_card(meta: dict | None) -> str:
    """The README.md of an export: a YAML header (base_model, tags) and the run's facts."""
    import json

    meta = dict(meta or {})
    base = meta.get("base_model")
    head = ["---", "library_name: transformers", "tags:", "- distillation", "- sentiment-analysis", f"- {PROJECT}"]
    if base and str(base).count("/") == 1 and not Path(str(base)).exists():  # a hub name
        head.append(f"base_model: {base}")
    head.append("---")
    lines = head + ["", f"# {meta.get('run') or 'student'}", "",
                    f"A student exported by **{PROJECT}** ({PROJECT_DESC}).", ""]

    def row(name, value):
        if value is not None and value != "":
            lines.append(f"- **{name}**: {value}")

    row("Project", PROJECT)
    row("Base model (student init)", base)
    row("Teacher", meta.get("teacher") or ("none (SFT only)" if "teacher" in meta else None))
    d = meta.get("data") or {}
    row("Data", ", ".join(f"{a}={b}" for a, b in d.items() if b not in (None, "")) if isinstance(d, dict) else d)
    o = meta.get("objective") or {}
    if isinstance(o, dict) and o:
        row("Objective", o.get("kind"))
        row("Temperature T", o.get("temperature"))
        row("Weights", f"ce={o.get('ce_weight')}, kd={o.get('kd_weight')}")
        row("Top-k", o.get("topk") or "0 (full logits)")
    row("Steps", meta.get("steps"))
    t = meta.get("train") or {}
    if isinstance(t, dict) and t:
        row("Training", ", ".join(f"{a}={b}" for a, b in t.items()))
    row("Exported from", meta.get("source"))
    sb = meta.get("sentibench")
    lines += ["", "## SentiBench", ""]
    if sb:
        note = " (packaged sample, not comparable with the paper)" if sb.get("sample") else ""
        split = sb.get("split") or "test"
        split = split if isinstance(split, str) else "validation where present, else test"
        lim = f", first {sb['limit']} {split} examples per task" if sb.get("limit") else f", {split} split"
        lines.append(f"Scores x100 at step {sb.get('step')}{lim}{note}:")
        lines += ["", "| task | score |", "|---|---|"]
        for task, score in (sb.get("tasks") or {}).items():
            lines.append(f"| {task} | {score if score is None else round(float(score), 2)} |")
        if sb.get("overall") is not None:
            lines.append(f"| overall | {round(float(sb['overall']), 2)} |")
    else:
        lines.append("Not evaluated during the run (`sentibench run --model <this folder>` scores it).")
    lines += ["", "## Use", "", "```bash",
              "python -m distill.predict --model <this folder> --task sc/sst2 --text \"A gem of a film.\"", "```",
              "", "<!-- card metadata -->", "```json", json.dumps(meta, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def export_hf(state_dict: dict, model_config, tokenizer, out_dir: str | Path, *, generation_config=None,
              extra_files: dict[str, str] | None = None, card: dict | None = None) -> Path:
    """Write the folder; ``card`` (see :func:`card_metadata`) fills the model card README.md."""
    import json

    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {}
    seen = {}
    for k, v in state_dict.items():
        t = v.detach().cpu().contiguous()
        key = (t.data_ptr(), t.shape) if t.numel() else None
        if key is not None and key in seen:  # tied weights share storage: store once (HF convention)
            continue
        if key is not None:
            seen[key] = k
        sd[k] = t
    if getattr(model_config, "tie_word_embeddings", False) and "lm_head.weight" in sd:
        sd.pop("lm_head.weight")
    total = sum(t.numel() * t.element_size() for t in sd.values())
    if total <= MAX_SHARD_BYTES:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        shards, cur, size = [], {}, 0
        for k, t in sd.items():
            nb = t.numel() * t.element_size()
            if cur and size + nb > MAX_SHARD_BYTES:
                shards.append(cur)
                cur, size = {}, 0
            cur[k] = t
            size += nb
        shards.append(cur)
        index = {"metadata": {"total_size": total}, "weight_map": {}}
        for i, sh in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sh, str(tmp / fname), metadata={"format": "pt"})
            index["weight_map"].update({k: fname for k in sh})
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    dtypes = {t.dtype for t in sd.values()}
    if len(dtypes) == 1:
        model_config.dtype = str(next(iter(dtypes))).replace("torch.", "")
    model_config.save_pretrained(tmp)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(model_card(card), encoding="utf-8")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    del torch
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
