"""`dgrepair plan` on s3:// inputs: the same plan as from local folders, from headers alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import s3server
from pairs import make_pair
from s3server import ThrottlingProxy

from dgrepair.cli import main

s3_server, s3_env = s3server.s3_server, s3server.s3_env


def upload(server, folder: Path, bucket: str, prefix: str) -> int:
    """Copy a checkpoint folder to s3://bucket/prefix; returns the bytes uploaded."""
    s3, total = server.boto3(), 0
    for f in sorted(folder.iterdir()):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{f.name}", Body=f.read_bytes())
        total += f.stat().st_size
    return total


def plan_json(capsys, base: str, ft: str) -> dict:
    assert main(["plan", "--base", base, "--ft", ft, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    plan.pop("plan_id")  # depends on the inputs' roots, which differ by design
    return plan


@pytest.fixture
def remote_pair(s3_env, tmp_path):
    pair = make_pair(tmp_path / "local")
    s3_env.boto3().create_bucket(Bucket="ckpts")
    sizes = upload(s3_env, pair.base, "ckpts", "base") + upload(s3_env, pair.ft, "ckpts", "runs/ft")
    return pair, sizes


def test_plan_from_s3_equals_the_local_plan_and_reads_headers_only(remote_pair, s3_env, monkeypatch, capsys):
    pair, uploaded = remote_pair
    local = plan_json(capsys, str(pair.base), str(pair.ft))
    proxy = ThrottlingProxy(s3_env.url)  # counts what the plan pulls from the bucket
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        remote = plan_json(capsys, "s3://ckpts/base", "s3://ckpts/runs/ft/")
    finally:
        proxy.close()
    assert remote == local and remote["entries"]
    header_end = {f"/ckpts/{prefix}/{f.name}": 8 + int.from_bytes(f.read_bytes()[:8], "little")
                  for d, prefix in ((pair.base, "base"), (pair.ft, "runs/ft")) for f in d.glob("*.safetensors")}
    shard_gets = [(path, rng) for method, path, rng in proxy.log if method == "GET" and path in header_end]
    assert {path for path, _ in shard_gets} == set(header_end)  # every shard's header was read ...
    for path, rng in shard_gets:  # ... by ranged GETs that stop at the end of its header
        assert rng is not None and rng.startswith("bytes=")
        first, last = map(int, rng.removeprefix("bytes=").split("-"))
        assert 0 <= first <= last < header_end[path], (path, rng)
    assert proxy.bytes_out < uploaded / 10


def test_plan_from_s3_errors_name_the_uri(remote_pair, s3_env, capsys):
    pair, _ = remote_pair
    assert main(["plan", "--base", "s3://no-such-bucket-dgr/base", "--ft", "s3://ckpts/runs/ft"]) == 2
    err = capsys.readouterr().err
    assert "s3://no-such-bucket-dgr/base" in err and "does not exist" in err and "Traceback" not in err
    assert main(["plan", "--base", "s3://ckpts/nothing-here", "--ft", "s3://ckpts/runs/ft"]) == 2
    assert "s3://ckpts/nothing-here: no such directory" in capsys.readouterr().err
    # a shard cut short after upload: the header promises more data than the object holds
    shard = sorted(pair.ft.glob("*.safetensors"))[0]
    s3_env.boto3().put_object(Bucket="ckpts", Key=f"runs/ft/{shard.name}", Body=shard.read_bytes()[:-100])
    assert main(["plan", "--base", "s3://ckpts/base", "--ft", "s3://ckpts/runs/ft"]) == 2
    err = capsys.readouterr().err
    assert f"s3://ckpts/runs/ft/{shard.name}" in err and "truncated" in err and "dgrepair-header-" not in err

