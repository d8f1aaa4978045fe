"""What a run's numbers depend on besides its config: the versions of Python, the packages and this
checkout, and the GPU. Written into the run folder and every checkpoint (``versions.json``) and into
SentiBench results (``results.json`` ``versions``).

Light: nothing is imported to read a version (package metadata and ``git``); the GPU is named only
when torch is already imported.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

# The packages whose versions are recorded; None where one is not installed.
PACKAGES = ("torch", "deepspeed", "transformers", "triton", "datasets", "safetensors", "distill")


def git_sha() -> str | None:
    """The commit of the checkout this package runs from (None outside a git checkout or without git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def versions() -> dict:
    """``{"python", <each of PACKAGES>, "git_sha", "git", "gpu"}``: ``git`` repeats ``git_sha`` (the key
    SentiBench results have always used); ``gpu`` is CUDA device 0's name, None without CUDA or torch."""
    out: dict = {"python": sys.version.split()[0]}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["git_sha"] = out["git"] = git_sha()
    torch = sys.modules.get("torch")
    out["gpu"] = torch.cuda.get_device_name(0) if torch is not None and torch.cuda.is_available() else None
    return out
