"""`dgrepair plan --estimate`: the cluster parser, the cost model against its own table, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from pairs import make_pair

from dgrepair.cli import main
from dgrepair.engine.analysis.cost_table import COST_ROWS
from dgrepair.engine.analysis.estimate import MatrixWork, estimate, matrix_seconds, parse_cluster
from dgrepair.engine.errors import InputError


def test_cluster_parser():
    assert (parse_cluster("8xH100").count, parse_cluster("8xH100").device) == (8, "h100")
    assert (parse_cluster(" 32 x cpu ").count, parse_cluster("h200").count) == (32, 1)
    for bad in ("8xV99", "0xcpu", "x", ""):
        with pytest.raises(InputError):
            parse_cluster(bad)


def test_model_reproduces_the_cost_rows():
    for row in COST_ROWS:
        got = matrix_seconds(row["device"], row["backend"], row["rows"], row["cols"])
        assert got == pytest.approx(row["seconds"], rel=0.6, abs=0.05), row


def test_estimate_scales_with_workers_and_says_what_is_projected():
    work = [MatrixWork(7168, 2048, 1000, "BF16"), MatrixWork(2048, 7168, 500, "BF16")]
    one, many = (estimate(work, 10 ** 9, 7168 * 2048 * 4, parse_cluster(c), 1.0) for c in ("1xcpu", "10xcpu"))
    assert one["compute_s_total"] == pytest.approx(many["compute_s_total"])
    assert many["compute_s_per_worker"] == pytest.approx(one["compute_s_per_worker"] / 10)
    assert one["measured"] and one["backends"] == {"gram32": 1500}
    gpu = estimate(work, 10 ** 9, 7168 * 2048 * 4, parse_cluster("2xh100"), 1.0)
    assert not gpu["measured"] and gpu["backends"] == {"gram64": 1500}  # fast FP64: float64 for BF16 too
    assert gpu["peak_device_gib"] > 0
    slow = estimate(work, 10 ** 9, 7168 * 2048 * 4, parse_cluster("2xl4"), 1.0)
    assert slow["backends"] == {"gram32": 1500}
    io_bound = estimate(work, 10 ** 13, 7168 * 2048 * 4, parse_cluster("1000xcpu"), 1.0)
    assert io_bound["bound"] == "I/O" and io_bound["wall_s"] >= 10 ** 4


def test_plan_prints_precision_and_estimate(tmp_path, capsys):
    pair = make_pair(tmp_path, dtype=torch.bfloat16)
    code = main(["plan", "--base", str(pair.base), "--ft", str(pair.ft), "--estimate", "4xcpu", "--json"])
    got = json.loads(capsys.readouterr().out)
    assert code == 0
    assert got["precision"] == {"BF16": "gram32: BF16 output (on cpu)"}
    assert got["estimate"]["cluster"] == "4xcpu" and got["estimate"]["matrices"] == got["matrices_to_repair"]
    main(["plan", "--base", str(pair.base), "--ft", str(pair.ft), "--estimate", "2xh200", "--fp64-rate", "fast"])
    text = capsys.readouterr().out
    assert "precision, BF16 outputs: gram64: BF16 output, fast-FP64 device (on cpu)" in text
    assert "PROJECTION" in text and "peak device memory" in text
    assert main(["plan", "--base", str(pair.base), "--ft", str(pair.ft), "--estimate", "3xfoo"]) == 2


def test_overlap_hides_io_behind_compute_and_two_units_in_flight_bound_the_peak():
    from dgrepair.engine.analysis.estimate import HOST_BASE_GIB, HOST_PER_F32_COPY, RAY_STARTUP_S

    work = [MatrixWork(2048, 2048, 100, "BF16")]
    on, off = (estimate(work, 10 ** 10, 1 << 20, parse_cluster("4xcpu"), 1.0, overlap=o) for o in (True, False))
    assert on["wall_s"] == pytest.approx(RAY_STARTUP_S + max(on["compute_s_per_worker"], on["io_s"]))
    assert off["wall_s"] == pytest.approx(RAY_STARTUP_S + off["compute_s_per_worker"] + off["io_s"])
    # small tensors: two units of up to --batch-mb (256 MiB of working set each) set the peak with overlap
    unit_gib = (256 << 20) / 4 / 2 ** 30  # float32 bytes of a unit at the budget (its working set is 4 copies)
    assert on["peak_host_gib_per_worker"] == pytest.approx(HOST_BASE_GIB + HOST_PER_F32_COPY * 2 * unit_gib)
    assert off["peak_host_gib_per_worker"] == pytest.approx(HOST_BASE_GIB + HOST_PER_F32_COPY * unit_gib)
    # one large tensor runs alone (engine/plan/units.py): the same peak with and without overlap
    big = [estimate(work, 10 ** 10, 8 << 30, parse_cluster("4xcpu"), 1.0, overlap=o) for o in (True, False)]
    assert big[0]["peak_host_gib_per_worker"] == big[1]["peak_host_gib_per_worker"] == pytest.approx(
        HOST_BASE_GIB + HOST_PER_F32_COPY * 8)
