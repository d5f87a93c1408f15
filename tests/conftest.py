"""Shared fixtures. Test helpers live in tests/fixtures/ (checkpoint writers, references, the mini
frontier checkpoints); it is put on sys.path here so every test group imports them by module name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))

from ckpt import write_sharded  # noqa: E402
from pairs import Pair, make_pair  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _single_threaded_reference_blas():
    """numpy's and scipy's OpenBLAS pools default to every core; on the 2-core CI machine the
    reference SVDs then fight the kernels' own pool (measured 54 s vs 9 s for the contract tests).
    The kernels set their own limits inside, so this only affects the test-side references."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return make_pair(tmp_path)


@pytest.fixture
def small_pair(tmp_path: Path):
    """Two 2-shard checkpoints of two F32 matrices (the bad-input tests' pair)."""
    g = torch.Generator().manual_seed(0)
    base = {"layer.a.weight": torch.randn(64, 32, generator=g), "layer.b.weight": torch.randn(48, 32, generator=g)}
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    write_sharded(tmp_path / "base", {"s1.safetensors": {"layer.a.weight": base["layer.a.weight"]},
                                      "s2.safetensors": {"layer.b.weight": base["layer.b.weight"]}})
    write_sharded(tmp_path / "ft", {"s1.safetensors": {"layer.a.weight": ft["layer.a.weight"]},
                                    "s2.safetensors": {"layer.b.weight": ft["layer.b.weight"]}})
    return tmp_path / "base", tmp_path / "ft"
