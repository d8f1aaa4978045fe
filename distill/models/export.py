"""Export a trained model as a Hugging Face folder: ``model.safetensors`` + config + tokenizer.

The state dict comes from the engine (gathered from ZeRO-3 shards on rank 0). The folder is written
under a temporary name and renamed, so a crash never leaves a half-written export; it loads with
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

MAX_SHARD_BYTES = 5 * 1024**3  # one safetensors file up to 5 GiB; larger models get shards + index


def export_hf(state_dict: dict, model_config, tokenizer, out_dir: str | Path, *, generation_config=None,
              extra_files: dict[str, str] | None = None) -> Path:
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
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    del torch
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
