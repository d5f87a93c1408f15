"""The method registry (--method): each method against an independent float64 reference written here
from its definition, determinism of DARE's per-matrix streams, and every method end to end through
`dgrepair repair` (including a resume) on a real safetensors pair."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import reference
import torch
from pairs import make_pair
from safetensors import safe_open

from dgrepair.cli import main
from dgrepair.kernels.methods import METHODS, apply_method, build_method


def _delta(m=96, n=64, seed=0):
    rng = np.random.default_rng(seed)
    return reference.spiked(m, n, 4, rng, sigma=1e-3).astype(np.float32)


def _noise_scale(s, m, n):
    p, big = min(m, n), max(m, n)
    beta = p / big
    s_med = np.sort(s)[(p - 1) // 2]
    return beta, big, s_med / math.sqrt(big * reference.mp_median(beta))


@pytest.mark.parametrize("shape", [(96, 64), (40, 120)])
def test_spectral_methods_match_float64_definitions(shape):
    d = _delta(*shape)
    m, n = shape
    u, s, vt = np.linalg.svd(d.astype(np.float64), full_matrices=False)
    beta, big, sigma = _noise_scale(s, m, n)
    edge = (1 + math.sqrt(beta)) * math.sqrt(big) * sigma
    y = s / (math.sqrt(big) * sigma)
    eta = np.where(y > 1 + math.sqrt(beta), np.sqrt(np.maximum((y**2 - beta - 1) ** 2 - 4 * beta, 0)) / y, 0.0)
    want = {
        "fixed_rank": (u[:, :7] * s[:7]) @ vt[:7],
        "mp_edge": (u * np.where(s > edge, s, 0.0)) @ vt,
        "optimal_shrink": (u * (eta * math.sqrt(big) * sigma)) @ vt,
        "dg_hard": reference.dg_hard(d)[0],
    }
    for name, expected in want.items():
        for backend in ("exact", "gram64"):
            method = build_method(name, {"rank": 7})
            got, stats = apply_method(method, torch.from_numpy(d)[None], ["k"], backend)
            err = np.linalg.norm(got[0].double().numpy() - expected) / np.linalg.norm(expected)
            assert err < 1e-5, (name, backend, err)
            assert stats[0].rho == pytest.approx(np.linalg.norm(expected) / np.linalg.norm(d), rel=1e-6)
    assert 0 < int(np.sum(eta > 0)) < min(shape)  # the shrinker really shrinks, and keeps the spikes


def test_elementwise_methods_match_definitions():
    d = _delta()
    t = torch.from_numpy(d)[None]
    got, st = apply_method(build_method("wise_ft", {"alpha": 0.3}), t, ["k"])
    assert torch.equal(got[0], t[0] * 0.3) and st[0].rho == pytest.approx(0.3, rel=1e-6)

    got, st = apply_method(build_method("ties", {"keep_ratio": 0.1, "ties_lambda": 2.0}), t, ["k"])
    k = math.ceil(0.1 * d.size)
    cutoff = np.sort(np.abs(d).ravel())[::-1][k - 1]
    want = np.where(np.abs(d) >= cutoff, 2.0 * d, 0.0)
    np.testing.assert_array_equal(got[0].numpy(), want.astype(np.float32))
    assert int((got[0] != 0).sum()) == k
    # a BF16-like delta full of equal magnitudes still keeps exactly k entries, the first ones by flat index
    tied = torch.round(t * 2e3) / 2e3
    got, _ = apply_method(build_method("ties", {"keep_ratio": 0.1}), tied, ["k"])
    flat = tied[0].abs().reshape(-1).double().numpy()
    order = sorted(range(flat.size), key=lambda i: (-flat[i], i))[:k]
    want = np.zeros(flat.size)
    want[order] = tied[0].reshape(-1).numpy()[order]
    assert len(np.unique(flat)) < flat.size / 10  # really tied
    np.testing.assert_array_equal(got[0].reshape(-1).numpy(), want.astype(np.float32))

    dare = build_method("dare", {"drop_prob": 0.6, "seed": 3})
    a, _ = apply_method(dare, t, ["layer.0"])
    b, _ = apply_method(dare, t, ["layer.0"])
    c, _ = apply_method(dare, t, ["layer.1"])
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded per matrix key
    kept = a[0] != 0
    assert abs(float(kept.float().mean()) - 0.4) < 0.02
    assert torch.allclose(a[0][kept], t[0][kept] / 0.4, rtol=1e-6)  # survivors rescaled by 1/(1-p)
    lin, _ = apply_method(build_method("dare", {"drop_prob": 0.6, "seed": 3, "dare_rescale": False}), t, ["layer.0"])
    assert torch.equal(lin[0] != 0, kept) and torch.equal(lin[0][kept], t[0][kept])  # same mask, no rescale


def _read_all(root):
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def _repair(pair, out, *extra):
    args = ["repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", str(out), "--in-process",
            "--no-progress", *extra]
    assert main(args) == 0
    return json.loads((out / "dgrepair" / "summary.json").read_text())


@pytest.mark.parametrize("method,params", [("wise_ft", {"alpha": 0.25}), ("ties", {"keep_ratio": 0.3}),
                                           ("fixed_rank", {"rank": 2}), ("optimal_shrink", {}),
                                           ("mp_edge", {"scale": 1.5})])
def test_each_method_end_to_end_against_reference(tmp_path, method, params):
    pair = make_pair(tmp_path)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in params.items()]
    summary = _repair(pair, tmp_path / "out", "--method", method, *flags)
    assert summary["method"]["name"] == method
    got = _read_all(tmp_path / "out")
    ref_method = build_method(method, params)
    for name in ("model.layers.0.mlp.gate_proj.weight", "lm_head.weight", "model.lowrank.weight"):
        w0 = pair.base_tensors[name].double()
        d = (pair.ft_tensors[name].float() - pair.base_tensors[name].float())
        d_star, _ = apply_method(ref_method, d[None], [name], "exact")
        want = (w0 + d_star[0].double()).float()
        assert torch.allclose(got[name], want, rtol=0, atol=1e-6), (method, name)
    # outside the scope the fine-tune is kept bit for bit, whatever the method
    assert torch.equal(got["model.small.weight"], pair.ft_tensors["model.small.weight"])
    assert torch.equal(got["model.frozen.weight"], pair.ft_tensors["model.frozen.weight"])


def test_dare_is_reproducible_across_runs_batching_and_resume(tmp_path):
    pair = make_pair(tmp_path)
    one = _repair(pair, tmp_path / "a", "--method", "dare", "--drop-prob", "0.5", "--seed", "7")
    _repair(pair, tmp_path / "b", "--method", "dare", "--drop-prob", "0.5", "--seed", "7", "--batch-mb", "1")
    a, b = _read_all(tmp_path / "a"), _read_all(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # interrupt-and-resume: drop a finished shard and the summary, run again, same bytes
    victim = next(p for p in sorted((tmp_path / "a").glob("*.safetensors")))
    before = victim.read_bytes()
    victim.unlink()
    (tmp_path / "a" / "dgrepair" / "summary.json").unlink()
    (tmp_path / "a" / "model.safetensors.index.json").unlink()
    again = _repair(pair, tmp_path / "a", "--method", "dare", "--drop-prob", "0.5", "--seed", "7")
    assert victim.read_bytes() == before and again["resumed_entries"] > 0
    c = _read_all(tmp_path / "c") if (tmp_path / "c").exists() else None
    assert c is None
    other = _repair(pair, tmp_path / "c", "--method", "dare", "--drop-prob", "0.5", "--seed", "8")
    assert other["plan_id"] != one["plan_id"]
    assert not torch.equal(_read_all(tmp_path / "c")["lm_head.weight"], a["lm_head.weight"])


def test_registry_lists_every_method_with_defaults():
    assert set(METHODS) == {"dg_hard", "wise_ft", "ties", "dare", "fixed_rank", "mp_edge", "optimal_shrink"}
    assert build_method("wise_ft", {}).alpha == 0.5
    assert build_method("dare", {}).drop_prob == 0.25  # 1/sqrt(1 - p) = 1.155, the paper's App. I.3 canonical rho


def test_method_parameters_are_validated(tmp_path, capsys):
    pair = make_pair(tmp_path)
    for bad in (["--method", "dare", "--drop-prob", "1.0"], ["--method", "ties", "--keep-ratio", "1.5"],
                ["--method", "optimal_shrink", "--target-rho", "0.5"],
                ["--method", "dare", "--target-rho", "0.5"], ["--method", "wise_ft", "--emit-adapter", "x"]):
        code = main(["repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", str(tmp_path / "o"),
                     "--in-process", "--no-progress", *bad])
        assert code == 2, bad
        assert not (tmp_path / "o").exists()
    err = capsys.readouterr().err
    assert "no-dare-rescale" in err and "no knob" in err and "low-rank factors" in err
    shutil.rmtree(tmp_path / "base")
