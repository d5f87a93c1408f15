"""Byte I/O shared by every reader and writer: exact-range reads, positioned writes, hashed copies,
atomic whole-file writes.

Every input read goes through `read_range` / `iter_range` (and `copy_range`, `sha256_range`,
`copy_atomic` built on them), which take a `ByteSource`: a local path, read with pread as always,
or any `RangeSource` (an object in a bucket: engine/io/remote_checkpoint.py's RemotePath), read
with its own ranged requests. So repair, passthrough copies and the quantized and packed steps
read a bucket exactly as they read a file, and nothing else in the engine knows the difference.

One rule for truncated files: a range that ends past the end of its file raises `TruncatedFile`
(an InputError naming the file and the byte), whoever reads it. Resume verification catches it and
redoes the entry; everywhere else it stops the run with exit code 2. A range source raises its own
error for the same defect (an object shorter than its header says: `TruncatedObject`, also exit 2);
when the caller names the tensor, it is added to the message.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from ..errors import InputError
from .objstore import NoSuchKey, StorageError

CHUNK = 64 << 20
TMP_SUFFIX = ".dgrepair-tmp"


class TruncatedFile(InputError):
    """A byte range ends past the end of its file."""


def _truncated(path: Path, at: int) -> TruncatedFile:
    return TruncatedFile(f"{path}: unexpected end of file at byte {at}; the file is truncated.")


class RangeSource(Protocol):
    """A byte source that is not a local file: an object read with ranged requests. It raises its
    own StorageError (naming where it is) for a range it cannot return whole."""

    def size(self) -> int: ...

    def read_range(self, begin: int, end: int) -> bytearray: ...


ByteSource = Path | RangeSource  # what every input read accepts


def _is_local(src: object) -> bool:
    return isinstance(src, (str, os.PathLike))


def _remote_range(src: RangeSource, begin: int, end: int, tensor: str | None) -> bytearray:
    try:
        return src.read_range(begin, end)
    except NoSuchKey as exc:  # it was there when the headers were read
        raise exc.about(f"tensor {tensor!r}" if tensor else "",
                        "no such object; it existed when the run was planned, so it was deleted or moved "
                        "since. Restore it and run the same command again.") from exc
    except StorageError as exc:
        if tensor is None:
            raise
        raise exc.about(f"tensor {tensor!r}") from exc


def read_range(path: ByteSource, begin: int, end: int, tensor: str | None = None) -> bytearray:
    """Read an exact byte range (a local file: pread, no shared file position, safe across threads;
    a range source: its concurrent ranged GETs). `tensor` names what is read in a remote error."""
    if not _is_local(path):
        return _remote_range(path, begin, end, tensor)
    buf = bytearray(end - begin)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = 0
        while got < len(buf):
            n = os.preadv(fd, [view[got:]], begin + got)
            if n <= 0:
                raise _truncated(path, begin + got)
            got += n
    finally:
        os.close(fd)
    return buf


def iter_range(path: ByteSource, begin: int, end: int, chunk: int = CHUNK,
               tensor: str | None = None) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) chunks of [begin, end), in order; the one read loop of copy and hash."""
    if not _is_local(path):
        for pos in range(begin, end, chunk):
            yield pos, _remote_range(path, pos, min(pos + chunk, end), tensor)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = begin
        while pos < end:
            data = os.pread(fd, min(chunk, end - pos), pos)
            if not data:
                raise _truncated(path, pos)
            yield pos, data
            pos += len(data)
    finally:
        os.close(fd)


def sha256_range(path: ByteSource, begin: int, end: int) -> str:
    """Hash bytes [begin, end) of a file."""
    digest = hashlib.sha256()
    for _, data in iter_range(path, begin, end):
        digest.update(data)
    return digest.hexdigest()


def copy_range(src: ByteSource, begin: int, end: int, dst: Path, dst_begin: int, tensor: str | None = None) -> str:
    """Copy bytes [begin, end) of src to dst at dst_begin, hashing them on the way."""
    digest = hashlib.sha256()
    fout = os.open(dst, os.O_WRONLY)
    try:
        for pos, data in iter_range(src, begin, end, tensor=tensor):
            digest.update(data)
            _pwrite_fd(fout, dst_begin + pos - begin, data)
    finally:
        os.close(fout)
    return digest.hexdigest()


def pwrite(path: Path, offset: int, data) -> None:
    """Write all of `data` (bytes or a buffer) at `offset` of an existing file."""
    fd = os.open(path, os.O_WRONLY)
    try:
        _pwrite_fd(fd, offset, data)
    finally:
        os.close(fd)


def _pwrite_fd(fd: int, offset: int, data) -> None:
    """pwrite may write less than asked: loop until all of it is written."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A temporary sibling of `path` to write; fsynced and renamed over `path` only when the block ends
    cleanly, removed otherwise (a full disk leaves no temporary file)."""
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write a whole file: a reader sees the old file or the new one, never half of one."""
    with _atomic_file(path) as fh:
        fh.write(data)


def copy_atomic(src: ByteSource, dst: Path) -> None:
    """Copy a whole file (or a whole object of a range source) the same way (tmp + fsync + rename)."""
    if not _is_local(src):
        with _atomic_file(dst) as fout:
            for _, data in iter_range(src, 0, src.size()):
                fout.write(data)
        return
    with open(src, "rb") as fin, _atomic_file(dst) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def write_json_atomic(path: Path, obj: Any, *, sort_keys: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode())
