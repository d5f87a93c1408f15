"""Resolve `org/name[@revision]` checkpoints through huggingface_hub.

The index (or `model.safetensors`) is fetched first; then only the shards its weight_map names,
plus the sidecar files, are fetched (allow-patterns derived from the index: no stray `.bin`,
`consolidated.*` or `original/` weights). Files are read from the Hugging Face cache in place and
never written to. `HF_HUB_OFFLINE` (and HF_HUB_CACHE) are read at call time, so the cache alone is
used when offline.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import InputError

REPO_SPEC = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
SIDECAR_PATTERNS = ["*.json", "*.jinja", "*.txt", "*.model", "tokenizer*"]
INDEX = "model.safetensors.index.json"


def looks_like_repo(spec: str) -> bool:
    """`org/name` or `org/name@rev` that is not an existing local path."""
    return bool(REPO_SPEC.match(spec)) and not Path(spec).exists()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(spec: str, role: str) -> Path:
    """Download (or find in the cache) the files a repair needs; return the snapshot folder."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = spec.partition("@")
    common = {"repo_id": repo, "revision": revision or None, "cache_dir": os.environ.get("HF_HUB_CACHE"),
              "local_files_only": _offline()}
    where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if _offline() else "the Hugging Face Hub"
    try:
        try:
            index = json.loads(Path(hf_hub_download(filename=INDEX, **common)).read_text())
            shards = sorted(set(index.get("weight_map", {}).values()))
            patterns = [INDEX, *shards]
        except (LocalEntryNotFoundError, HfHubHTTPError) as exc:
            if "404" not in str(exc) and not isinstance(exc, LocalEntryNotFoundError):
                raise
            hf_hub_download(filename="model.safetensors", **common)
            patterns = ["model.safetensors"]
        folder = snapshot_download(allow_patterns=patterns + SIDECAR_PATTERNS, **common)
    except LocalEntryNotFoundError as exc:
        raise InputError(f"{role} checkpoint {spec}: not found in {where}; download it first or unset "
                         f"HF_HUB_OFFLINE ({exc.__class__.__name__}).") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise InputError(f"{role} checkpoint {spec}: could not be fetched from {where}: {exc}") from exc
    return Path(folder)
