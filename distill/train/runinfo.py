"""What a run records about the software it ran with (``versions.json``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def versions() -> dict:
    from importlib import metadata

    import torch

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "deepspeed", "transformers", "triton", "datasets", "safetensors", "distill"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    try:
        out["git_sha"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[2],
                                        capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_sha"] = None
    out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return out
