"""A checkpoint under an s3:// or gs:// prefix: headers read at planning, tensor data at repair, both
with ranged GETs.

`RemotePath` gives an object-store prefix the few path operations that opening a checkpoint uses
(`/`, name, iterdir, is_file, exists, read_bytes, read_text), so engine/io/checkpoint.py applies the
same index and shard rules, with the same messages, to a bucket as to a folder. A shard's header
is fetched as two ranged GETs (the 8-byte length, then the JSON) and validated by the one local
header parser: the fetched prefix is placed in a sparse temporary file of the object's size (no
tensor data is read or written), so layout checks against the object's length apply unchanged.

A RemotePath is also a `RangeSource` (engine/io/bytes.py): the repair's reads of a shard object
are `Storage.read_range` calls (a tensor's byte range, split into concurrent GETs), never a
download of the object. It pickles without its clients, so work units carry it to Ray actors.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError
from .objstore import NoSuchKey, ObjectURI, Storage, is_object_uri, parse_uri
from .safetensors_format import MAX_HEADER_BYTES, ShardHeader, read_header


@dataclasses.dataclass(frozen=True, order=True)
class RemotePath:
    """An object or a prefix in a bucket, with the path operations checkpoint opening needs."""

    uri: ObjectURI
    storage: Storage = dataclasses.field(compare=False, repr=False)
    known_size: int | None = dataclasses.field(default=None, compare=False)  # from a listing: no HEAD needed

    def __str__(self) -> str:
        return str(self.uri)

    def __truediv__(self, name: str | Path) -> RemotePath:
        return RemotePath(self.uri.child(str(name)), self.storage)

    @property
    def name(self) -> str:
        return self.uri.key.rsplit("/", 1)[-1]

    def expanduser(self) -> RemotePath:
        return self

    def resolve(self) -> RemotePath:
        return self

    def iterdir(self) -> Iterator[RemotePath]:
        """Direct children: objects one level below, and each sub-prefix once (as a non-file)."""
        seen: set[str] = set()
        for obj in self.storage.list(self.uri):
            first, sep, _ = obj.uri.relative_to(self.uri).partition("/")
            if first in seen:
                continue
            seen.add(first)
            yield self / first if sep else RemotePath(obj.uri, self.storage, obj.size)

    def is_dir(self) -> bool:
        return self.known_size is None and bool(self.storage.list(self.uri))

    def is_symlink(self) -> bool:
        return False  # object stores have no links

    def exists(self) -> bool:
        return self.is_dir() or self.is_file()

    def is_file(self) -> bool:
        if self.known_size is not None:
            return True
        try:
            self.storage.size(self.uri)
        except NoSuchKey:
            return False
        return True

    def size(self) -> int:
        return self.known_size if self.known_size is not None else self.storage.size(self.uri)

    def read_range(self, begin: int, end: int) -> bytearray:
        """Bytes [begin, end) of the object (concurrent ranged GETs; TruncatedObject past its end)."""
        return self.storage.read_range(self.uri, begin, end)

    def read_bytes(self) -> bytes:
        try:
            return self.storage.read_object(self.uri)
        except NoSuchKey as exc:  # callers that read optional files (config.json) catch OSError
            raise FileNotFoundError(str(exc)) from exc

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")


def remote_root(spec: str) -> RemotePath:
    """The prefix of a checkpoint given as s3://bucket/prefix or gs://bucket/prefix."""
    return RemotePath(parse_uri(spec), Storage())


def read_shard_header(path: Path | RemotePath) -> ShardHeader:
    """A shard's parsed header, local or in a bucket (for a bucket: two ranged GETs, no tensor data)."""
    if not isinstance(path, RemotePath):
        return read_header(path)
    size = path.size()
    head = bytes(path.read_range(0, min(8, size)))
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    fits = len(head) == 8 and n <= MAX_HEADER_BYTES and 8 + n <= size
    body = bytes(path.read_range(8, 8 + n)) if fits else b""  # else the parser says why
    with tempfile.TemporaryDirectory(prefix="dgrepair-header-") as tmp:
        local = Path(tmp) / (path.name or "shard")
        with open(local, "wb") as fh:
            fh.write(head + body)
            fh.truncate(size)  # sparse: the data region is never materialised
        try:
            header = read_header(local)
        except InputError as exc:
            raise InputError(str(exc).replace(str(local), str(path))) from None
    return dataclasses.replace(header, path=path)


__all__ = ["RemotePath", "is_object_uri", "read_shard_header", "remote_root"]
