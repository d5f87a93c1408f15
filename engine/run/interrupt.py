"""SIGTERM and SIGINT, handled the same way by every executor and in every phase.

Inside `signals_as_exceptions()` the first SIGTERM or SIGINT raises `Interrupted` in the main thread
at the next Python bytecode (at most one native call later: one SVD block, one `ray.wait` tick).
The exception unwinds through the run's cleanup (commit the finished rows, release the output lock)
and the CLI exits 128 + signal number (143 TERM, 130 INT). A second signal during that cleanup exits
at once with the same code: every file dgrepair writes is atomic, and the kernel drops the lock of a
dead process, so nothing is lost but the uncommitted rows.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """Raised by the handler; a BaseException so `except Exception` blocks never swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


def _handler(signum: int, frame) -> None:  # noqa: ARG001
    for sig in SIGNALS:
        signal.signal(sig, _again)
    raise Interrupted(signum)


def _again(signum: int, frame) -> None:  # noqa: ARG001
    sys.stderr.write(f"dgrepair: second {signal.Signals(signum).name} during cleanup; exiting now.\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def install() -> None:
    """(Re)install the handlers after a library replaced them (ray.init sets its own SIGTERM handler;
    Ray's C++ core resets SIGTERM to the default action on shutdown without Python noticing), so the
    handler is always re-registered with the OS; one of ours stays the one it is. Main thread only."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            current = signal.getsignal(sig)
            signal.signal(sig, current if current in (_handler, _again) else _handler)


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Route SIGTERM/SIGINT to `Interrupted` for the duration; a no-op off the main thread (an
    embedding program owns its signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    install()
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
