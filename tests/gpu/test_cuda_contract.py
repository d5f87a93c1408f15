"""The CUDA paths of the spectral backends meet the same accuracy contract as the CPU ones
(tests/unit/test_kernel_contract.py). Needs a CUDA device; skipped without one."""

from __future__ import annotations

import numpy as np
import pytest
import reference
import torch
from spectra import SHAPES, bulk_plus_spikes

from dgrepair.kernels.spectral import repair_batch
from dgrepair.kernels.threshold import ThresholdParams


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["exact", "gram64", "gram32"])
def test_cuda_paths_meet_the_same_contract(backend):
    for shape in SHAPES:
        delta = bulk_plus_spikes(shape, seed=21)
        want, r_want, _ = reference.dg_hard(delta)
        got, stats = repair_batch(torch.from_numpy(delta)[None], ThresholdParams(), backend, device="cuda")
        assert stats[0].rank_kept == r_want
        err = np.linalg.norm(got[0].numpy().astype(np.float64) - want) / np.linalg.norm(want)
        assert err <= (1e-3 if backend == "gram32" else 1e-6)
