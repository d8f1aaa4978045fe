"""User errors and the one entry wrapper of every launcher.

A :class:`UserError` is a problem with what the user gave (a config key, a CLI flag, a YAML or
DeepSpeed JSON file, a data file, a model folder, a checkpoint, a cache): its message is one line
that names the file (and line, key or field where there is one) and what to do. The error classes
of the packages derive from it (``ConfigError``, ``DataError``, ``TokenizerMismatch``,
``CacheMismatch``, ...), and code that reads a user's file turns a low-level failure (``OSError``,
a JSON/YAML/safetensors decode error) into one of them at the place that knows the file's name.
A fault outside the program that only the user can act on is one too, when its line says what to
do: a Ray teacher actor dead past its restart budget (``distill.teacher.TeacherUnavailable``).

:func:`run_cli` is what every launcher's ``__main__`` calls: a UserError exits with status 2 and one
line on stderr, no traceback; anything else is an internal error and keeps its traceback.
``--debug`` (removed from argv) or ``DISTILL_DEBUG=1`` shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Something the user gave is wrong; the message is one line naming it and what to do."""


def debug_enabled(argv: Sequence[str] | None = None) -> bool:
    return os.environ.get("DISTILL_DEBUG", "") not in ("", "0") or "--debug" in (argv or ())


def one_line(msg: str) -> str:
    """The message on one line (a multi-line message keeps its first line and says how many follow)."""
    lines = [x for x in str(msg).splitlines() if x.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0]} (+{len(lines) - 1} more lines; rerun with --debug to see them)"


def _close_process_group() -> None:
    """Tear down this rank's process group (if one was started) before exiting on an error: left to
    interpreter shutdown, its communication threads can abort the process ("terminate called without
    an active exception", exit -6) instead of letting it exit 2."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_cli(main: Callable[[list[str]], int | None], prog: str, argv: Sequence[str] | None = None) -> int:
    """``main(argv)`` with user errors as one line on stderr and exit status 2.

    ``prog`` prefixes the line (e.g. ``knowdist.py``); under several ranks the rank is named too.
    """
    from distill.startup import quiet_third_party

    quiet_third_party()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        rc = main(argv)
    except UserError as e:
        if debug:
            raise
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        where = f" [rank {os.environ.get('RANK', '0')}]" if world > 1 else ""
        print(f"{prog}{where}: error: {one_line(e)}", file=sys.stderr, flush=True)
        _close_process_group()
        return EXIT_USER_ERROR
    return 0 if rc is None else int(rc)
