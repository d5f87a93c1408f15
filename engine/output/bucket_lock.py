"""The output lock of an object-store --out: an object created with a conditional put, kept alive
by a heartbeat, taken over only when its heartbeat is older than its time-to-live.

A bucket has no flock: nothing tells a reader that the process holding a lock has died. So the
holder rewrites `OUT/dgrepair/lock` every `ttl/4` seconds with a fresh heartbeat time, each time
with a conditional put on the version it wrote last (If-Match), and a lock whose heartbeat is older
than the TTL its holder wrote into it counts as abandoned (the holder promised to beat within
it; --lock-ttl-s only sets this run's own). Taking it over is itself a conditional put on the abandoned
version, so of two runs that both find it abandoned exactly one wins. A holder whose heartbeat
write fails because the object changed has lost the lock; the run notices at its next commit and
stops (exit 2) rather than write beside another run. A clean release deletes the object.

Clocks: the heartbeat time is the holder's UTC wall clock; keep the TTL well above the clock skew
between machines (the default, 120 s, assumes NTP).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from dataclasses import asdict

from ..errors import OutputError
from ..io.objstore import NoSuchKey, ObjectURI, ObjectVersion, Storage, StorageError
from .lock import LockHolder

DEFAULT_TTL_S = 120.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class BucketOutputLock:
    """`OutputLock` on `OUT/dgrepair/lock` in a bucket (see the module docstring)."""

    def __init__(self, storage: Storage, out: ObjectURI, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.storage = storage
        self.out = out
        self.uri = out.child("dgrepair/lock")
        self.ttl_s = ttl_s
        self._holder: LockHolder | None = None
        self._version: ObjectVersion | None = None
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _record(self, holder: LockHolder) -> bytes:
        return (json.dumps({**asdict(holder), "heartbeat_utc": _now().isoformat(timespec="seconds"),
                            "ttl_s": self.ttl_s}) + "\n").encode()

    def acquire(self, holder: LockHolder) -> LockHolder | None:
        tag = self.storage.create(self.uri, self._record(holder))
        stale: LockHolder | None = None
        if tag is None:
            try:
                text, seen = self.storage.read_tagged(self.uri)
            except NoSuchKey:  # released (deleted) between the two calls: try once more
                text, seen = b"", None
            record = _parse(text)
            age = _age_s(record)
            ttl = _ttl_s(record, self.ttl_s)
            if seen is None or not seen.precondition():  # gone meanwhile (or a server with no ETags)
                tag = self.storage.create(self.uri, self._record(holder))
            elif age is not None and age > ttl:
                stale = LockHolder.parse(text.decode("utf-8", "replace"))
                tag = self.storage.replace_if(self.uri, self._record(holder), seen)
            if tag is None:
                who = LockHolder.parse(text.decode("utf-8", "replace"))
                beat = f", last heartbeat {age:.0f} s ago" if age is not None else ""
                after = (f"a lock whose holder died is taken over once its heartbeat is older than {ttl:g} s" if
                         age is not None else "its record is unreadable, so it is never taken over: if no run uses "
                         "this output, delete that object")
                raise OutputError(f"--out {self.out} is locked by another dgrepair run "
                                  f"({who.describe() if who else 'unknown holder'}{beat}; lock object {self.uri}). "
                                  f"Wait for it to finish or stop it (SIGTERM); {after}.")
        self._holder, self._version = holder, tag
        self._beat = threading.Thread(target=self._heartbeat, name="dgrepair-lock-heartbeat", daemon=True)
        self._beat.start()
        return stale

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4) and not self._lost.is_set():
            self.beat()

    def beat(self) -> None:
        """One heartbeat: rewrite the record if the object is still the version this run wrote."""
        if self._holder is None or self._version is None:
            return
        try:
            tag = self.storage.replace_if(self.uri, self._record(self._holder), self._version)
        except StorageError:
            return  # a transient failure: the next beat retries well within the TTL
        if tag is None:
            self._lost.set()
        else:
            self._version = tag

    def check(self) -> None:
        """Raise if another run took the lock over (this run's heartbeat was too late)."""
        if self._lost.is_set():
            raise OutputError(f"--out {self.out}: the output lock {self.uri} was taken over by another run "
                              "(this run's heartbeat came too late, e.g. the machine was suspended); stopping so "
                              "the two runs never write the same output. Re-run once the other run has finished.")

    def release(self) -> None:
        if self._holder is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=30)
        self._holder = None
        if self._lost.is_set():
            return  # the lock is another run's now
        try:
            self.storage.delete(self.uri)
        except StorageError:
            pass  # the next run takes it over once the heartbeat is older than the TTL


def _parse(text: bytes) -> dict:
    try:
        obj = json.loads(text)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def _ttl_s(record: dict, default: float) -> float:
    try:
        return float(record["ttl_s"])
    except (KeyError, ValueError, TypeError):
        return default


def _age_s(record: dict) -> float | None:
    try:
        return (_now() - dt.datetime.fromisoformat(str(record["heartbeat_utc"]))).total_seconds()
    except (KeyError, ValueError, TypeError):
        return None
