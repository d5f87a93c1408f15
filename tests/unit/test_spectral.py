"""The spectral step against the independent float64 numpy SVD reference (docs/maths.md)."""

import math

import numpy as np
import pytest
import reference
import torch

from dgrepair.kernels.dg_constants import omega
from dgrepair.kernels.spectral import BACKENDS, repair_batch
from dgrepair.kernels.threshold import ThresholdParams, threshold_spectrum

F64_BACKENDS = ("exact", "gram64", "auto")

SHAPES = [(256, 256), (400, 100), (100, 400), (1000, 40), (33, 700), (300, 299)]


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_rank_and_delta_star_match_reference(backend, shape):
    rng = np.random.default_rng(hash(shape) % 2**32)
    delta = reference.spiked(*shape, rank=7, rng=rng).astype(np.float32)
    want, r_want, tau_want = reference.dg_hard(delta)
    got, stats = repair_batch(torch.from_numpy(delta)[None], ThresholdParams(), backend)
    assert stats[0].rank_kept == r_want
    assert stats[0].tau == pytest.approx(tau_want, rel=1e-9)
    # Δ* leaves the kernel as float32; its error against the float64 reference is rounding only.
    assert rel(got[0].numpy(), want) <= 1e-6


@pytest.mark.parametrize("backend", F64_BACKENDS)
def test_mean_median_option_matches_reference(backend):
    rng = np.random.default_rng(5)
    delta = reference.spiked(300, 120, rank=5, rng=rng).astype(np.float32)
    want, r_want, tau_want = reference.dg_hard(delta, scale=1.3, median="mean")
    got, stats = repair_batch(torch.from_numpy(delta)[None], ThresholdParams(scale=1.3, median="mean"), backend)
    assert (stats[0].rank_kept, stats[0].tau) == (r_want, pytest.approx(tau_want, rel=1e-9))
    assert rel(got[0].numpy(), want) <= 1e-6


def test_lower_median_and_strict_threshold_worked_by_hand():
    # 4 x 16 delta: p = 4, beta = 0.25, omega = 1.836866. Spectrum 10, 6, 3, 1.
    s = np.array([10.0, 6.0, 3.0, 1.0])
    low = threshold_spectrum(s, 4, 16, ThresholdParams())
    assert low.s_med == 3.0  # lower median: element (4-1)//2 = 1 of [1, 3, 6, 10]
    assert low.tau == pytest.approx(1.836866 * 3.0, abs=1e-5)  # 5.5106 -> keeps 10 and 6
    assert low.rank_kept == 2
    mean = threshold_spectrum(s, 4, 16, ThresholdParams(median="mean"))
    assert mean.s_med == 4.5 and mean.rank_kept == 1  # tau = 8.266 keeps only 10
    # A singular value exactly equal to tau is not kept (strict >).
    tau = omega(0.25) * 3.0
    tie = threshold_spectrum(np.array([10.0, tau, 3.0, 1.0]), 16, 4, ThresholdParams())
    assert tie.tau == tau and tie.rank_kept == 1


