"""Crash-safe file writes (and the file hash) shared by checkpoints, corpora, caches and run folders.

A reader never sees a half-written file: data goes to a temporary name in the same folder, is
fsync'ed, renamed over the target, and the folder is fsync'ed so the rename survives a power loss.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames inside ``path`` durable (a no-op where the OS cannot open folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def is_temporary(name: str) -> bool:
    """Whether a file name is a temporary left by an interrupted write: this module's
    ``.<name>.tmp<pid>`` or a plain ``<name>.tmp``."""
    return name.endswith(".tmp") or (name.startswith(".") and ".tmp" in name)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
