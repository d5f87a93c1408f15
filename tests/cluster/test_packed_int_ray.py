"""Kimi-K2-Thinking INT4 pairs on a real local Ray (2 CPUs): the same bytes as the in-process engine."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from frontier import write_pair  # noqa: E402

from dgrepair.cluster.driver import run_distributed  # noqa: E402
from dgrepair.engine.config import RepairConfig  # noqa: E402
from dgrepair.engine.run.executor import run_repair  # noqa: E402

pytestmark = pytest.mark.slow
FILES = ("model-1-of-2.safetensors", "model-2-of-2.safetensors", "model.safetensors.index.json", "config.json")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 << 20,
             logging_level="ERROR", _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.mark.parametrize(("fixture", "out_dtype"), [("kimi_k2_thinking", "keep"), ("kimi_k2_thinking", "bf16"),
                                                    ("kimi_k2_thinking_bf16_ft", "keep")])
def test_ray_and_in_process_write_identical_bytes(tmp_path: Path, fixture, out_dtype):
    base, ft = write_pair(fixture, tmp_path)

    def cfg(out: str, **kw) -> RepairConfig:
        return RepairConfig.of(base=str(base), ft=str(ft), out=str(tmp_path / out), progress=False, out_dtype=out_dtype,
                            **kw)

    run_repair(cfg("engine", in_process=True))
    summary = run_distributed(cfg("ray", workers=2))
    assert summary["executor"]["kind"] == "ray"
    for name in FILES:
        assert (tmp_path / "engine" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    cols = ["tensor", "status", "rank_kept", "sha256", "requant_error"]
    a, b = (pd.read_parquet(tmp_path / d / "dgrepair" / "manifest.parquet")[cols].sort_values("tensor")
            .reset_index(drop=True) for d in ("engine", "ray"))
    pd.testing.assert_frame_equal(a, b)
