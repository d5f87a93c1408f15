"""Bad input: a clear error naming the file (and tensor), non-zero exit, inputs unchanged, no output
that looks complete (no summary.json, no index)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from ckpt import tree_digest, write_sharded, write_single

from dgrepair.cli import main


def run_and_check(capsys, base: Path, ft: Path, out: Path, *needles: str, code: int | None = None,
                  extra: tuple[str, ...] = ()) -> str:
    snapshot = {p: tree_digest(p) for p in (base, ft) if p.is_dir()}
    rc = main(["repair", "--base", str(base), "--ft", str(ft), "--out", str(out), "--no-progress",
               "--in-process", *extra])
    err = capsys.readouterr().err
    assert rc != 0 and (code is None or rc == code), err
    assert err.startswith("dgrepair: error:") and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert {p: tree_digest(p) for p in snapshot} == snapshot  # inputs unchanged
    if out not in (base, ft):
        assert not (out / "dgrepair" / "summary.json").exists()
        assert not (out / "model.safetensors.index.json").exists()
    return err


def rewrite_header(path: Path, mutate) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    mutate(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def test_missing_directory(small_pair, tmp_path, capsys):
    base, _ = small_pair
    run_and_check(capsys, base, tmp_path / "nope", tmp_path / "out", str(tmp_path / "nope"), "no such directory")


def test_no_safetensors_files(small_pair, tmp_path, capsys):
    base, _ = small_pair
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    run_and_check(capsys, base, empty, tmp_path / "out", str(empty), "no safetensors files")


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_checkpoint_is_refused_and_never_unpickled(small_pair, tmp_path, capsys):
    base, _ = small_pair
    evil = tmp_path / "evil"
    evil.mkdir()
    boom = _Boom()
    boom.marker = tmp_path / "UNPICKLED"
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(boom))
    run_and_check(capsys, base, evil, tmp_path / "out", str(evil), "pytorch_model.bin", "never unpickles")
    assert not boom.marker.exists()


def test_truncated_shard(small_pair, tmp_path, capsys):
    base, ft = small_pair
    shard = ft / "s2.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    run_and_check(capsys, base, ft, tmp_path / "out", str(shard), "layer.b.weight", "truncated")


def test_corrupt_header(small_pair, tmp_path, capsys):
    base, ft = small_pair
    shard = ft / "s1.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[8:20] = b"\xff" * 12
    shard.write_bytes(bytes(raw))
    run_and_check(capsys, base, ft, tmp_path / "out", str(shard), "not valid UTF-8 JSON")


def test_oversized_header(small_pair, tmp_path, capsys):
    base, ft = small_pair
    shard = ft / "s1.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes((2**40).to_bytes(8, "little") + raw[8:])
    run_and_check(capsys, base, ft, tmp_path / "out", str(shard), "exceeds")


def test_overlapping_offsets(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    t = {"a.weight": torch.randn(64, 32, generator=g), "b.weight": torch.randn(64, 32, generator=g)}
    write_single(tmp_path / "base", t)
    write_single(tmp_path / "ft", {k: v + 1 for k, v in t.items()})
    shard = tmp_path / "ft" / "model.safetensors"

    def overlap(h):
        h["b.weight"]["data_offsets"] = [100, 100 + 64 * 32 * 4]
        h["a.weight"]["data_offsets"] = [0, 64 * 32 * 4]

    rewrite_header(shard, overlap)
    run_and_check(capsys, tmp_path / "base", tmp_path / "ft", tmp_path / "out", str(shard), "b.weight", "overlap")


def test_offsets_past_the_end_of_file(tmp_path, capsys):
    t = {"a.weight": torch.ones(64, 32)}
    write_single(tmp_path / "base", t)
    write_single(tmp_path / "ft", {"a.weight": torch.ones(64, 32) * 2})
    shard = tmp_path / "ft" / "model.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])  # header intact, data cut
    run_and_check(capsys, tmp_path / "base", tmp_path / "ft", tmp_path / "out", str(shard), "a.weight",
                  "truncated")


def test_hole_between_tensors(tmp_path, capsys):
    write_single(tmp_path / "base", {"a.weight": torch.ones(64, 32)})
    write_single(tmp_path / "ft", {"a.weight": torch.ones(64, 32)})
    shard = tmp_path / "ft" / "model.safetensors"
    rewrite_header(shard, lambda h: h["a.weight"].update(data_offsets=[16, 16 + 64 * 32 * 4]))
    run_and_check(capsys, tmp_path / "base", tmp_path / "ft", tmp_path / "out", str(shard), "a.weight", "hole")


@pytest.mark.parametrize("shard_name,needle", [("s9.safetensors", "does not exist"),
                                               ("../s1.safetensors", "outside the checkpoint"),
                                               ("/etc/passwd", "outside the checkpoint")])
def test_index_names_a_bad_shard(small_pair, tmp_path, capsys, shard_name, needle):
    base, ft = small_pair
    index = ft / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["layer.b.weight"] = shard_name
    index.write_text(json.dumps(data))
    shutil.copy(ft / "s1.safetensors", tmp_path / "s1.safetensors")  # a real file right outside
    run_and_check(capsys, base, ft, tmp_path / "out", str(index), shard_name, "layer.b.weight", needle)


def test_shape_mismatch_on_a_shared_key(small_pair, tmp_path, capsys):
    base, ft = small_pair
    write_sharded(ft, {"s1.safetensors": {"layer.a.weight": torch.zeros(64, 31)},
                       "s2.safetensors": {"layer.b.weight": torch.zeros(48, 32)}})
    run_and_check(capsys, base, ft, tmp_path / "out", "layer.a.weight", "[64, 32]", "[64, 31]", str(ft))


@pytest.mark.parametrize("where", ["ft", "base"])
def test_nan_or_inf_in_a_tensor_to_repair(small_pair, tmp_path, capsys, where):
    base, ft = small_pair
    root = ft if where == "ft" else base
    g = torch.Generator().manual_seed(0)
    bad = torch.randn(48, 32, generator=g)
    bad[3, 4] = float("nan") if where == "ft" else float("inf")
    write_sharded(root, {"s1.safetensors": {"layer.a.weight": torch.randn(64, 32, generator=g)},
                         "s2.safetensors": {"layer.b.weight": bad}})
    out = tmp_path / "out"
    run_and_check(capsys, base, ft, out, "layer.b.weight", str(root / "s2.safetensors"), "NaN/Inf", code=3)
    assert not (out / "s2.safetensors").exists()  # the shard holding the bad tensor never looks complete


def test_out_equal_to_inside_or_containing_an_input(small_pair, tmp_path, capsys):
    base, ft = small_pair
    run_and_check(capsys, base, ft, ft, "inside the input checkpoint")
    run_and_check(capsys, base, ft, base / "sub", "inside the input checkpoint")
    run_and_check(capsys, base, ft, tmp_path, "contains the input checkpoint")


def test_out_with_a_different_run_needs_force(small_pair, tmp_path, capsys):
    base, ft = small_pair
    out = tmp_path / "out"
    assert main(["repair", "--base", str(base), "--ft", str(ft), "--out", str(out), "--no-progress",
                 "--in-process"]) == 0
    capsys.readouterr()
    snapshot = tree_digest(out)
    err = run_and_check_existing(capsys, base, ft, out, "--scale", "2")
    assert "different dgrepair run" in err and "--force" in err
    assert tree_digest(out) == snapshot  # refused runs touch nothing
    assert main(["repair", "--base", str(base), "--ft", str(ft), "--out", str(out), "--no-progress", "--in-process",
                 "--scale", "2", "--force"]) == 0
    summary = json.loads((out / "dgrepair" / "summary.json").read_text())
    assert summary["config"]["scale"] == 2.0


def run_and_check_existing(capsys, base, ft, out, *extra):
    rc = main(["repair", "--base", str(base), "--ft", str(ft), "--out", str(out), "--no-progress",
               "--in-process", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and str(out) in err
    return err


def test_out_that_is_a_foreign_non_empty_directory_is_refused_even_with_force(small_pair, tmp_path, capsys):
    base, ft = small_pair
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for extra in ((), ("--force",)):
        err = run_and_check(capsys, base, ft, out, str(out), "holds no dgrepair run", extra=extra)
        assert "never deletes" in err
    assert (out / "thesis.tex").read_text() == "precious"


def test_keys_only_in_base_are_reported_not_fatal(small_pair, tmp_path, capsys):
    # §7 row "Key-set drift" (the MTP-layer version is in test_frontier_fixtures.py)
    base, ft = small_pair
    write_sharded(ft, {"s1.safetensors": {"layer.a.weight": torch.zeros(64, 32)}})
    assert main(["plan", "--base", str(base), "--ft", str(ft)]) == 0
    assert "base-only keys (1): layer.b.weight" in capsys.readouterr().out