def test_reported_statistics_follow_spec_definitions():
    s = np.array([50.0, 20.0, 4.0, 3.0, 2.5, 2.0, 1.0, 0.5])
    st = threshold_spectrum(s, 8, 32, ThresholdParams())
    mu = reference.mp_median(0.25)
    # lower median of 8 values: element (8-1)//2 = 3 of [0.5, 1, 2, 2.5, 3, 4, 20, 50] = 2.5
    assert st.s_med == 2.5
    sigma = 2.5 / math.sqrt(32 * mu)
    assert st.sigma_hat == pytest.approx(sigma, rel=1e-9)
    assert st.mp_edge == pytest.approx(1.5 * math.sqrt(32) * sigma, rel=1e-9)
    edge = st.mp_edge
    assert st.noise_energy_fraction == pytest.approx(np.sum(s[s <= edge] ** 2) / np.sum(s**2), rel=1e-12)
    assert st.rho == pytest.approx(math.sqrt(np.sum(s[: st.rank_kept] ** 2) / np.sum(s**2)), rel=1e-12)
    assert st.frob_delta == pytest.approx(math.sqrt(np.sum(s**2)), rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_delta_passes_through_without_svd(backend):
    got, stats = repair_batch(torch.zeros(1, 64, 48), ThresholdParams(), backend)
    assert stats[0].degenerate == "zero_delta" and stats[0].rank_kept == 0
    assert torch.count_nonzero(got) == 0 and not torch.isnan(got).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_below_half_keeps_everything(backend):
    # rank 3 in a 64 x 96 delta: s_med is (numerically) 0, so tau = 0 and Δ* = Δ exactly.
    gen = torch.Generator().manual_seed(1)
    delta = (torch.randn(64, 3, generator=gen) @ torch.randn(3, 96, generator=gen)).float()
    got, stats = repair_batch(delta[None], ThresholdParams(), backend)
    assert stats[0].degenerate == "median_zero"
    assert stats[0].tau == 0.0 and stats[0].rank_kept == 3 and stats[0].rho == 1.0
    assert torch.equal(got[0], delta)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_one_by_one(backend):
    rng = np.random.default_rng(9)
    mats = np.stack([reference.spiked(120, 80, rank=k, rng=rng, sigma=10.0**-k) for k in (1, 2, 3)]).astype(
        np.float32)
    batch, stats = repair_batch(torch.from_numpy(mats), ThresholdParams(), backend)
    for i in range(3):
        single, st = repair_batch(torch.from_numpy(mats[i:i + 1]), ThresholdParams(), backend)
        assert torch.equal(batch[i], single[0]) and st[0] == stats[i]
        assert stats[i].rank_kept == reference.dg_hard(mats[i])[1]  # each expert gets its own tau


def test_gram_streaming_in_small_blocks_gives_the_same_answer():
    rng = np.random.default_rng(3)
    for shape in [(500, 60), (60, 500)]:
        delta = torch.from_numpy(reference.spiked(*shape, rank=4, rng=rng).astype(np.float32))[None]
        whole, s1 = repair_batch(delta, ThresholdParams(), "gram64", chunk_elems=1 << 24)
        blocks, s2 = repair_batch(delta, ThresholdParams(), "gram64", chunk_elems=7 * 60)
        assert s1[0].rank_kept == s2[0].rank_kept
        assert rel(blocks[0].numpy(), whole[0].numpy().astype(np.float64)) <= 1e-6


def test_rejects_low_precision_and_unbatched_input():
    with pytest.raises(ValueError, match="float32"):
        repair_batch(torch.zeros(1, 4, 4, dtype=torch.bfloat16), ThresholdParams())
    with pytest.raises(ValueError, match=r"\(B, m, n\)"):
        repair_batch(torch.zeros(4, 4), ThresholdParams())


@pytest.mark.parametrize("lapack", [None, False])
def test_exported_factors_rebuild_delta_star_including_a_median_zero_matrix(lapack):
    """L R = Δ* for a regular matrix and = Δ for a median_zero one (rank below p/2), on the BLAS and torch
    projection paths; the left factor is the projection's own W V_r, not a second product."""
    from dgrepair.kernels.spectral import _balanced, _gram
    from dgrepair.kernels.threshold import ThresholdParams

    rng = np.random.default_rng(5)
    regular = reference.spiked(90, 60, 3, rng, sigma=1e-3).astype(np.float32)
    low = (rng.standard_normal((90, 2)) @ rng.standard_normal((2, 60))).astype(np.float32)  # rank 2 < p/2
    for d, want in ((regular, reference.dg_hard(regular)[0]), (low, low.astype(np.float64))):
        for m in (d, d.T.copy()):
            t = torch.from_numpy(m)
            pair: list = []
            st = _gram(t, ThresholdParams(), torch.empty_like(t), 1 << 12, torch.device("cpu"), torch.float64,
                       lapack, pair)
            left, right = _balanced(*pair[0])
            target = want if m is d else want.T
            err = np.linalg.norm((left @ right).double().numpy() - target) / np.linalg.norm(target)
            assert err < 1e-5, (st.degenerate, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_and_finite_checks_agree_with_elementwise_masks(dtype):
    """The one-pass min/max checks give exactly what the element-wise masks give, NaN and ±Inf and
    signed zeros and subnormals included, wherever the odd value sits."""
    from dgrepair.engine.errors import RepairFailure
    from dgrepair.engine.run.jobs import check_finite
    from dgrepair.kernels.spectral import is_zero

    tiny = torch.finfo(dtype).tiny / 4  # a subnormal: not zero
    for odd in (0.0, -0.0, tiny, -tiny, 1.0, float("nan"), float("inf"), float("-inf")):
        for pos in (0, 37, 299):
            t = torch.zeros(300, dtype=dtype)
            t[pos] = odd
            assert is_zero(t) == (not bool(torch.any(t != 0))), (odd, pos)
            if bool(torch.isfinite(t).all()):
                check_finite(t, "w", "f.safetensors")
            else:
                with pytest.raises(RepairFailure, match=r"f\.safetensors: tensor 'w' holds 1 NaN/Inf"):
                    check_finite(t, "w", "f.safetensors")
    check_finite(torch.empty(0, dtype=dtype), "w", "f.safetensors")


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (64, 64), (1000, 37), (37, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1 << 24, 5000])
@pytest.mark.parametrize("threads", [1, 3])
def test_lapack_gram_and_projection_match_float64_in_every_layout(shape, dtype, chunk, threads):
    """The CPU Gram and projection read tall row blocks and a wide matrix's transposed view without
    copying, and gemm writes the projection straight into the output (beta = 0 over NaN garbage): all
    four layouts, one block or many, agree with a float64 numpy reference."""
    from dgrepair.kernels import linalg

    rng = np.random.default_rng(sum(shape))
    d = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    tall = shape[0] >= shape[1]
    work = d if tall else d.T
    w64 = work.numpy().astype(np.float64)
    g = linalg.gram(work, dtype, torch.device("cpu"), chunk, threads=threads).numpy()
    ref = w64.T @ w64
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert np.abs(np.tril(g) - np.tril(ref)).max() <= tol * np.abs(ref).max()
    v = torch.from_numpy(np.linalg.qr(rng.standard_normal((work.shape[1], 5)))[0]).to(dtype)
    out = torch.full(shape, float("nan"))
    dst = out if tall else out.T
    linalg.project(work, v, dst, chunk, threads=threads)
    pref = w64 @ v.numpy().astype(np.float64) @ v.numpy().astype(np.float64).T
    assert np.abs(dst.numpy() - pref).max() <= 1e-5 * np.abs(pref).max()


@pytest.mark.parametrize("shape", [(1500, 700), (700, 1500)])
@pytest.mark.parametrize("backend", ["gram32", "gram64"])
def test_output_bytes_do_not_depend_on_the_thread_count(shape, backend):
    """A threaded BLAS call splits its sums by its thread count (on OpenBLAS's AVX2 kernels a 2-thread
    ssyrk differs from a 1-thread one in the last bits), so Ray workers on 1 thread and an in-process run
    on every core would write other bytes. The kernels split the work into pieces whose shapes depend
    only on the matrix: Δ*, the kept ranks and the adapter factors are bit-identical on 1, 2 and 3 threads."""
    from dgrepair.kernels.threads import cpu_thread_policy

    rng = np.random.default_rng(11)
    delta = torch.from_numpy(reference.spiked(*shape, rank=9, rng=rng).astype(np.float32))[None]
    runs = []
    for threads in (1, 2, 3):
        factors: list = []
        with cpu_thread_policy(threads):  # what a Ray worker holds for its life; repair_batch nests it
            got, stats = repair_batch(delta, ThresholdParams(), backend, chunk_elems=200_000, threads=threads,
                                      factors=factors)
        runs.append((got.numpy().tobytes(), [s.rank_kept for s in stats],
                     [t.numpy().tobytes() for t in factors[0]]))
    assert runs[0][1] == [9]
    assert runs[1] == runs[0] and runs[2] == runs[0]
