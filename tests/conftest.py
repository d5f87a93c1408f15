"""Shared fixtures. Test helpers live in tests/fixtures/ (checkpoint writers, references, the mini
frontier checkpoints); it is put on sys.path here so every test group imports them by module name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))

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
