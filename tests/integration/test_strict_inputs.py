"""Strict header parsing, the corrected messages, and sidecar symlinks (refused before --out is touched)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from ckpt import tree_digest, write_sharded, write_single
from safetensors.torch import load_file
from test_bad_inputs import run_and_check

from dgrepair.cli import main


def raw_header(path: Path, text: str) -> None:
    """Replace a shard's header by `text` verbatim (so duplicate keys survive), data kept."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    body = text.encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])


def header_of(path: Path) -> str:
    raw = path.read_bytes()
    return raw[8:8 + int.from_bytes(raw[:8], "little")].decode().rstrip()


def test_duplicate_tensor_key_with_conflicting_offsets_is_refused(small_pair, tmp_path, capsys):
    base, ft = small_pair
    shard = ft / "s1.safetensors"
    entry = json.loads(header_of(shard))["layer.a.weight"]
    dup = json.dumps({**entry, "data_offsets": [0, 4]} | {"shape": [1]})  # a second, conflicting entry
    raw_header(shard, header_of(shard)[:-1] + f', "layer.a.weight": {dup}}}')
    out = tmp_path / "out"
    err = run_and_check(capsys, base, ft, out, str(shard), "has a duplicate tensor 'layer.a.weight'",
                        "readers disagree", code=2)
    assert "Traceback" not in err and not out.exists()


def test_duplicate_key_inside_an_entry_and_in_the_index_are_refused(small_pair, tmp_path, capsys):
    base, ft = small_pair
    shard = ft / "s2.safetensors"
    text = header_of(shard).replace('"dtype":"F32"', '"dtype":"F32","dtype":"F16"')
    assert text != header_of(shard)
    raw_header(shard, text)
    run_and_check(capsys, base, ft, tmp_path / "out", str(shard), "duplicate key 'dtype'", code=2)
    write_sharded(ft, {"s1.safetensors": {"layer.a.weight": torch.zeros(64, 32)},
                       "s2.safetensors": {"layer.b.weight": torch.zeros(48, 32)}})
    index = ft / "model.safetensors.index.json"
    index.write_text('{"metadata": {}, "weight_map": {"layer.a.weight": "s1.safetensors", '
                     '"layer.b.weight": "s2.safetensors", "layer.a.weight": "s2.safetensors"}}')
    run_and_check(capsys, base, ft, tmp_path / "out", str(index), "duplicate key 'layer.a.weight'", code=2)


@pytest.mark.parametrize("field,value,needle", [
    ("shape", [True, 32], "shape must be a list of non-negative integers, got [true, 32]"),
    ("shape", [64.0, 32], "shape must be a list of non-negative integers, got [64.0, 32]"),
    ("data_offsets", [False, 8192], "data_offsets must be [begin, end] integers with 0 <= begin <= end, got "
                                    "[false, 8192]"),
])
def test_boolean_or_float_shapes_and_offsets_are_refused(small_pair, tmp_path, capsys, field, value, needle):
    base, ft = small_pair
    shard = ft / "s1.safetensors"
    header = json.loads(header_of(shard))
    header["layer.a.weight"][field] = value
    raw_header(shard, json.dumps(header))
    run_and_check(capsys, base, ft, tmp_path / "out", str(shard), "tensor 'layer.a.weight'", needle, code=2)


def test_nan_constant_in_a_header_is_refused(small_pair, tmp_path, capsys):
    base, ft = small_pair
    shard = ft / "s1.safetensors"
    raw_header(shard, header_of(shard)[:-1] + ', "__metadata__": {"format": "pt", "x": NaN}}')
    run_and_check(capsys, base, ft, tmp_path / "out", str(shard), "non-standard JSON constant NaN", code=2)


