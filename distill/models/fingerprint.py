"""Fingerprints of what a teacher's outputs depend on: its weights and its tokenizer.

Caches and corpora record them in their manifests and refuse to be read or extended by a run whose
teacher or tokenizer changed (ICLDist's teacher cache, KnowDist's harvest and top-k cache, the
trainer's run files). Pure Python: nothing here loads a model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from distill.fileio import sha256_file

# Files whose names, sizes and mtimes stand for the teacher's weights (hashing GBs is too slow).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Small files hashed whole: the architecture and the weight-to-file map.
HASHED_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def weights_fingerprint(model: str | os.PathLike) -> dict:
    """A cheap fingerprint of a teacher folder's weights: ``{"files": {name: {"bytes", "mtime_ns"}},
    <hashed file>: sha256[:16]}``. A hub name (not a local folder) is fingerprinted by its name only."""
    root = Path(model)
    if not root.is_dir():
        return {"hub": str(model)}
    out: dict = {"files": {}}
    for f in sorted(root.iterdir()):
        if f.suffix in WEIGHT_SUFFIXES and f.is_file():
            st = f.stat()
            out["files"][f.name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    for name in HASHED_FILES:
        if (root / name).is_file():
            out[name] = sha256_file(root / name)[:16]
    return out


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id) and the special tokens: equal iff the ids mean the same."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    h = hashlib.sha256(json.dumps([vocab, special], ensure_ascii=False).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tok) -> str:
    """Hash of the token -> id map (special tokens included)."""
    items = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]
