"""Work units: grouping, and batching never changes the output bytes."""

from __future__ import annotations

import pandas as pd
from pairs import SHARDS

from dgrepair.cli import main
from dgrepair.engine.config import RepairConfig
from dgrepair.engine.io.checkpoint import open_checkpoint
from dgrepair.engine.plan.build import build_plan
from dgrepair.engine.plan.units import make_units


def test_same_shape_matrices_are_batched_under_the_budget(pair):
    plan = build_plan(open_checkpoint(pair.base, "base"), open_checkpoint(pair.ft, "ft"), RepairConfig())
    units = make_units(plan.entries)
    q_unit = next(u for u in units if any(e.name == "model.layers.0.self_attn.q_proj.weight" for e in u.entries))
    # 64 x 64 in both layers (q_proj) and the lm/embedding-free 64x64 matrices share a unit
    assert {e.matrix_shape for e in q_unit.entries} == {(64, 64)} and len(q_unit.entries) >= 2
    stack = next(u for u in units if u.entries[0].kind == "experts")
    assert len(stack.entries) == 1
    assert sorted(e.name for u in units for e in u.entries) == sorted(e.name for e in plan.entries)
    tiny = make_units(plan.entries, batch_bytes=1)
    assert all(len(u.entries) == 1 for u in tiny)


def test_batching_does_not_change_the_output(pair, tmp_path):
    outs = []
    for budget in ("1", "256"):
        out = tmp_path / f"out-{budget}"
        assert main(["repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", str(out), "--no-progress",
                     "--in-process", "--batch-mb", budget]) == 0
        outs.append(out)
    for shard in SHARDS:
        assert (outs[0] / shard).read_bytes() == (outs[1] / shard).read_bytes()


def test_kernel_choice_is_recorded_per_matrix(pair, tmp_path):
    out = tmp_path / "out"
    assert main(["repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", str(out), "--no-progress",
                 "--in-process", "--kernel", "gram32"]) == 0
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    repaired = m[m.status == "repaired"]
    assert set(repaired.kernel) <= {"gram32", "gram64"}
    assert (repaired.kernel == "gram64").sum() == repaired.fallback.notna().sum()


def test_an_fp8_weight_and_its_scales_form_one_unsplittable_unit(tmp_path):
    from pairs import fp8_pair

    fp8_pair(tmp_path)
    plan = build_plan(open_checkpoint(tmp_path / "base", "base"), open_checkpoint(tmp_path / "ft", "ft"),
                      RepairConfig())
    units = [u for u in make_units(plan.entries) if any(e.kind == "fp8" for e in u.entries)]
    assert len(units) == 2
    for unit in units:
        assert sorted(e.kind for e in unit.entries) == ["fp8", "fp8_scale"] and not unit.splittable
