"""interrupt.SignalWatch: a SIGTERM/SIGINT whose handler's exception was lost is still raised."""

from __future__ import annotations

import signal
import sys
import threading

import pytest

from dgrepair.engine.run.interrupt import Interrupted, SignalWatch


@pytest.fixture
def swallowing_handlers():
    """Handlers that run and raise nothing: what a handler whose exception was printed and ignored
    (inside logging's after-fork hook during ray.init) leaves behind."""
    ran: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: ran.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    yield ran
    for sig, old in previous.items():
        signal.signal(sig, old)


def test_a_lost_sigterm_is_raised_at_the_check(swallowing_handlers):
    watch = SignalWatch()
    signal.raise_signal(signal.SIGTERM)
    assert swallowing_handlers == [signal.SIGTERM]  # the handler ran, and nothing was raised
    with pytest.raises(Interrupted) as raised:
        watch.check()
    assert raised.value.signum == signal.SIGTERM and raised.value.exit_code == 143
    assert watch.stop() == set()  # stopped once: nothing more to report


def test_sigint_is_raised_and_other_signals_are_not(swallowing_handlers):
    watch = SignalWatch()
    signal.raise_signal(signal.SIGUSR1)
    signal.raise_signal(signal.SIGINT)
    with pytest.raises(Interrupted) as raised:
        watch.check()
    assert raised.value.signum == signal.SIGINT
    quiet = SignalWatch()
    signal.raise_signal(signal.SIGUSR1)
    quiet.check()  # no SIGTERM/SIGINT: nothing raised


def test_the_previous_wakeup_fd_is_restored_and_other_threads_are_left_alone(swallowing_handlers):
    watch = SignalWatch()
    watch.stop()
    assert signal.set_wakeup_fd(-1) == -1  # pytest's main thread had none, and has none again
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(SignalWatch().stop()))
    thread.start()
    thread.join()
    assert outcome == [set()]  # off the main thread set_wakeup_fd would raise; the watch does nothing


class _RaisesWhenCollected:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __del__(self) -> None:
        raise self.exc


def test_only_a_lost_signal_exception_goes_unprinted(monkeypatch):
    printed: list[type] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: printed.append(type(u.exc_value)))
    watch = SignalWatch()
    _RaisesWhenCollected(SystemExit(15))  # collected at once: an exception nobody can catch
    _RaisesWhenCollected(Interrupted(signal.SIGINT))
    _RaisesWhenCollected(ValueError("a real bug"))
    watch.stop()
    _RaisesWhenCollected(SystemExit(15))
    assert printed == [ValueError, SystemExit]  # the last one after the watch stopped
