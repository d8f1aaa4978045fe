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


def size_problem(path: str | os.PathLike, size: int, recorded_by: str) -> str | None:
    """Why the file at ``path`` is not the ``size`` bytes ``recorded_by`` (e.g. "the manifest says")
    recorded ("<file>: <reason>"), None when it is: one stat, cheap for multi-GB files."""
    try:
        have = Path(path).stat().st_size
    except OSError:
        return f"{path}: missing"
    return None if have == size else f"{path}: {have} bytes, {recorded_by} {size}"


def os_error_text(e: BaseException) -> str:
    """``no space left on device (ENOSPC)``: the reason of an OSError, for a one-line message."""
    import errno

    code = getattr(e, "errno", None)
    name = errno.errorcode.get(code, "") if isinstance(code, int) else ""
    text = (getattr(e, "strerror", None) or str(e) or type(e).__name__).strip()
    text = text[:1].lower() + text[1:]
    return f"{text} ({name})" if name else text


def folder_problem(path: str | os.PathLike, what: str, fix: str, *, create: bool = True) -> str | None:
    """Why ``path`` cannot be a folder this process writes in, as one line (``what`` names it, ``fix``
    says what to do), or None when it can.

    ``create``: the folder is made (with its parents) and a probe file written in it and removed,
    so a read-only file system, a missing permission or a file in the folder's place shows here
    and not at the first checkpoint. Without ``create`` nothing is written: the folder, or the
    nearest existing parent it would be made in, must be a writable folder (``os.access``)."""
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == path else f"cannot be made: {blocker} is a file"
        return f"{what} {path} {where}, not a folder: {fix}"
    if not create:
        nearest = next((p for p in (path, *path.parents) if p.exists()), None)
        if nearest is not None and not os.access(nearest, os.W_OK | os.X_OK):
            try:
                why = "a read-only file system" if os.statvfs(nearest).f_flag & os.ST_RDONLY else "no write permission"
            except (OSError, AttributeError):
                why = "no write permission"
            return f"{what} {path} is not writable ({why}{'' if nearest == path else f' at {nearest}'}): {fix}"
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"{what} {path} cannot be made ({os_error_text(e)}): {fix}"
    probe = path / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"x")
    except OSError as e:
        return f"{what} {path} is not writable ({os_error_text(e)}): {fix}"
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


def writable_folder(path: str | os.PathLike, what: str, fix: str = "") -> Path:
    """``path`` made (if missing) and written in by a probe, as :func:`folder_problem` does, before
    long work whose results go there; its problem raised as a one-line UserError."""
    from distill.errors import UserError

    problem = folder_problem(path, what, fix or f"choose another {what} (a folder you can write in)")
    if problem:
        raise UserError(problem)
    return Path(path)
