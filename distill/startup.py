"""Start-up of every launcher (:func:`distill.errors.run_cli` calls :func:`quiet_third_party`).

Third-party messages that repeat on every process start and say nothing the run's own log does not
(each rank printing DeepSpeed's "Setting accelerator to CPU" although the trainer logs ``device=cpu``)
are filtered here, once, by their exact text, so a real warning from the same library still shows.
"""

from __future__ import annotations

import logging

# (logger name, start of the message) pairs dropped; the trainer's own start line says the same.
_DROPPED = (
    ("DeepSpeed", "Setting accelerator to CPU."),  # deepspeed/accelerator/real_accelerator.py: no CUDA found
)


class _DropKnown(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(msg.startswith(p) for p in self.prefixes)


def quiet_third_party() -> None:
    """Install the filters (idempotent); the loggers need not exist yet. In a redirected log (stderr
    not a terminal) the Hugging Face progress bars (weights loading, downloads) are off too: a bar's
    carriage returns make one unreadable line of a log file (``HF_HUB_DISABLE_PROGRESS_BARS``, unless set)."""
    import os

    from distill.progress import is_terminal

    if not is_terminal():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, prefix in _DROPPED:
        by_logger[name] = by_logger.get(name, ()) + (prefix,)
    for name, prefixes in by_logger.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in log.filters):
            log.addFilter(_DropKnown(prefixes))
