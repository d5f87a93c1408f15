"""Header-level safetensors parsing and validation, plus byte-range reads.

The header is parsed by hand (8-byte little-endian length + JSON) so that planning never touches
tensor data, the raw header bytes can be reproduced byte for byte in the output, and every
structural defect gets an error naming the file and the tensor. Rules follow the format's
reference implementation (safetensors/src/tensor.rs): contiguous offsets from 0, no holes, sizes
equal to numel * itemsize, last end equal to the data length.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from .bytes import ByteSource, read_range

MAX_HEADER_BYTES = 100_000_000  # the Rust reader's MAX_HEADER_SIZE

# safetensors dtype -> (bits per element, torch dtype or None when torch cannot hold it)
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
FLOAT_DTYPES_REPAIRABLE = ("F32", "F16", "BF16")
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's header entry; offsets are absolute in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ShardHeader:
    """A parsed and validated safetensors header."""

    path: ByteSource  # a local file, or the shard's object in a bucket (a RemotePath)
    header_len: int
    raw_prefix: bytes  # the first 8 + header_len bytes, reproduced verbatim in the output
    file_size: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] | None

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def output_prefix(header: ShardHeader) -> bytes:
    """The output shard's length + header: the fine-tune's bytes verbatim when they already carry
    `__metadata__["format"]` (transformers refuses files without it); otherwise the same entries
    with `format: pt` added, padded to 8 bytes. Data offsets are relative, so they do not change."""
    if header.metadata is not None and "format" in header.metadata:
        return header.raw_prefix
    obj = json.loads(header.raw_prefix[8:].decode("utf-8"))
    obj.pop("__metadata__", None)
    text = json.dumps({"__metadata__": {**(header.metadata or {}), "format": "pt"}, **obj},
                      separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class AmbiguousJSON(ValueError):
    """JSON that two conforming readers may read differently (duplicate keys, NaN/Infinity)."""


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            what = f"tensor {key!r}" if isinstance(value, dict) and "data_offsets" in value else f"key {key!r}"
            raise AmbiguousJSON(f"has a duplicate {what}")
        seen[key] = value
    return seen


def _no_constant(name: str) -> object:
    raise AmbiguousJSON(f"holds the non-standard JSON constant {name}")


def strict_json(text: str) -> object:
    """json.loads that refuses duplicate keys at any depth and NaN/Infinity (which the Rust reader rejects)."""
    return json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_no_constant)


def read_header(path: Path) -> ShardHeader:
    """Parse and validate a safetensors file's header without reading tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: file is {size} bytes, too short for a safetensors header; "
                                 "the file is truncated or not safetensors. Re-download or re-save it.")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:
                raise InputError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit; "
                                 "the file is corrupt or not safetensors.")
            if 8 + n > size:
                raise InputError(f"{path}: header claims {n} bytes but the file has only {size - 8} after "
                                 "the length prefix; the file is truncated. Re-download or re-save it.")
            raw = fh.read(n)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror}).") from exc
    try:
        text = raw.decode("utf-8")
        obj = strict_json(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: header is not valid UTF-8 JSON ({exc}); the file is corrupt.") from exc
    except AmbiguousJSON as exc:
        raise InputError(f"{path}: header {exc}; readers disagree on such a file (one takes the first, another "
                         "the last). Re-save the checkpoint with a standard safetensors writer.") from None
    if not isinstance(obj, dict) or not text.lstrip().startswith("{"):
        raise InputError(f"{path}: header is not a JSON object; the file is corrupt.")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and (not isinstance(metadata, dict)
                                 or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise InputError(f"{path}: __metadata__ must map strings to strings.")
    data_start = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, spec in obj.items():
        entries[name] = _entry(path, name, spec, data_start)
    _check_layout(path, entries, data_start, size - data_start)
    return ShardHeader(path=path, header_len=n, raw_prefix=head + raw, file_size=size, tensors=entries,
                       metadata=metadata)


def _entry(path: Path, name: str, spec: object, data_start: int) -> TensorEntry:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise InputError(f"{path}: tensor {name!r}: header entry must have exactly dtype, shape, data_offsets.")
    dtype, shape, offs = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise InputError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}.")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InputError(f"{path}: tensor {name!r}: shape must be a list of non-negative integers, got "
                         f"{json.dumps(shape)}; the header is corrupt.")
    if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)
            or not 0 <= offs[0] <= offs[1]):
        raise InputError(f"{path}: tensor {name!r}: data_offsets must be [begin, end] integers with "
                         f"0 <= begin <= end, got {json.dumps(offs)}; the header is corrupt.")
    want_bits = math.prod(shape) * DTYPE_BITS[dtype]
    if want_bits % 8 or offs[1] - offs[0] != want_bits // 8:
        raise InputError(f"{path}: tensor {name!r}: {dtype}{shape} needs {want_bits / 8:g} bytes but data_offsets "
                         f"span {offs[1] - offs[0]}; the header is corrupt.")
    return TensorEntry(name, dtype, tuple(shape), data_start + offs[0], data_start + offs[1])


