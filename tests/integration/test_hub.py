"""Hub inputs, offline: a Hugging Face cache tree built by the test in the real layout
(models--org--name/{blobs,snapshots/<sha>,refs/main}) is resolved with HF_HUB_OFFLINE=1; only the
files named by the index are used, and the cache is left untouched. docs/formats.md row
"Offline / partial fetch"."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from ckpt import tree_digest
from hubcache import SHA, cache_repo
from safetensors.torch import save_file

from dgrepair.cli import main


def shard_bytes(tmp: Path, tensors: dict[str, torch.Tensor]) -> bytes:
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    return tmp.read_bytes()


def test_offline_cache_repos_are_repaired_and_the_cache_is_untouched(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(96, 64, generator=g)
    w1 = w0 + torch.randn(96, 3, generator=g) @ torch.randn(3, 64, generator=g) + 0.01 * torch.randn(96, 64,
                                                                                                      generator=g)
    cache = tmp_path / "hub"
    index = {"metadata": {}, "weight_map": {"a.weight": "model-1-of-1.safetensors"}}
    cache_repo(cache, "org/base", {"model.safetensors": shard_bytes(tmp_path / "b", {"a.weight": w0}),
                                   "config.json": b'{"model_type": "llama"}'})
    cache_repo(cache, "org/sft", {"model.safetensors.index.json": json.dumps(index).encode(),
                                  "model-1-of-1.safetensors": shard_bytes(tmp_path / "f", {"a.weight": w1}),
                                  "config.json": b'{"model_type": "llama"}',
                                  "pytorch_model.bin": b"never fetched or opened"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    before = tree_digest(cache)
    out = tmp_path / "out"
    assert main(["repair", "--base", "org/base", "--ft", f"org/sft@{SHA}", "--out", str(out), "--no-progress",
                 "--in-process"]) == 0
    assert tree_digest(cache) == before  # nothing written into the cache
    assert (out / "model-1-of-1.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "pytorch_model.bin").exists()
    summary = json.loads((out / "dgrepair" / "summary.json").read_text())
    assert summary["totals"]["matrices_repaired"] == 1
    assert str(cache) in summary["inputs"]["ft"]["root"]


def test_missing_repo_offline_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    assert main(["plan", "--base", "org/nothing", "--ft", "org/nothing"]) == 2
    err = capsys.readouterr().err
    assert "org/nothing" in err and "HF_HUB_OFFLINE" in err
