"""The exclusive lock on an output folder: one run per --out at a time.

`OutputLock` is the interface the run holds for its whole life; `FileOutputLock` implements it with
`flock(2)` on `OUT/dgrepair/lock`, on the output's own filesystem. The kernel drops a flock when its
holder dies, so a lock left by a killed run is free at once; the holder's record (host, pid, start
time, plan id) stays in the file and is reported when the next run takes it over. A clean release
empties the record first. An object-store output implements the same interface with a
conditional put and a heartbeat (engine/output/bucket_lock.py).
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from ..errors import OutputError

LOCK_FILE = "lock"


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) an output lock."""

    host: str
    pid: int
    started_utc: str
    plan_id: str

    @classmethod
    def here(cls, plan_id: str) -> LockHolder:
        return cls(socket.gethostname(), os.getpid(),
                   dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), plan_id)

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started_utc}, plan {self.plan_id}"

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        try:
            obj = json.loads(text)
            return cls(str(obj["host"]), int(obj["pid"]), str(obj["started_utc"]), str(obj["plan_id"]))
        except (ValueError, KeyError, TypeError):
            return None


class OutputLock(Protocol):
    """Exclusive ownership of one output folder for one run."""

    def acquire(self, holder: LockHolder) -> LockHolder | None:
        """Take the lock or raise OutputError naming the folder and the live holder.
        Returns the record of a dead holder whose lock was taken over, else None."""

    def check(self) -> None:
        """Raise OutputError if the lock was lost to another run (a lease that expired)."""

    def release(self) -> None:
        """Give the lock up (idempotent)."""


class FileOutputLock:
    """`flock` on `OUT/dgrepair/lock` (created if missing, never deleted: deleting a flock file races)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / "dgrepair" / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, holder: LockHolder) -> LockHolder | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            previous = LockHolder.parse(_read_all(fd))
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = previous.describe() if previous else "a run that has not yet recorded itself"
                raise OutputError(f"--out {self.out} is locked by another dgrepair run ({who}; lock file "
                                  f"{self.path}). Wait for it to finish or stop it (SIGTERM); never run two "
                                  "repairs on one output folder.") from None
            raise OutputError(f"--out {self.out}: cannot lock {self.path} ({exc.strerror}); this filesystem "
                              "does not support flock. Write the output to a local disk or an NFSv4 mount.") from None
        stale = LockHolder.parse(_read_all(fd))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(holder)) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return stale

    def check(self) -> None:
        """A flock is never lost while its holder lives."""

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty record means: released cleanly
        except OSError:
            pass  # a full or read-only disk: the record stays, the next run reports a takeover
        finally:
            os.close(fd)  # closing drops the flock


def _read_all(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace")
    except OSError:
        return ""
