"""Resume after interruption, `plan` (headers only, writes nothing), YAML config, demo and help."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from ckpt import tree_digest, write_single
from pairs import SHARDS

from dgrepair.cli import build_parser, main
from dgrepair.engine.config import flag_specs
from dgrepair.engine.demo.demo import run_demo
from dgrepair.engine.io import safetensors_format
from dgrepair.engine.run.session import RunSession


def repair(pair, out: Path, *extra: str) -> int:
    return main(["repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", str(out), "--no-progress",
                 "--in-process", *extra])


def interrupt_after(monkeypatch, n: int) -> None:
    """Raise KeyboardInterrupt when the (n+1)-th work unit starts."""
    real = RunSession.step
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        if calls["n"] == n:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(RunSession, "step", staticmethod(flaky))


def clean_and_interrupted(pair, tmp_path: Path, monkeypatch, units: int) -> tuple[Path, Path]:
    """A complete run in clean/, and a run in out/ interrupted as its (units+1)-th unit starts."""
    clean = tmp_path / "clean"
    assert repair(pair, clean) == 0
    out = tmp_path / "out"
    interrupt_after(monkeypatch, units)
    assert repair(pair, out) == 130
    monkeypatch.undo()
    return clean, out


def test_interrupted_run_resumes_without_redoing_committed_work(pair, tmp_path, monkeypatch):
    clean, out = clean_and_interrupted(pair, tmp_path, monkeypatch, 5)
    assert not (out / "dgrepair" / "summary.json").exists()
    assert not (out / "model.safetensors.index.json").exists()
    committed = set(pd.read_parquet(out / "dgrepair" / "manifest.parquet").tensor)
    assert 5 <= len(committed) < len(pair.ft_tensors)
    assert repair(pair, out) == 0
    rows = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    per_tensor = rows[rows.expert.isna() | (rows.expert == 0)].groupby("tensor").size()
    assert all(per_tensor[t] == 1 for t in committed)  # committed before the interrupt: never recomputed
    assert set(per_tensor.index) == set(pair.ft_tensors)
    for shard in SHARDS:
        assert (out / shard).read_bytes() == (clean / shard).read_bytes()
    summary = json.loads((out / "dgrepair" / "summary.json").read_text())
    assert summary["resumed_entries"] == len(committed)
    assert summary["totals"]["tensors"] == len(pair.ft_tensors)


def test_resume_rechecks_bytes_and_redoes_a_corrupted_tensor(pair, tmp_path, monkeypatch):
    clean, out = clean_and_interrupted(pair, tmp_path, monkeypatch, 6)
    rows = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    victim = rows[rows.kind == "svd"].iloc[0]
    where = out / victim.shard if (out / victim.shard).exists() else out / "dgrepair" / "partial" / victim.shard
    raw = bytearray(where.read_bytes())
    raw[victim.byte_begin:victim.byte_begin + 8] = b"\x00" * 8
    where.write_bytes(bytes(raw))
    assert repair(pair, out) == 0
    rows = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    assert (rows.tensor == victim.tensor).sum() == 2  # recomputed once
    for shard in SHARDS:
        assert (out / shard).read_bytes() == (clean / shard).read_bytes()


def test_rerunning_a_complete_run_changes_nothing(pair, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert repair(pair, out) == 0
    snapshot = tree_digest(out)
    monkeypatch.setattr(RunSession, "step", staticmethod(lambda *a, **k: pytest.fail("complete run recomputed")))
    assert repair(pair, out) == 0
    assert tree_digest(out) == snapshot


def test_plan_reads_headers_only_and_writes_nothing(pair, tmp_path, monkeypatch, capsys):
    def no_data(*args, **kwargs):
        raise AssertionError("plan read tensor data")

    monkeypatch.setattr(safetensors_format, "read_range", no_data)
    monkeypatch.setattr(safetensors_format, "read_tensor", no_data)
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert main(["plan", "--base", str(pair.base), "--ft", str(pair.ft), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert sorted(tmp_path.rglob("*")) == before
    kinds = {e["tensor"]: e["kind"] for e in plan["entries"]}
    assert kinds["model.layers.0.mlp.experts.down_proj"] == "experts"
    assert kinds["visual.patch_embed.proj.weight"] == "conv"
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == "svd"
    assert kinds["model.position_ids"] == "passthrough"
    assert plan["tensors_by_kind"] == {"conv": 1, "experts": 1, "passthrough": 5, "svd": 12}
    assert plan["matrices_to_repair"] == 12 + 1 + 4
    assert plan["base_only"] == ["mtp.only_in_base.weight"]
    assert plan["ft_only"] == ["model.new_adapter.weight"]
    assert plan["bytes_total"] == sum(t.numel() * t.element_size() for t in pair.ft_tensors.values())


def test_plan_text_and_its_exit_code_on_a_refused_tensor(pair, tmp_path, capsys):
    assert main(["plan", "--base", str(pair.base), "--ft", str(pair.ft), "--tensors"]) == 0
    text = capsys.readouterr().out
    assert "experts" in text and "model.layers.0.mlp.experts.down_proj" in text and "[expert stack of 4" in text
    assert "base-only keys (1): mtp.only_in_base.weight" in text
    # A fused gate/up stack whose fused axis is odd is not a gate/up pair: plan says so, repair stops
    # before writing anything.
    fused = {"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(2, 63, 32)}
    write_single(tmp_path / "fb", fused)
    write_single(tmp_path / "ff", {k: v + 1 for k, v in fused.items()})
    assert main(["plan", "--base", str(tmp_path / "fb"), "--ft", str(tmp_path / "ff")]) == 2
    assert "REFUSED model.layers.0.mlp.experts.gate_up_proj" in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(["repair", "--base", str(tmp_path / "fb"), "--ft", str(tmp_path / "ff"), "--out", str(out)]) == 2
    assert "gate_up_proj" in capsys.readouterr().err and not out.exists()


def test_plan_id_is_deterministic_and_tracks_options(pair, capsys):
    ids = []
    for extra in ((), (), ("--scale", "1.5"), ("--exclude", "lm_head")):
        assert main(["plan", "--base", str(pair.base), "--ft", str(pair.ft), "--json", *extra]) == 0
        ids.append(json.loads(capsys.readouterr().out)["plan_id"])
    assert ids[0] == ids[1] and len(set(ids)) == 3


def test_yaml_config_with_flag_override(pair, tmp_path):
    cfg_file = tmp_path / "repair.yaml"
    out = tmp_path / "out"
    cfg_file.write_text(yaml.safe_dump({"base": str(pair.base), "ft": str(pair.ft), "out": str(out),
                                        "scale": 3.0, "min-numel": 4096, "progress": False,
                                        "exclude": ["lm_head"]}))
    assert main(["repair", "--config", str(cfg_file), "--scale", "1.25"]) == 0
    summary = json.loads((out / "dgrepair" / "summary.json").read_text())
    assert summary["config"]["scale"] == 1.25  # the flag wins over the file
    assert summary["config"]["min_numel"] == 4096 and summary["config"]["exclude"] == ["lm_head"]
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet").set_index("tensor")
    assert m.loc["lm_head.weight"].reason == "outside mask"
    assert m.loc["model.layers.0.self_attn.k_proj.weight"].reason == "numel < 4096"  # 32 x 64 = 2048


@pytest.mark.parametrize("content,needle", [("scale: [", "invalid YAML"), ("bogus: 1", "unknown option 'bogus'"),
                                            ("scale: -1", "scale must be > 0"), ("- a", "must be a mapping"),
                                            ("mask: nope", "mask must be one of all, mlp_only"),
                                            ("include: ['(']", "invalid regular expression")])
def test_bad_config_file(tmp_path, capsys, content, needle):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(content)
    assert main(["repair", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert needle in err


def test_missing_required_paths(capsys):
    assert main(["repair", "--base", "x"]) == 2
    assert "missing --ft, --out" in capsys.readouterr().err


def test_help_lists_every_config_option():
    help_text = build_parser()._subparsers._group_actions[0].choices["repair"].format_help()
    for spec in flag_specs():
        flag = spec.name.replace("_", "-")
        assert f"--{flag}" in help_text or f"--no-{flag}" in help_text, flag  # booleans: the non-default spelling


def test_demo_recovers_the_planted_ranks(tmp_path, capsys):
    results = run_demo(tmp_path, dtype="F32", kernel="gram64", stream=__import__("sys").stdout)
    assert len(results) == 16
    assert all(r["kept"] == r["planted"] for r in results)
    assert all(r["err_repaired"] < r["err_ft"] / 3 for r in results)
    text = capsys.readouterr().out
    assert "SYNTHETIC" in text
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("tensor "))
    table = lines[head:head + 1 + len(results)]
    assert len({len(line) for line in table}) == 1  # every row as wide as the header: columns line up
    for col in ("shape", "planted", "kept", "err ft", "err repaired"):  # right-aligned: same right edge
        edge = table[0].index(col) + len(col)
        assert all(line[edge - 1] != " " and (edge == len(line) or line[edge] == " ") for line in table[1:]), col
