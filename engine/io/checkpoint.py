"""Open a checkpoint directory: find its safetensors shards, validate the index, parse headers.

Only headers are read here. Pickle checkpoints are refused by file name before anything is opened,
so nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .bytes import ByteSource
from .hub import locate
from .remote_checkpoint import RemotePath, is_object_uri, read_shard_header, remote_root
from .safetensors_format import AmbiguousJSON, ShardHeader, TensorEntry, strict_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class Checkpoint:
    """A validated safetensors checkpoint: shards by relative name, tensors by name."""

    root: Path | RemotePath  # a local folder, or a bucket prefix
    index_name: str | None
    index_bytes: bytes | None
    shards: dict[str, ShardHeader]
    locations: dict[str, str]  # tensor name -> shard relative name

    def entry(self, name: str) -> tuple[ByteSource, TensorEntry]:
        shard = self.shards[self.locations[name]]
        return shard.path, shard.tensors[name]

    @property
    def scale_fmt(self) -> str | None:
        """config.json's quantization_config.scale_fmt (`ue8m0`: power-of-two FP8 block scales)."""
        try:
            value = json.loads((self.root / "config.json").read_text()).get("quantization_config", {})
            return value.get("scale_fmt") if isinstance(value, dict) else None
        except (OSError, ValueError, AttributeError):
            return None

    @property
    def model_type(self) -> str | None:
        """config.json's model_type (read leniently: a missing or unreadable config gives None)."""
        try:
            value = json.loads((self.root / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    def fingerprint(self) -> dict[str, object]:
        """Cheap identity of the inputs: sizes and header digests, never the tensor data."""
        return {
            "root": str(self.root),
            "index_sha256": hashlib.sha256(self.index_bytes).hexdigest() if self.index_bytes else None,
            "shards": {name: {"size": h.file_size, "header_sha256": hashlib.sha256(h.raw_prefix).hexdigest()}
                       for name, h in sorted(self.shards.items())},
        }

    def sidecar_files(self) -> list[Path]:
        """Top-level files that travel with the weights (config, tokenizer, chat template, ...).

        They are copied whole into the output, so a symlink is followed only when it resolves inside
        the checkpoint folder or, for a Hugging Face cache snapshot, inside that cache's own blob
        store; any other link, and any entry that is neither a file nor a folder, is refused. (Shards
        may link anywhere: they are parsed, never copied whole.)"""
        skip = {self.index_name} | set(self.shards)
        allowed = [self.root, *([store] if (store := hub_blob_store(self.root)) else [])]
        found = []
        for p in sorted(self.root.iterdir()):
            if (p.name in skip or p.name.startswith(".") or p.name.endswith(".safetensors")
                    or p.name.endswith(".safetensors.index.json") or p.name.lower().endswith(PICKLE_SUFFIXES)):
                continue
            if p.is_symlink():
                target = Path(os.path.realpath(p))
                if not any(target.is_relative_to(a) for a in allowed) or not target.exists():
                    inside = " or the Hugging Face cache's blob store" if len(allowed) > 1 else ""
                    raise InputError(f"fine-tune checkpoint {self.root}: sidecar {p.name} is a symlink to "
                                     f"{os.readlink(p)} ({target}), outside the checkpoint folder{inside}; "
                                     "dgrepair copies sidecars into the output, so it refuses links that "
                                     "leave the checkpoint. Replace the link by a copy of the file, or "
                                     "remove it.")
            if p.is_dir():
                continue  # sub-folders are not sidecars
            if not p.is_file():
                raise InputError(f"fine-tune checkpoint {self.root}: sidecar {p.name} is not a regular file "
                                 "(a FIFO, socket or device); remove it from the checkpoint folder.")
            found.append(p)
        return found


def hub_blob_store(root: Path) -> Path | None:
    """`.../models--org--name/blobs` when `root` is a snapshot folder of a Hugging Face cache."""
    if not isinstance(root, Path):
        return None  # a bucket prefix
    repo = root.parent.parent
    if root.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--")) \
            and (repo / "blobs").is_dir():
        return (repo / "blobs").resolve()
    return None


def open_checkpoint(path: str | Path, role: str) -> Checkpoint:
    """Open a local folder, an `org/name[@revision]` Hub repo, or an s3:// / gs:// prefix (role is used
    in messages)."""
    if is_object_uri(path):
        root = remote_root(path)
        if not root.exists():
            raise InputError(f"{role} checkpoint {root}: no such directory (no object under this prefix).")
    else:
        root = locate(path, role)
    if not root.is_dir():
        raise InputError(f"{role} checkpoint {root}: not a directory; pass the folder that holds the "
                         "safetensors files.")
    root = root.resolve()
    indexes = sorted(p for p in root.iterdir() if p.name.endswith(".safetensors.index.json"))
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise InputError(f"{role} checkpoint {root}: several index files ({names}); keep one.")
    if indexes:
        return _open_indexed(root, indexes[0], role)
    files = sorted(p for p in root.iterdir() if p.name.endswith(".safetensors") and p.is_file())
    if not files:
        pickles = sorted(p.name for p in root.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            raise InputError(f"{role} checkpoint {root}: only pickle weights ({', '.join(pickles[:4])}); dgrepair "
                             "refuses pickle files and never unpickles them. Convert the checkpoint to "
                             "safetensors first (for example with transformers: load it where you trust the "
                             "file, then save_pretrained(..., safe_serialization=True)).")
        raise InputError(f"{role} checkpoint {root}: no safetensors files (expected model.safetensors or a "
                         "*.safetensors.index.json with its shards).")
    if len(files) > 1:
        raise InputError(f"{role} checkpoint {root}: {len(files)} safetensors files but no "
                         "*.safetensors.index.json saying which tensor lives where; add the index.")
    header = read_shard_header(files[0])
    return Checkpoint(root=root, index_name=None, index_bytes=None, shards={files[0].name: header},
                      locations=dict.fromkeys(header.tensors, files[0].name))


def _open_indexed(root: Path, index_path: Path, role: str) -> Checkpoint:
    raw = index_path.read_bytes()
    try:
        index = strict_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{index_path}: not valid JSON ({exc}).") from exc
    except AmbiguousJSON as exc:
        raise InputError(f"{index_path}: {exc}; readers disagree on which entry counts. Keep one entry per "
                         "tensor.") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise InputError(f"{index_path}: needs a 'weight_map' object mapping tensor names to shard files.")
    shards: dict[str, ShardHeader] = {}
    for shard_name in sorted(set(weight_map.values())):
        shards[shard_name] = read_shard_header(_shard_path(root, index_path, shard_name, weight_map))
    for name, shard_name in weight_map.items():
        if name not in shards[shard_name].tensors:
            raise InputError(f"{index_path}: tensor {name!r} is mapped to {shard_name}, but that shard has no such "
                             "tensor; the index does not match the shards.")
    for shard_name, header in shards.items():
        stray = [t for t in header.tensors if weight_map.get(t) != shard_name]
        if stray:
            raise InputError(f"{root / shard_name}: tensor {stray[0]!r} (and {len(stray) - 1} more) is stored here "
                             f"but {index_path.name} does not map it to this shard; fix the index.")
    return Checkpoint(root=root, index_name=index_path.name, index_bytes=raw, shards=shards,
                      locations=dict(weight_map))


def _shard_path(root: Path, index_path: Path, shard_name: str, weight_map: dict[str, str]) -> Path:
    example = next(k for k, v in weight_map.items() if v == shard_name)
    rel = Path(shard_name)
    if rel.is_absolute() or ".." in rel.parts or shard_name.strip() == "":
        raise InputError(f"{index_path}: shard {shard_name!r} (for tensor {example!r}) is outside the checkpoint "
                         "directory; shard names must be relative paths inside it.")
    # Checked lexically: a shard may be a symlink elsewhere (the Hugging Face cache links snapshot
    # files to blobs), but the index may not name a path outside the folder.
    path = root / rel
    if not path.is_file():
        raise InputError(f"{index_path}: shard {shard_name!r} (for tensor {example!r}) does not exist in {root}; "
                         "the checkpoint is incomplete. Re-download the missing shard.")
    return path