def test_shape_mismatch_advice_to_exclude_works(small_pair, tmp_path, capsys):
    base, ft = small_pair
    odd = torch.randn(64, 31)
    write_sharded(ft, {"s1.safetensors": {"layer.a.weight": odd},
                       "s2.safetensors": {"layer.b.weight": torch.zeros(48, 32)}})
    err = run_and_check(capsys, base, ft, tmp_path / "bad", "layer.a.weight", code=2)
    advice = "--exclude '^layer\\.a\\.weight$'"
    assert advice in err
    out = tmp_path / "out"
    assert main(["repair", "--base", str(base), "--ft", str(ft), "--out", str(out), "--no-progress", "--in-process",
                 "--exclude", "^layer\\.a\\.weight$"]) == 0
    assert torch.equal(load_file(str(out / "s1.safetensors"))["layer.a.weight"], odd)  # the fine-tuned value


def test_f64_is_not_called_quantized_and_exclude_keeps_it(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, generator=g, dtype=torch.float64)
    write_single(tmp_path / "base", {"w.weight": w})
    write_single(tmp_path / "ft", {"w.weight": w + 0.01})
    err = run_and_check(capsys, tmp_path / "base", tmp_path / "ft", tmp_path / "bad", "w.weight", code=2)
    assert "quantized" not in err
    assert "dtype F64 (base) -> F64 (fine-tune): only F32, F16 and BF16 weights are repaired" in err
    out = tmp_path / "out"
    assert main(["repair", "--base", str(tmp_path / "base"), "--ft", str(tmp_path / "ft"), "--out", str(out),
                 "--no-progress", "--in-process", "--exclude", "^w\\.weight$"]) == 0
    assert torch.equal(load_file(str(out / "model.safetensors"))["w.weight"], w + 0.01)


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_an_unusable_device_is_refused_before_anything_is_created(small_pair, tmp_path, capsys):
    base, ft = small_pair
    out = tmp_path / "out"
    err = run_and_check(capsys, base, ft, out, "--device cuda:7: torch sees", code=2, extra=("--device", "cuda:7"))
    assert "cuda" in err and not out.exists()


# --- sidecar symlinks ---------------------------------------------------------------------------------------


def test_a_sidecar_linking_outside_the_checkpoint_is_refused(small_pair, tmp_path, capsys):
    base, ft = small_pair
    secret = tmp_path / "secret.txt"
    secret.write_text("host credentials")
    (ft / "generation_config.json").symlink_to(secret)
    out = tmp_path / "out"
    run_and_check(capsys, base, ft, out, "sidecar generation_config.json is a symlink to", str(secret),
                  "outside the checkpoint folder", code=2)
    assert not out.exists()


def test_a_sidecar_that_is_a_fifo_is_refused(small_pair, tmp_path, capsys):
    base, ft = small_pair
    os.mkfifo(ft / "tokenizer.model")
    run_and_check(capsys, base, ft, tmp_path / "out", "sidecar tokenizer.model is not a regular file", code=2)


def test_sidecar_links_inside_the_folder_or_the_hub_blob_store_are_copied(tmp_path):
    g = torch.Generator().manual_seed(2)
    w = {"a.weight": torch.randn(64, 32, generator=g)}
    write_single(tmp_path / "base", w)
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    write_single(snap, {k: v + 0.01 for k, v in w.items()})
    (repo / "blobs").mkdir()
    (repo / "blobs" / "f00d").write_text('{"model_type": "llama"}')
    (snap / "config.json").symlink_to(Path("../../blobs/f00d"))
    (snap / "real_tokenizer.json").write_text('{"v": 1}')
    (snap / "tokenizer.json").symlink_to("real_tokenizer.json")
    out = tmp_path / "out"
    before = tree_digest(snap)
    assert main(["repair", "--base", str(tmp_path / "base"), "--ft", str(snap), "--out", str(out), "--no-progress",
                 "--in-process"]) == 0
    assert (out / "config.json").read_text() == '{"model_type": "llama"}' and not (out / "config.json").is_symlink()
    assert (out / "tokenizer.json").read_text() == '{"v": 1}'
    assert tree_digest(snap) == before
