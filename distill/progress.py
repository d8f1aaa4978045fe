"""Progress of a long phase: a tqdm bar on a terminal, plain lines in a redirected log.

A tqdm bar redraws one line with carriage returns, so a log file or a pipe (SLURM output, ``| tee``)
sees nothing until the phase ends. :func:`progress` returns a tqdm bar when stderr is a terminal, and
otherwise a :class:`LineProgress` with the same small interface (``update``, ``set_postfix_str``,
``set_postfix``, ``write``, ``close``, ``n``) that prints one line at most every ``every_s`` seconds
and one when the phase ends, so no phase is silent for long.
"""

from __future__ import annotations

import sys
import time

LINE_EVERY_S = 15.0  # a redirected log gets a progress line at least this often during a phase


def is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _fmt_s(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class LineProgress:
    """``desc: n/total (p%) | elapsed m:ss | eta m:ss | postfix`` on stderr, at most every ``every_s``."""

    def __init__(self, total: int | None, desc: str, *, initial: int = 0, unit: str = "it",
                 every_s: float = LINE_EVERY_S, disable: bool = False):
        self.total, self.desc, self.unit, self.every_s, self.disable = total, desc, unit, every_s, disable
        self.n = self._start = initial
        self._postfix = ""
        self._t0 = self._last = time.monotonic()
        self._closed = False
        self._shown = initial  # n at the last line printed

    def _line(self) -> str:
        el = time.monotonic() - self._t0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"elapsed {_fmt_s(el)}")
        rate = (self.n - self._start) / el if el > 0 else 0.0
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"eta {_fmt_s((self.total - self.n) / rate)}")
        if self._postfix:
            parts.append(self._postfix)
        return " | ".join(parts)

    def _emit(self) -> None:
        if not self.disable:
            print(self._line(), file=sys.stderr, flush=True)
        self._last, self._shown = time.monotonic(), self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.every_s:
            self._emit()

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self._postfix = s

    def set_postfix(self, **kw) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def write(self, s: str) -> None:
        print(s, flush=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._shown:  # the phase's end, unless the last line already said it
                self._emit()


def progress(total: int | None, desc: str, *, initial: int = 0, unit: str = "it", disable: bool = False, **tqdm_kw):
    """A tqdm bar on a terminal (``tqdm_kw`` passed on), else a :class:`LineProgress`."""
    if is_terminal():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, initial=initial, unit=unit, disable=disable, file=sys.stderr, **tqdm_kw)
    return LineProgress(total, desc, initial=initial, unit=unit, disable=disable)
