"""`--executor auto|ray|local` (ADR 0019): which executor runs a repair, and the older spelling
`in_process` / `--in-process`."""

from __future__ import annotations

import pytest
import torch
import yaml

from dgrepair.cli import build_parser, config_from_args
from dgrepair.engine.config import RepairConfig
from dgrepair.engine.errors import InputError
from dgrepair.engine.run.executor import choose_executor

PATHS = {"base": "b", "ft": "f", "out": "o"}
ONE_MACHINE = "ray" if torch.cuda.is_available() else "local"  # auto on this machine, device auto


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.mark.parametrize("options, expected", [
    ({}, ONE_MACHINE),
    ({"device": "cpu"}, "local"),
    ({"device": "cpu", "workers": 3, "threads": 1}, "local"),
    ({"device": "cpu", "overlap": True}, "ray"),          # two units in flight on every worker
    ({"device": "cpu", "address": "10.0.0.1:6379"}, "ray"),
    ({"device": "cuda"}, "ray"),                          # one actor per GPU
    ({"device": "cuda:1"}, "ray"),
    ({"device": "cpu", "executor": "ray"}, "ray"),
    ({"device": "cpu", "executor": "local", "overlap": True}, "local"),
    ({"executor": "local"}, "local"),
])
def test_auto_runs_locally_only_on_one_machine_s_cpu(options, expected):
    assert choose_executor(RepairConfig.of(**PATHS, **options)) == expected


def test_a_job_s_ray_address_makes_auto_join_the_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # what `ray job submit` sets for its entry point
    cfg = RepairConfig.of(**PATHS, device="cpu")
    assert cfg.cluster.cluster_to_join() == "10.0.0.1:6379"
    assert choose_executor(cfg) == "ray"
    assert choose_executor(RepairConfig.of(**PATHS, device="cpu", executor="local")) == "local"
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert choose_executor(cfg) == "local"


def test_local_with_an_address_is_refused():
    with pytest.raises(InputError, match=r"--executor local runs in this process, so --address 10\.0\.0\.1:6379"):
        RepairConfig.of(**PATHS, executor="local", address="10.0.0.1:6379")


@pytest.mark.parametrize("spelling, expected", [
    ({"in_process": True}, "local"),
    ({"in-process": False}, "ray"),
    ({"execution": {"in_process": True}}, "local"),
    ({"in_process": True, "executor": "local"}, "local"),  # two spellings that agree
    ({}, "auto"),
])
def test_in_process_is_the_older_spelling_of_executor(spelling, expected):
    assert RepairConfig.of(**PATHS, **spelling).execution.executor == expected


@pytest.mark.parametrize("spelling, message", [
    ({"in_process": True, "executor": "ray"}, r"executor is given twice \('local' and 'ray'\)"),
    ({"in_process": "yes"}, r"in_process must be true or false \(got 'yes'\)"),
    ({"executor": "threads"}, r"executor"),
])
def test_contradictions_and_bad_values_are_input_errors(spelling, message):
    with pytest.raises(InputError, match=message):
        RepairConfig.of(**PATHS, **spelling)


def test_cli_flags_override_a_config_file_s_executor(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**PATHS, "in_process": True}))
    parse = build_parser().parse_args
    assert config_from_args(parse(["repair", "--config", str(config)])).execution.executor == "local"
    assert config_from_args(parse(["repair", "--config", str(config), "--executor", "ray"])).execution.executor == "ray"
    assert config_from_args(parse(["repair", "--config", str(config), "--no-in-process"])).execution.executor == "ray"
    plain = parse(["repair", *(f"--{k}={v}" for k, v in PATHS.items())])
    assert config_from_args(plain).execution.executor == "auto"
    assert config_from_args(parse(["repair", "--base=b", "--ft=f", "--out=o", "--in-process"])).execution.executor \
        == "local"


def test_the_ray_job_entry_point_refuses_a_local_executor(tmp_path, capsys):
    from dgrepair.cluster.job import main as job_main

    config = tmp_path / "repair.yaml"
    config.write_text(yaml.safe_dump({**PATHS, "execution": {"in_process": True}}))
    assert job_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"dgrepair: error: config file {config}: executor: local (or in_process: true) runs" in err
    assert "Traceback" not in err
