"""Head start: the driver repairs units itself while an embedded Ray cluster starts.

On a workstation the embedded start is mostly waiting: `ray.init` took 4.0 s and the actors then
imported torch and scipy for another 2.4 s (2 cores, 2026-12-02), with the cores about three
quarters idle. One background thread of the driver runs units meanwhile, in the actors' own
largest-first order (so the small units still fill the end of the run), and takes no new unit once
the first actor is ready; the one it is running then finishes beside the actors. Measured on the
8-layer benchmark pair (2 cores, 3 alternating rounds): taking the largest first ended 0-3 s sooner
than taking the smallest first. The driver's own thread commits
what it finished, like an actor's result.

The thread is one lane (run/lanes.py): the phase's own step with the actors' frozen settings, so
the same bytes (ADR 0016); a unit that raises is handed back (an actor runs it again, and its error
is reported as any actor's is), and no unit starts after that; `close` (a signal, or the run
failing) abandons a unit that is not writing yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .jobs import StepSettings
from .lanes import Lanes
from .session import Phase

THREAD_NAME = "dgrepair-head-start"  # the thread's name, for traces and tests


class HeadStart(Lanes):
    """One lane of a phase's units, in the actors' order, until the driver stops it."""

    def __init__(self, phase: Phase[Any], settings: StepSettings, order: Sequence[int]) -> None:
        super().__init__(phase, settings, order, count=1, name=THREAD_NAME)
