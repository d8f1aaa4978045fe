"""Stop requests during training: what makes a run checkpoint after its current optimizer step and
exit with ``Trainer.REQUEUE_EXIT`` (75).

:func:`watch_for_stop` appends a one-line reason to a list that the trainer reads just before each
step's all-reduce (so every rank stops at the same step). The reasons: SIGUSR1 (SLURM), SIGTERM and
SIGINT (a second SIGINT interrupts at once, without a checkpoint; a SIGINT ignored when training
starts stays ignored); and, for a rank whose parent is DeepSpeed's ``launch.py``, that parent or the
``deepspeed`` CLI above it having vanished (checked twice a second by a daemon thread; gone, a
zombie or a reused pid all count as gone). Why the launcher is watched, and not through
``PR_SET_PDEATHSIG``: docs/trainer.md, section "Checkpoints, resume, export", "Stopping a run".
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

POLL_S = 0.5  # how often a deepspeed-launched rank checks that its launchers are still there


def _say(msg: str) -> None:
    # os.write, not print: a signal handler that prints while the main thread is inside a print to
    # the same stream raises "reentrant call" in CPython's buffered writer.
    try:
        os.write(sys.stderr.fileno(), (msg + "\n").encode())
    except (OSError, ValueError, AttributeError):
        pass


def _is_ds_launch(cmdline: list[str]) -> bool:
    """``python -u -m deepspeed.launcher.launch ...`` (what the CLI runs) or ``.../launcher/launch.py``."""
    return "deepspeed.launcher.launch" in cmdline[:4] or any(
        a.endswith(os.path.join("deepspeed", "launcher", "launch.py")) for a in cmdline[:3])


def _is_ds_cli(cmdline: list[str]) -> bool:
    """The ``deepspeed`` console script (also installed as ``deepspeed.pt`` and ``ds``) or ``python -m
    deepspeed.launcher.runner``."""
    head = cmdline[:3]
    return "deepspeed.launcher.runner" in head or any(
        os.path.basename(a) in ("deepspeed", "deepspeed.pt", "ds")
        or a.endswith(os.path.join("deepspeed", "launcher", "runner.py")) for a in head)


def launcher_chain() -> list[tuple[object, str]]:
    """``[(psutil.Process, name)]``: deepspeed's ``launch.py`` that started this process and, above
    it, the ``deepspeed`` CLI that started that one (when it did); empty when this process was not
    started by ``launch.py``."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/cmdline", "rb") as fh:  # cheap test before importing psutil
            parent_cmd = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        parent_cmd = None
    if parent_cmd is not None and not _is_ds_launch(parent_cmd):
        return []
    import psutil

    try:
        parent = psutil.Process(ppid)
        if not _is_ds_launch(parent.cmdline()):
            return []
        chain = [(parent, f"deepspeed's launch.py (pid {parent.pid})")]
        above = parent.parent()
        if above is not None and _is_ds_cli(above.cmdline()):
            chain.append((above, f"the deepspeed launcher (pid {above.pid})"))
        return chain
    except psutil.Error:
        return []


def _gone(proc) -> bool:
    import psutil

    try:
        # is_running() compares the creation time too, so a reused pid reads as gone
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def watch_for_stop(reasons: list[str], launchers: list | None = None, *, announce: bool = True) -> Callable[[], None]:
    """Append a reason to ``reasons`` on SIGUSR1 / SIGTERM / SIGINT and when one of ``launchers``
    (:func:`launcher_chain`, taken when the process started: a launcher that is gone by now is still
    noticed, at once) is gone. Returns the function that puts the previous handlers back and stops
    the watcher. Signal handlers are installed from the main thread only. ``announce``: this process
    prints the one-line notices (one process per node: local rank 0)."""
    old: dict[int, object] = {}

    def on_signal(num, frame):
        if num == signal.SIGINT and "SIGINT" in reasons:
            # a second Ctrl-C: the previous handler back, and interrupt now as it would have
            prev = old.get(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGINT, prev)
            if callable(prev):
                prev(num, frame)
            elif prev == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)
            return
        reasons.append(signal.Signals(num).name)
        if num == signal.SIGINT and announce:
            _say("[trainer] SIGINT: stopping after this optimizer step with a checkpoint (exit 75); "
                 "press Ctrl-C again to stop at once without one")

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            old[sig] = signal.signal(sig, on_signal)

    done = threading.Event()
    chain = list(launchers or ())

    def watch():
        while True:
            for proc, name in chain:
                if _gone(proc):
                    reasons.append(f"{name} is gone")
                    if announce:
                        print(f"[trainer] {name} is gone: stopping after this optimizer step with a checkpoint "
                              f"(exit 75)", flush=True)
                    return
            if done.wait(POLL_S):
                return

    watcher = None
    if chain:
        watcher = threading.Thread(target=watch, name="distill-launcher-watch", daemon=True)
        watcher.start()

    def undo():
        done.set()
        if watcher is not None:
            watcher.join(timeout=POLL_S + 1)
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return undo
