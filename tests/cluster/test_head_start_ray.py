"""The driver's head start on the embedded Ray that `dgrepair repair` starts itself (no Ray is
initialised beforehand here, unlike tests/cluster/test_cluster_local.py): the driver repairs units
while Ray and the actors start, and the output bytes are those of the in-process engine and of a
run without the head start. A poison tensor it meets is handed back and fails the run with the
engine's own error."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from pairs import SHARDS

ray = pytest.importorskip("ray")

from dgrepair.cluster.driver import run_distributed  # noqa: E402
from dgrepair.engine.config import RepairConfig  # noqa: E402
from dgrepair.engine.errors import RepairFailure  # noqa: E402
from dgrepair.engine.run.executor import run_repair  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def no_ray_yet():
    assert not ray.is_initialized(), "another test left Ray running: the head start needs its own embedded start"
    yield
    assert not ray.is_initialized(), "run_distributed must shut down the Ray it started"


def cfg(pair, out: Path, **kw) -> RepairConfig:
    return RepairConfig.of(base=str(pair.base), ft=str(pair.ft), out=str(out), progress=False, **kw)


def test_the_driver_repairs_units_while_ray_starts_and_the_bytes_do_not_change(pair, tmp_path):
    run_repair(cfg(pair, tmp_path / "engine", in_process=True))
    with_head_start = run_distributed(cfg(pair, tmp_path / "on"))
    without = run_distributed(cfg(pair, tmp_path / "off", head_start=False))
    for shard in SHARDS:
        want = (tmp_path / "engine" / shard).read_bytes()
        assert (tmp_path / "on" / shard).read_bytes() == want, shard
        assert (tmp_path / "off" / shard).read_bytes() == want, shard
    on, off = with_head_start["executor"], without["executor"]
    # The fixture pair is tiny: the driver finishes units long before the actors have imported torch.
    assert on["head_start_units"] >= 1 and off["head_start_units"] == 0
    units = sum(n["units"] for n in on["per_node"].values())
    assert units == sum(n["units"] for n in off["per_node"].values())  # every unit counted once
    assert sum(n["tensors"] for n in on["per_node"].values()) == len(pair.ft_tensors)
    rows = pd.read_parquet(tmp_path / "on" / "dgrepair" / "manifest.parquet")
    assert len(rows) == len(pd.read_parquet(tmp_path / "engine" / "dgrepair" / "manifest.parquet"))
    assert set(rows.node) == set(on["per_node"])  # the driver's rows name the node it runs on, like an actor's


def test_a_poison_tensor_met_by_the_head_start_fails_the_run_with_the_engine_error(tmp_path):
    from ckpt import write_nan_pair

    base, ft = write_nan_pair(tmp_path)
    c = RepairConfig.of(base=str(base), ft=str(ft), out=str(tmp_path / "o"), progress=False)
    with pytest.raises(RepairFailure) as in_process:
        run_repair(RepairConfig.of(base=str(base), ft=str(ft), out=str(tmp_path / "e"), progress=False,
                                   in_process=True))
    with pytest.raises(RepairFailure) as on_ray:
        run_distributed(c)
    assert str(on_ray.value) == str(in_process.value) and "NaN/Inf" in str(on_ray.value)
    assert not (tmp_path / "o" / "dgrepair" / "summary.json").exists()
