"""Resolve `org/name[@revision]` checkpoints through huggingface_hub.

The index (or `model.safetensors`) is fetched first; then only the shards its weight_map names,
plus the sidecar files, are fetched (allow-patterns derived from the index: no stray `.bin`,
`consolidated.*` or `original/` weights). Files are read from the Hugging Face cache in place and
never written to. `HF_HUB_OFFLINE` (and HF_HUB_CACHE) are read at call time, so the cache alone is
used when offline.

What counts as a Hub id: an argument that exists locally is a path; one written as a path (starts
with `.`, `/`, `~`, or has more than one `/`) is a path even when missing, so a typo is "no such
directory" at once. Anything else of the form org/name is first asked about with a single request,
so a typo'd folder or an unreachable Hub fails in seconds instead of after a storm of retries.
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
PROBE_TIMEOUT_S = 10.0


def looks_like_path(spec: str) -> bool:
    """Written as a path: starts with `.`, `/` or `~`, or has more than one `/` before any @revision."""
    return spec.startswith((".", "/", "~")) or spec.partition("@")[0].count("/") > 1


def looks_like_repo(spec: str) -> bool:
    """`org/name` or `org/name@rev` that is not an existing local path nor written as one."""
    return bool(REPO_SPEC.match(spec)) and not looks_like_path(spec) and not Path(spec).exists()


def locate(spec: str | Path, role: str) -> Path:
    """A local folder when `spec` exists or is written as a path (missing: an error at once, no
    network); otherwise a Hub repo id, resolved through the cache or the Hub."""
    if isinstance(spec, Path) or Path(spec).expanduser().exists() or not looks_like_repo(spec):
        root = Path(spec).expanduser()
        if not root.exists():
            raise InputError(f"{role} checkpoint {spec}: no such directory.")
        return root
    return resolve(spec, role)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _probe(repo: str, revision: str | None, spec: str, role: str) -> None:
    """One request, no retries: a typo'd folder or an unreachable Hub fails in seconds."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    head = f"{role} checkpoint {spec}: no local folder {spec}"
    try:
        HfApi().model_info(repo, revision=revision, timeout=PROBE_TIMEOUT_S)
    except GatedRepoError as exc:
        raise InputError(f"{head}, and Hub repo {repo} is gated: accept its terms on the Hub and log in "
                         "(`hf auth login` or HF_TOKEN).") from exc
    except RepositoryNotFoundError as exc:
        raise InputError(f"{head} and no Hub repo {repo} (or it is private: log in with `hf auth login` or set "
                         "HF_TOKEN). Check the spelling of the path or the repo id.") from exc
    except RevisionNotFoundError as exc:
        raise InputError(f"{head}, and Hub repo {repo} has no revision {revision!r}.") from exc
    except Exception as exc:  # connection refused, DNS, timeout, HTTP 5xx: one try, then stop
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{head}, and the Hugging Face Hub could not be asked about repo {repo} ({first}). If "
                         "it is a local folder, check the path; if it is a Hub repo, check the network.") from exc


def resolve(spec: str, role: str) -> Path:
    """Download (or find in the cache) the files a repair needs; return the snapshot folder."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = spec.partition("@")
    offline = _offline()
    if not offline:
        _probe(repo, revision or None, spec, role)
    common = {"repo_id": repo, "revision": revision or None, "cache_dir": os.environ.get("HF_HUB_CACHE"),
              "local_files_only": offline}
    where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face Hub"
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
        if offline:
            raise InputError(f"{role} checkpoint {spec}: no local folder {spec}, and repo {repo} is not in "
                             f"{where}; download it first or unset HF_HUB_OFFLINE.") from exc
        raise InputError(f"{role} checkpoint {spec}: Hub repo {repo} has neither {INDEX} nor model.safetensors "
                         "(dgrepair reads safetensors checkpoints only).") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise InputError(f"{role} checkpoint {spec}: could not be fetched from {where}: {exc}") from exc
    return Path(folder)
