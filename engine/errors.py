"""Errors the user can act on: each names the file (and tensor) and says what to do."""

from __future__ import annotations


class DGRepairError(Exception):
    """Base class; the CLI prints the message and exits non-zero (no traceback)."""

    exit_code = 2


class InputError(DGRepairError):
    """A checkpoint or option is unusable as given; inputs are never modified."""


class OutputError(DGRepairError):
    """The output directory cannot be used as asked (inside an input, another run, ...)."""


class RepairFailure(DGRepairError):
    """Repair of one tensor failed (for example NaN/Inf in an input tensor)."""

    exit_code = 3
