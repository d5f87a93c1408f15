"""safetensors edge cases from docs/formats.md: 0-d and empty tensors, a 2,500-tensor header,
whitespace-padded headers; all preserved byte for byte. Rows "Mixed-precision passthrough" (0-d scalar,
empty [0, 8]) and "Header and metadata"."""

from __future__ import annotations

import json

import torch
from ckpt import write_single
from safetensors import safe_open

from dgrepair.cli import main


def run(tmp_path) -> int:
    return main(["repair", "--base", str(tmp_path / "base"), "--ft", str(tmp_path / "ft"), "--out",
                 str(tmp_path / "out"), "--no-progress", "--in-process"])


def test_scalar_and_empty_tensors_pass_through(tmp_path):
    base = {"w.weight": torch.randn(64, 32), "scale": torch.tensor(2.0), "empty": torch.zeros(0, 8),
            "bias_f32": torch.randn(256), "norm_bf16": torch.randn(64).to(torch.bfloat16)}
    ft = {k: (v + 1 if v.numel() else v) for k, v in base.items()}
    write_single(tmp_path / "base", base)
    write_single(tmp_path / "ft", ft)
    assert run(tmp_path) == 0
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as fh:
        for name in ("scale", "empty", "bias_f32", "norm_bf16"):
            got = fh.get_tensor(name)
            assert got.dtype == ft[name].dtype and got.shape == ft[name].shape and torch.equal(got, ft[name])


def test_header_over_256_kb_with_2500_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.some_long_module_name.norm.weight": torch.randn(8, generator=g) for i in range(2500)}
    base["model.proj.weight"] = torch.randn(64, 32, generator=g)
    ft = {k: v + 0.5 for k, v in base.items()}
    write_single(tmp_path / "base", base)
    write_single(tmp_path / "ft", ft)
    raw = (tmp_path / "ft" / "model.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") > 256 * 1024
    assert run(tmp_path) == 0
    out = (tmp_path / "out" / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert out[:8 + n] == raw[:8 + n]


def test_whitespace_padded_header_is_accepted_and_kept(tmp_path):
    t = {"w.weight": torch.randn(64, 32)}
    write_single(tmp_path / "base", t)
    write_single(tmp_path / "ft", {"w.weight": t["w.weight"] + 1})
    for role in ("base", "ft"):
        path = tmp_path / role / "model.safetensors"
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = b"   " + json.dumps(json.loads(raw[8:8 + n])).encode() + b"     "
        header += b" " * (-len(header) % 8)
        path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])
    assert run(tmp_path) == 0
    src = (tmp_path / "ft" / "model.safetensors").read_bytes()
    out = (tmp_path / "out" / "model.safetensors").read_bytes()
    n = int.from_bytes(src[:8], "little")
    assert out[:8 + n] == src[:8 + n] and out[8:11] == b"   "
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as fh:
        assert fh.get_tensor("w.weight").shape == (64, 32)
