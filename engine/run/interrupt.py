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


class SignalWatch:
    """Notes every SIGTERM/SIGINT from its start until `check`, whichever Python handler ran for it.

    A handler's exception can be lost: Python runs a signal's handler at the main thread's next
    bytecode, and when that bytecode belongs to a callback whose exceptions are printed and ignored
    (logging's after-fork hook, run when a library starts a subprocess with a `preexec_fn`, as
    ray.init does), the run goes on as if no signal had come (seen: `Exception ignored in:
    <function _releaseLock>` ... `SystemExit: 15` during Ray's start-up, and the run kept going). The
    C-level handler also writes the signal's number to the wakeup fd (`signal.set_wakeup_fd`), so a
    pipe there keeps the record; and while the watch runs, the lost exception of such a handler is
    not printed as a traceback (`sys.unraisablehook`; every other unraisable exception still is), since
    `check` raises it properly. Main thread only; a no-op elsewhere (an embedding program's signals)."""

    def __init__(self) -> None:
        self._pipe: tuple[int, int] | None = None
        self._previous = -1
        self._previous_hook = sys.unraisablehook
        if threading.current_thread() is threading.main_thread():
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.set_blocking(write, False)
            self._pipe = (read, write)
            self._previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            sys.unraisablehook = self._unraisable

    def _unraisable(self, unraisable) -> None:
        if not isinstance(unraisable.exc_value, (SystemExit, Interrupted)):
            self._previous_hook(unraisable)

    def stop(self) -> set[int]:
        """Stop noting (the previous wakeup fd back); the SIGTERM/SIGINT numbers noted. Idempotent."""
        if self._pipe is None:
            return set()
        read, write = self._pipe
        self._pipe = None
        signal.set_wakeup_fd(self._previous)
        sys.unraisablehook = self._previous_hook
        seen = b""
        try:
            while chunk := os.read(read, 4096):
                seen += chunk
        except BlockingIOError:
            pass
        finally:
            os.close(read)
            os.close(write)
        return {s for s in seen if s in SIGNALS}

    def check(self) -> None:
        """Stop, and raise `Interrupted` for a signal noted, SIGTERM before SIGINT (its handler's
        exception may have been lost; if it was not, it is already unwinding and this is not reached)."""
        noted = self.stop()
        if noted:
            raise Interrupted(signal.SIGTERM if signal.SIGTERM in noted else min(noted))
