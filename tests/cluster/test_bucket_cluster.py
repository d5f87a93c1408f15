"""An s3:// --out on real Ray against a real S3 API server (moto, loopback): 1 and 2 workers give the
in-process bytes, and a run whose whole cluster (and scratch) is lost mid-run resumes on a new
cluster from the bucket alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3server
from pairs import make_pair
from raytools import RayHead
from s3server import local_files, weights

ray = pytest.importorskip("ray")

from dgrepair.cli import main  # noqa: E402

s3_server, s3_env = s3server.s3_server, s3server.s3_env
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    pair = make_pair(root / "pair")
    out = root / "out"
    assert main(["repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", str(out), "--in-process",
                 "--no-progress"]) == 0
    return pair, weights(local_files(out))


def cli(pair, out: str, scratch: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dgrepair", "repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", out,
            "--scratch", str(scratch), "--executor", "ray", "--no-progress", "--commit-interval-s", "0", *extra]


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_workers_assemble_shards_and_write_the_in_process_bytes(reference, s3_env, tmp_path, workers):
    pair, ref = reference
    bucket = f"ray-{workers}"
    s3_env.boto3().create_bucket(Bucket=bucket)
    done = subprocess.run(cli(pair, f"s3://{bucket}/out", tmp_path / "scratch", "--workers", str(workers)),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = s3_env.files(bucket, "out")
    assert weights(got) == ref
    summary = json.loads(s3_env.boto3().get_object(Bucket=bucket, Key="out/dgrepair/summary.json")["Body"].read())
    assert summary["executor"]["kind"] == "ray" and summary["executor"]["workers"] == workers
    assert not list((tmp_path / "scratch").rglob("*.safetensors"))  # every staged shard was uploaded and freed


def test_whole_cluster_lost_mid_run_resumes_on_a_new_cluster_from_the_bucket(reference, s3_env, tmp_path):
    pair, ref = reference
    bucket = "restart"
    s3_env.boto3().create_bucket(Bucket=bucket)
    out = f"s3://{bucket}/nightly"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    first = RayHead(tmp_path / "c1", env)
    first.start()
    try:
        proc = subprocess.Popen(cli(pair, out, tmp_path / "node-1", "--address", first.address, "--workers", "2",
                                    "--lock-ttl-s", "3"), cwd=ROOT, start_new_session=True,
                                env={**env, "DGREPAIR_FAULT_UNIT_DELAY": "0.5"}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if any(k.startswith("dgrepair/published/") for k in s3_env.files(bucket, "nightly")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    finally:
        first.stop()  # the whole cluster goes: head, workers, their scratch
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = s3_env.files(bucket, "nightly")
    assert "dgrepair/summary.json" not in before
    published = {k.removeprefix("dgrepair/published/").removesuffix(".json") for k in before
                 if k.startswith("dgrepair/published/")}
    assert published and len(published) < sum(k.endswith(".safetensors") for k in ref)
    time.sleep(3.5)  # the dead run's lock heartbeat ages past its TTL
    with RayHead(tmp_path / "c2", env) as second:  # a brand-new cluster with empty scratch (a RayJob retry)
        done = subprocess.run(cli(pair, out, tmp_path / "node-2", "--address", second.address, "--workers", "2"),
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "taking over the lock" in done.stderr and "resuming:" in done.stderr
    after = s3_env.files(bucket, "nightly")
    assert weights(after) == ref
    assert all(after[s] == before[s] for s in published)