def _is_int(value: object) -> bool:
    """A JSON integer: Python's bool is an int, JSON's true is not."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_layout(path: Path, entries: dict[str, TensorEntry], data_start: int, data_len: int) -> None:
    cursor = 0  # relative to the data buffer
    for e in sorted(entries.values(), key=lambda t: (t.begin, t.end)):
        rel_begin, rel_end = e.begin - data_start, e.end - data_start
        if rel_begin < cursor:
            raise InputError(f"{path}: tensor {e.name!r}: data_offsets overlap the previous tensor; the header "
                             "is corrupt.")
        if rel_begin > cursor:
            raise InputError(f"{path}: tensor {e.name!r}: a {rel_begin - cursor}-byte hole precedes it; the "
                             "header is corrupt.")
        if rel_end > data_len:
            raise InputError(f"{path}: tensor {e.name!r}: data_offsets end at {rel_end} but the file holds only "
                             f"{data_len} data bytes; the file is truncated. Re-download or re-save it.")
        cursor = rel_end
    if cursor != data_len:
        raise InputError(f"{path}: {data_len - cursor} bytes after the last tensor; the file is corrupt or was "
                         "appended to.")


def read_tensor(path: ByteSource, entry: TensorEntry) -> torch.Tensor:
    """Read one tensor's bytes (from a local file or a bucket) into a torch tensor of its stored
    dtype and shape."""
    torch_dtype = TORCH_DTYPES.get(entry.dtype)
    if torch_dtype is None:
        raise InputError(f"{path}: tensor {entry.name!r}: dtype {entry.dtype} cannot be loaded as a dense tensor.")
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=torch_dtype)
    buf = read_range(path, entry.begin, entry.end, tensor=entry.name)
    return torch.frombuffer(buf, dtype=torch_dtype).reshape(entry.shape)


def build_header(specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """8-byte length + JSON header for tensors laid out in the given order, padded to 8 bytes."""
    obj: dict[str, object] = {"__metadata__": metadata if metadata is not None else {"format": "pt"}}
    pos = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * DTYPE_BITS[dtype] // 8
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    text = json.dumps(obj, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


TORCH_TO_ST = {v: k for k, v in TORCH_DTYPES.items()}


def write_streaming(path: Path, tensors, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file from an iterable of (name, tensor-producing callable, dtype, shape).

    Tensors are produced and written one at a time, so memory holds one tensor, not the file.
    """
    items = list(tensors)
    header = build_header([(n, TORCH_TO_ST[d], tuple(s)) for n, _, d, s in items], metadata)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(header)
        for name, make, dtype, shape in items:
            t = make()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {t.dtype}{tuple(t.shape)}, declared {dtype}{tuple(shape)}")
            fh.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
    os.replace(tmp, path)
