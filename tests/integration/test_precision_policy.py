"""The precision policy (docs/adr/0011-precision-policy.md), the torch path that CUDA runs, and the
out-of-memory retry, all on the CPU."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import reference
import torch
from pairs import SHARDS, make_pair
from safetensors import safe_open

from dgrepair.cli import main
from dgrepair.kernels import linalg, spectral
from dgrepair.kernels.spectral import device_fp64_fast, precision_policy, repair_batch
from dgrepair.kernels.threshold import ThresholdParams


@pytest.mark.parametrize(("kernel", "out", "rate", "want"), [
    ("auto", "BF16", "auto", "gram32"), ("auto", "F16", "auto", "gram32"), ("auto", "FP8", "auto", "gram32"),
    ("auto", "MXFP4", "auto", "gram32"), ("auto", "F32", "auto", "gram64"), ("auto", None, "auto", "gram64"),
    ("auto", "BF16", "fast", "gram64"), ("auto", "F32", "slow", "gram64"), ("gram64", "BF16", "auto", "gram64"),
    ("gram32", "F32", "auto", "gram32"), ("exact", "BF16", "fast", "exact"),
])
def test_policy_table(kernel, out, rate, want):
    chosen, why = precision_policy(kernel, out, "cpu", rate)
    assert chosen == want
    assert ("forced" in why) == (kernel != "auto")


@pytest.mark.parametrize(("capability", "fast"), [((9, 0), True), ((8, 0), True), ((10, 0), True),
                                                   ((8, 9), False), ((8, 6), False), ((7, 5), False)])
def test_fp64_speed_from_the_gpu_model(monkeypatch, capability, fast):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: capability)
    assert device_fp64_fast("cuda") is fast
    assert device_fp64_fast("cuda", "slow") is False and device_fp64_fast("cpu", "fast") is True
    assert device_fp64_fast("cpu") is False


def test_stats_record_the_decision():
    rng = np.random.default_rng(1)
    delta = torch.from_numpy(reference.spiked(300, 120, rank=5, rng=rng).astype(np.float32))[None]
    _, (st,) = repair_batch(delta, ThresholdParams(), out_dtype="BF16")
    assert (st.backend, st.precision) == ("gram32", "gram32: BF16 output")
    _, (st,) = repair_batch(delta, ThresholdParams(), out_dtype="F32")
    assert (st.backend, st.precision) == ("gram64", "gram64: F32 output")
    _, (st,) = repair_batch(delta[:, :30], ThresholdParams(), out_dtype="BF16")
    assert st.backend == "exact" and st.precision.startswith("exact: min(m, n)")


def _tensors(out) -> dict[str, torch.Tensor]:
    got = {}
    for shard in SHARDS:
        with safe_open(out / shard, framework="pt") as fh:
            got.update({k: fh.get_tensor(k) for k in fh.keys()})
    return got


def test_bf16_pair_policy_keeps_float64_ranks_within_one_ulp(tmp_path):
    pair = make_pair(tmp_path, dtype=torch.bfloat16, seed=3)
    for kernel in ("auto", "gram64"):
        assert main(["repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", str(tmp_path / kernel),
                     "--no-progress", "--in-process", "--kernel", kernel]) == 0
    rows = {k: pd.read_parquet(tmp_path / k / "dgrepair" / "manifest.parquet") for k in ("auto", "gram64")}
    key = ["tensor", "expert", "part"]
    both = rows["auto"].merge(rows["gram64"], on=key, suffixes=("", "_64"))
    rep = both[both.rank_kept.notna()]
    assert len(rep) >= 10
    assert (rep.rank_kept == rep.rank_kept_64).all()
    assert set(rep[rep.kernel == "gram32"].precision) == {"gram32: BF16 output"}
    assert (rep.kernel == "gram32").sum() >= 4  # the policy ran float32 on the BF16 matrices above the cut
    assert set(rep.precision_64) == {"gram64: forced by --kernel"}
    a, b = _tensors(tmp_path / "auto"), _tensors(tmp_path / "gram64")
    differ = total = 0
    for name, t in a.items():
        if t.dtype != torch.bfloat16:
            continue
        x, y = t.float(), b[name].float()
        ulp = torch.finfo(torch.bfloat16).eps * torch.maximum(x.abs(), y.abs()).clamp_min(1e-30)
        assert bool(((x - y).abs() <= ulp).all()), name  # at most one BF16 ulp anywhere
        differ += int((x != y).sum())
        total += x.numel()
    assert differ / total < 0.02, differ / total  # and only a small fraction of elements differ at all


def test_torch_path_decomposes_once_per_matrix(monkeypatch):
    calls = {"eigh": 0, "eigvalsh": 0}
    eigh, eigvalsh = torch.linalg.eigh, torch.linalg.eigvalsh

    def count(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper
    monkeypatch.setattr(torch.linalg, "eigh", count("eigh", eigh))
    monkeypatch.setattr(torch.linalg, "eigvalsh", count("eigvalsh", eigvalsh))
    rng = np.random.default_rng(2)
    delta = reference.spiked(200, 90, rank=6, rng=rng).astype(np.float32)
    want, r_want, _ = reference.dg_hard(delta)
    dst = torch.empty(200, 90)
    st = spectral._gram(torch.from_numpy(delta), ThresholdParams(), dst, 1 << 12, torch.device("cpu"),
                        torch.float64, lapack=False)
    assert calls == {"eigh": 1, "eigvalsh": 0}
    assert st.rank_kept == r_want
    assert np.linalg.norm(dst.numpy() - want) / np.linalg.norm(want) <= 1e-6


def test_device_feed_hands_out_every_matrix_in_order():
    delta = torch.randn(5, 12, 7)
    feed = spectral._DeviceFeed(delta, torch.device("cpu"), resident=True)
    assert all(torch.equal(feed.get(i), delta[i]) for i in range(5))
    feed = spectral._DeviceFeed(delta, torch.device("meta"), resident=True)  # a device other than Δ's
    assert [tuple(feed.get(i).shape) for i in range(5)] == [(12, 7)] * 5 and not feed.pending


def test_out_of_memory_retries_with_smaller_blocks_and_never_fails(monkeypatch):
    rng = np.random.default_rng(4)
    delta = torch.from_numpy(np.stack([reference.spiked(240, 100, rank=5, rng=rng) for _ in range(3)])
                             .astype(np.float32))
    want, want_stats = repair_batch(delta, ThresholdParams(), "gram64", chunk_elems=1 << 22)
    real = linalg.gram
    seen = []

    def flaky(work, dtype, device, chunk_elems, lapack=None, threads=1):
        seen.append(chunk_elems)
        if len(seen) in (2, 3):  # the second matrix hits it twice
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(work, dtype, device, chunk_elems, lapack, threads)
    monkeypatch.setattr(linalg, "gram", flaky)
    got, stats = repair_batch(delta, ThresholdParams(), "gram64", chunk_elems=1 << 22)
    assert seen == [1 << 22, 1 << 22, 1 << 20, 1 << 18, 1 << 22]  # each matrix fits one block: same sums
    assert torch.equal(got, want)
    assert [s.rank_kept for s in stats] == [s.rank_kept for s in want_stats]
    assert "out of memory" in stats[1].precision and "out of memory" not in stats[0].precision


def test_out_of_memory_on_the_cpu_at_the_smallest_block_is_raised(monkeypatch):
    def always(*a, **k):
        raise torch.OutOfMemoryError("injected")
    monkeypatch.setattr(linalg, "gram", always)
    with pytest.raises(torch.OutOfMemoryError):
        repair_batch(torch.randn(1, 80, 60), ThresholdParams(), "gram64")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_resident_feed_matches_the_cpu_ranks_and_reference():
    rng = np.random.default_rng(6)
    mats = np.stack([reference.spiked(700, 300, rank=6, rng=rng) for _ in range(4)]).astype(np.float32)
    got, stats = repair_batch(torch.from_numpy(mats), ThresholdParams(), "auto", device="cuda", out_dtype="BF16")
    for i, st in enumerate(stats):
        want, r_want, _ = reference.dg_hard(mats[i])
        assert st.rank_kept == r_want and "out of memory" not in st.precision
        tol = 1e-6 if st.backend == "gram64" else 1e-3
        assert np.linalg.norm(got[i].numpy() - want) / np.linalg.norm(want) <= tol
    assert got.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_out_of_memory_finishes_the_matrix(monkeypatch):
    real = linalg.gram
    calls = []

    def flaky(work, dtype, device, chunk_elems, lapack=None, threads=1):
        calls.append(torch.device(device).type)
        if torch.device(device).type == "cuda":
            raise torch.OutOfMemoryError("injected")
        return real(work, dtype, device, chunk_elems, lapack, threads)
    monkeypatch.setattr(linalg, "gram", flaky)
    rng = np.random.default_rng(7)
    delta = reference.spiked(300, 200, rank=4, rng=rng).astype(np.float32)
    want, r_want, _ = reference.dg_hard(delta)
    got, (st,) = repair_batch(torch.from_numpy(delta)[None], ThresholdParams(), "gram64", device="cuda")
    assert calls[-1] == "cpu" and st.rank_kept == r_want and "finished on the CPU" in st.precision
