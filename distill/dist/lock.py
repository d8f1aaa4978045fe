"""One run per run folder: rank 0 holds an exclusive lock on ``<run.out_dir>/.run.lock`` for the run.

The lock is ``flock`` on an open file, so the kernel releases it on any exit, ``kill -9`` included: a
lock file left by a dead process never blocks the next run (nothing to clean up). The file records the
holder (pid, host, start time) for the refusal message of a second run. Tested with two processes
on one host; across nodes it rests on the shared file system honouring ``flock`` (Linux NFS clients
emulate it with POSIX locks), which the tests here do not cover.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

NAME = ".run.lock"


class FolderLock:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / NAME
        self._fh = None

    def acquire(self) -> str | None:
        """Take the lock; None when taken, else one line naming the run that holds it."""
        import fcntl

        if self._fh is not None:
            return None
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            msg = self._held_by(fh)
            fh.close()
            return msg
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        fh.flush()
        self._fh = fh
        return None

    def holder(self) -> str | None:
        """Without taking the lock: one line naming the live run that holds it, else None."""
        import fcntl

        if not self.path.is_file():
            return None
        with open(self.path, encoding="utf-8") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._held_by(fh)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return None

    def _held_by(self, fh) -> str:
        fh.seek(0)
        try:
            info = json.loads(fh.read() or "{}")
        except ValueError:
            info = {}
        return (f"run folder {self.folder} is in use by another run (pid {info.get('pid', '?')} on host "
                f"{info.get('host', '?')}, started {info.get('started', '?')}): wait for it to end or stop it, "
                f"or pick another --run.out_dir")

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor releases the flock
            self._fh = None
