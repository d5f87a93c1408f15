"""Accuracy contract of the spectral backends (kernels issue) against the float64 numpy SVD.

Contract: identical rank except for singular values within 1e-6 (relative) of τ;
‖Δ* − Δ*_exact‖_F / ‖Δ*_exact‖_F ≤ 1e-6 for float64 paths and ≤ 1e-3 for guarded float32;
degenerate cases identical across backends.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference
import torch
from spectra import SHAPES, bulk_plus_spikes, with_spectrum

from dgrepair.kernels.spectral import repair_batch
from dgrepair.kernels.threads import cpu_thread_policy, threads_per_worker
from dgrepair.kernels.threshold import ThresholdParams


def check(delta: np.ndarray, backend: str, tol: float) -> tuple[int, str | None]:
    want, r_want, tau = reference.dg_hard(delta)
    s = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    got, stats = repair_batch(torch.from_numpy(delta)[None], ThresholdParams(), backend)
    near = int(np.sum(np.abs(s - tau) <= 1e-6 * tau))
    assert abs(stats[0].rank_kept - r_want) <= near
    if stats[0].rank_kept == r_want:
        err = np.linalg.norm(got[0].numpy().astype(np.float64) - want) / np.linalg.norm(want)
        assert err <= tol, (backend, err)
    return stats[0].rank_kept, stats[0].fallback


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kappa", [None, 1e3, 1e5])
def test_float64_paths_on_spiked_spectra(shape, kappa):
    delta = bulk_plus_spikes(shape, seed=sum(shape), kappa=kappa)
    for backend in ("gram64", "auto"):
        check(delta, backend, 1e-6)


@pytest.mark.parametrize("shape", SHAPES[:4])
def test_cluster_near_tau(shape):
    # a value 1e-3 away from τ must be decided exactly as the reference does
    delta = bulk_plus_spikes(shape, seed=7, near_tau=1e-3)
    rank64, _ = check(delta, "gram64", 1e-6)
    rank32, why = check(delta, "gram32", 1e-3)
    assert rank32 == rank64 == reference.dg_hard(delta)[1]
    # a value 1e-9 from τ may go either way, but nothing else may change
    check(bulk_plus_spikes(shape, seed=8, near_tau=1e-9), "gram64", 1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_guarded_float32(shape):
    plain = bulk_plus_spikes(shape, seed=11)
    rank, why = check(plain, "gram32", 1e-3)
    assert why is None  # a well-conditioned delta stays in float32
    spiky = bulk_plus_spikes(shape, seed=12, kappa=1e4)
    rank, why = check(spiky, "gram32", 1e-6)  # the fallback is the float64 path
    assert why == "kappa>1000"


@pytest.mark.parametrize("backend", ["exact", "gram64", "gram32", "auto"])
def test_degenerate_cases_identical_across_backends(backend):
    zero, _ = repair_batch(torch.zeros(2, 80, 50), ThresholdParams(), backend)
    assert torch.count_nonzero(zero) == 0
    low = torch.from_numpy(with_spectrum((80, 50), np.array([5.0, 2.0, 1.0]), 3))[None]
    got, stats = repair_batch(low, ThresholdParams(), backend)
    assert stats[0].degenerate == "median_zero" and stats[0].rank_kept == 3 and torch.equal(got, low)


def test_thread_policy_restores_torch_threads_and_splits_cores():
    before = torch.get_num_threads()
    with cpu_thread_policy(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert threads_per_worker(2, cores=2) == 1
    assert threads_per_worker(3, cores=16) == 5
    assert threads_per_worker(8, cores=2) == 1


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-3)])
@pytest.mark.parametrize("shape", [(600, 300), (300, 600), (2000, 40)])
def test_torch_path_that_cuda_runs_meets_the_contract_on_cpu(shape, dtype, tol):
    """The torch branch of kernels.linalg (addmm Gram, eigvalsh, eigh, matmul projection) is what a
    GPU executes; run it on CPU tensors against the reference and the LAPACK path."""
    from dgrepair.kernels import spectral

    delta = bulk_plus_spikes(shape, seed=31)
    want, r_want, _ = reference.dg_hard(delta)
    d = torch.from_numpy(delta)
    outs = {}
    for lapack in (True, False):
        dst = torch.empty_like(d)
        st = spectral._gram(d, ThresholdParams(), dst, 1 << 12, torch.device("cpu"), dtype, lapack=lapack)
        assert st.rank_kept == r_want and st.fallback is None
        err = np.linalg.norm(dst.numpy().astype(np.float64) - want) / np.linalg.norm(want)
        assert err <= tol, (lapack, err)
        outs[lapack] = (st, dst)
    assert outs[True][0].tau == pytest.approx(outs[False][0].tau, rel=1e-9 if dtype == torch.float64 else 1e-4)
