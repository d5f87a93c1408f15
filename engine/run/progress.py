"""Progress of a run: a tqdm bar on a terminal, a plain line every few seconds anywhere else.

A `ray job submit` log, a redirected stderr or a CI log is not a terminal: a bar there is either
silent or a single carriage-return line at the end, so those get one self-contained line per
interval instead (tensors, bytes, rate, ETA).
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TextIO

from tqdm import tqdm


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def progress_line(label: str, tensors: int, tensors_total: int, done: float, total: float, seconds: float) -> str:
    """`repair: 12/40 tensors, 1.2 GiB/3.4 GiB, 85.3 MiB/s, ETA 0:00:27` (ETA from this run's rate)."""
    rate = done / seconds if seconds > 0 else 0.0
    eta = timedelta(seconds=round((total - done) / rate)) if rate > 0 else "unknown"
    return (f"{label}: {tensors}/{tensors_total} tensors, {_size(done)}/{_size(total)}, {_size(rate)}/s, "
            f"ETA {eta}")


class Progress:
    """Bytes and tensors done; renders as a bar (TTY) or as periodic lines (interval_s > 0)."""

    def __init__(self, label: str, total_bytes: int, tensors_total: int, tensors_done: int, enabled: bool,
                 interval_s: float, stream: TextIO | None) -> None:
        self.label, self.total, self.tensors_total = label, total_bytes, tensors_total
        self.tensors, self.done = tensors_done, 0
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                        disable=not (enabled and tty), file=self.stream, dynamic_ncols=True)
        self.lines = enabled and not tty and interval_s > 0 and total_bytes > 0
        self.t0 = self.last = time.monotonic()

    def update(self, nbytes: int, ntensors: int, note: str = "") -> None:
        self.done += nbytes
        self.tensors += ntensors
        self.bar.update(nbytes)
        self.bar.set_postfix_str(f"tensors {self.tensors}/{self.tensors_total}{note}", refresh=False)
        self.tick()

    def tick(self) -> None:
        """Print a line when the interval has passed (the Ray driver calls this while it waits)."""
        now = time.monotonic()
        if self.lines and now - self.last >= self.interval_s:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        print(progress_line(self.label, self.tensors, self.tensors_total, self.done, self.total, now - self.t0),
              file=self.stream, flush=True)

    def close(self) -> None:
        """A last line with the final counts (once), then the bar goes."""
        if self.lines and self.done:
            self._line(time.monotonic())
        self.lines = False
        self.bar.close()
