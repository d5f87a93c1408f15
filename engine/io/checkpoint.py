"""Open a checkpoint directory: find its safetensors shards, validate the index, parse headers.

Only headers are read here. Pickle checkpoints are refused by file name before anything is opened,
so nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .hub import looks_like_repo
from .hub import resolve as resolve_hub
from .safetensors_format import ShardHeader, TensorEntry, read_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class Checkpoint:
    """A validated safetensors checkpoint: shards by relative name, tensors by name."""

    root: Path
    index_name: str | None
    index_bytes: bytes | None
    shards: dict[str, ShardHeader]
    locations: dict[str, str]  # tensor name -> shard relative name

    def entry(self, name: str) -> tuple[Path, TensorEntry]:
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
        """Top-level files that travel with the weights (config, tokenizer, chat template, ...)."""
        skip = {self.index_name} | set(self.shards)
        return sorted(p for p in self.root.iterdir()
                      if p.is_file() and p.name not in skip and not p.name.startswith(".")
                      and not p.name.endswith(".safetensors") and not p.name.endswith(".safetensors.index.json")
                      and not p.name.lower().endswith(PICKLE_SUFFIXES))


def open_checkpoint(path: str | Path, role: str) -> Checkpoint:
    """Open a local folder, or an `org/name[@revision]` Hub repo (role is used in messages)."""
    if isinstance(path, str) and looks_like_repo(path):
        path = resolve_hub(path, role)
    root = Path(path).expanduser()
    if not root.exists():
        raise InputError(f"{role} checkpoint {root}: no such directory.")
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
    header = read_header(files[0])
    return Checkpoint(root=root, index_name=None, index_bytes=None, shards={files[0].name: header},
                      locations=dict.fromkeys(header.tensors, files[0].name))


def _open_indexed(root: Path, index_path: Path, role: str) -> Checkpoint:
    raw = index_path.read_bytes()
    try:
        index = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{index_path}: not valid JSON ({exc}).") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise InputError(f"{index_path}: needs a 'weight_map' object mapping tensor names to shard files.")
    shards: dict[str, ShardHeader] = {}
    for shard_name in sorted(set(weight_map.values())):
        shards[shard_name] = read_header(_shard_path(root, index_path, shard_name, weight_map))
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
