"""Where the SentiBench data is: one resolution order for every command and test.

1. an explicit ``data_dir`` (``--data-dir``)
2. ``$SENTIBENCH_DIR``
3. ``../shared/sentibench`` beside the repository (a source checkout)
4. the user cache filled by ``python -m distill.eval.sentibench download``
   (``$DISTILL_CACHE`` or ``~/.cache/distill``, folder ``sentibench``)
Returns None when none holds the data; callers then fall back to the small sample shipped inside
the package and say so in what they write.
"""

from __future__ import annotations

import os
from pathlib import Path

from distill.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]


class DataDirMissing(UserError, FileNotFoundError):
    """A SentiBench folder named explicitly (``--data-dir``, ``data_dir``, ``$SENTIBENCH_DIR``) is not there."""


def cache_dir() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def _looks_like_sentibench(path: Path) -> bool:
    return (path / "sc").is_dir() or (path / "multifaced").is_dir() or (path / "absa").is_dir()


def sentibench_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The SentiBench root folder, or None (use the packaged sample)."""
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise DataDirMissing(f"SentiBench data folder {path} (--data-dir / data_dir) does not exist or is not a "
                                 f"folder; check the path, or leave it unset for the usual places (docs/sentibench.md)")
        return path
    env = os.environ.get("SENTIBENCH_DIR")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise DataDirMissing(f"$SENTIBENCH_DIR={path} does not exist or is not a folder; fix or unset it")
        return path
    for path in (REPO_ROOT.parent / "shared" / "sentibench", cache_dir() / "sentibench"):
        if path.is_dir() and _looks_like_sentibench(path):
            return path
    return None
