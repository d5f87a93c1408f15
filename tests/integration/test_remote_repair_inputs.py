"""`dgrepair repair` reading --base and --ft from s3:// on a real S3 API server (moto, loopback): the
same output bytes as from local folders, tensor data read with ranged GETs only and nothing written to
the bucket, in-process and on Ray; bucket failures during the run are exit-2 errors naming the URI."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pandas as pd
import pytest
import s3server
from pairs import make_pair
from s3server import ThrottlingProxy

from dgrepair.cli import main
from dgrepair.engine.io import bytes as byteio
from dgrepair.engine.io import remote_checkpoint
from dgrepair.engine.io.objstore import NoSuchKey, Storage, StoreSettings, Throttled, TruncatedObject, parse_uri
from dgrepair.engine.io.remote_checkpoint import RemotePath
from dgrepair.engine.run import session as run_session

s3_server, s3_env = s3server.s3_server, s3server.s3_env

# Tiny parts so that every tensor of the test pair is read as several concurrent ranged GETs.
SMALL_PARTS = StoreSettings(part_bytes=16 << 10, concurrency=4)


def upload(server, folder: Path, bucket: str, prefix: str) -> None:
    s3 = server.boto3()
    for f in sorted(folder.iterdir()):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{f.name}", Body=f.read_bytes())


def output_digests(out: Path) -> dict[str, str]:
    """sha256 of every output file except dgrepair's own metadata folder."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.relative_to(out).parts[0] != "dgrepair"}


def ranks(out: Path) -> list[tuple]:
    m = pd.read_parquet(out / "dgrepair" / "manifest.parquet")
    cols = ["tensor", "expert", "part", "status", "rank_total", "rank_kept", "byte_begin", "byte_end", "sha256"]
    return sorted(m[cols].astype(str).itertuples(index=False, name=None))


def repair(base: str, ft: str, out: Path | str, *extra: str) -> int:
    return main(["repair", "--base", base, "--ft", ft, "--out", str(out), "--no-progress", *extra])


@pytest.fixture
def remote_pair(s3_env, tmp_path, monkeypatch):
    """The test pair on local disk and in a bucket (base under s3://ckpts/base, ft under s3://ckpts/ft),
    opened with tiny ranged-GET parts."""
    pair = make_pair(tmp_path / "local")
    s3_env.boto3().create_bucket(Bucket="ckpts")
    upload(s3_env, pair.base, "ckpts", "base")
    upload(s3_env, pair.ft, "ckpts", "ft")
    monkeypatch.setattr(remote_checkpoint, "Storage", lambda: Storage(SMALL_PARTS))
    return pair


@pytest.fixture
def local_result(remote_pair, tmp_path):
    out = tmp_path / "from-disk"
    assert repair(str(remote_pair.base), str(remote_pair.ft), out, "--in-process") == 0
    return out


def test_repair_from_s3_writes_the_bytes_of_the_local_run_with_ranged_gets_only(remote_pair, local_result, s3_env,
                                                                                 tmp_path, monkeypatch, capsys):
    proxy = ThrottlingProxy(s3_env.url)  # sees every request the run makes
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        out = tmp_path / "from-s3"
        assert repair("s3://ckpts/base", "s3://ckpts/ft", out, "--in-process") == 0
    finally:
        proxy.close()
    capsys.readouterr()
    want = output_digests(local_result)
    assert output_digests(out) == want and "config.json" in want and len(want) >= 7  # shards, index, sidecars
    assert ranks(out) == ranks(local_result)
    assert (out / "dgrepair" / "summary.json").is_file()
    # Inputs are only read: no PUT, POST or DELETE reached the bucket, and every GET of a shard object
    # asked for a byte range (no whole-object download), most of them split into several parts.
    assert {method for method, _, _ in proxy.log} <= {"GET", "HEAD"}
    shard_keys = {f"/ckpts/{side}/{f.name}" for side, d in (("base", remote_pair.base), ("ft", remote_pair.ft))
                  for f in d.glob("*.safetensors")}
    shard_gets = [(path, rng) for method, path, rng in proxy.log if method == "GET" and path in shard_keys]
    assert shard_gets and all(rng and rng.startswith("bytes=") for _, rng in shard_gets)
    largest = max(int(r.removeprefix("bytes=").split("-")[1]) - int(r.removeprefix("bytes=").split("-")[0]) + 1
                  for _, r in shard_gets)
    assert largest <= SMALL_PARTS.part_bytes
    data = sum(f.stat().st_size for d in (remote_pair.base, remote_pair.ft) for f in d.glob("*.safetensors"))
    assert proxy.bytes_out < 2 * data  # each range once (the pair's tensors are read once or twice)


def test_remote_path_and_storage_pickle_without_clients_and_read_the_same_bytes(remote_pair, s3_env):
    shard = sorted(remote_pair.ft.glob("*.safetensors"))[0]
    remote = RemotePath(parse_uri(f"s3://ckpts/ft/{shard.name}"), Storage(SMALL_PARTS))
    assert remote.size() == shard.stat().st_size  # creates a client, which must not travel
    clone = pickle.loads(pickle.dumps(remote))
    assert clone == remote and clone.storage.settings == SMALL_PARTS and clone.storage._stores == {}
    local = shard.read_bytes()
    assert byteio.read_range(clone, 5, 70_000) == local[5:70_000]
    chunks = list(byteio.iter_range(clone, 3, len(local), chunk=40_000))
    assert [pos for pos, _ in chunks] == list(range(3, len(local), 40_000))
    assert b"".join(chunks[i][1] for i in range(len(chunks))) == local[3:]
    assert byteio.sha256_range(clone, 0, len(local)) == hashlib.sha256(local).hexdigest()
    err = pickle.loads(pickle.dumps(TruncatedObject("s3://b/k", "cut short").about("tensor 'w'")))
    assert type(err) is TruncatedObject and str(err) == "s3://b/k: tensor 'w': cut short" and err.uri == "s3://b/k"


def _after_planning(monkeypatch, action) -> None:
    """Run `action` once the run has planned (headers read, output not yet created)."""
    load = run_session.load_inputs

    def load_then_act(cfg):
        inputs = load(cfg)
        action(inputs)
        return inputs

    monkeypatch.setattr(run_session, "load_inputs", load_then_act)


def _at_the_first_unit(monkeypatch, action) -> None:
    """Run `action` just before the first work unit reads its tensors (the output folder is prepared)."""
    step = run_session.RunSession.step

    def act_then_step(*args):  # (jobs, settings, phases)
        action()
        return step(*args)

    monkeypatch.setattr(run_session.RunSession, "step", staticmethod(act_then_step))


def _last_tensor(shard: Path) -> str:
    from dgrepair.engine.io.safetensors_format import read_header

    return max(read_header(shard).tensors.values(), key=lambda t: t.end).name


def assert_clean_exit_2(out: Path, err: str, uri: str) -> None:
    assert uri in err and "Traceback" not in err, err
    assert not (out / "dgrepair" / "summary.json").exists()
    assert not (out / "model.safetensors.index.json").exists()  # nothing that looks complete


def test_an_object_cut_short_after_planning_is_exit_2_naming_the_uri_and_tensor(remote_pair, s3_env, tmp_path,
                                                                                monkeypatch, capsys):
    shard = sorted(remote_pair.ft.glob("*.safetensors"))[0]
    key = f"ft/{shard.name}"
    _after_planning(monkeypatch, lambda _: s3_env.boto3().put_object(Bucket="ckpts", Key=key,
                                                                     Body=shard.read_bytes()[:-100]))
    out = tmp_path / "out"
    assert repair("s3://ckpts/base", "s3://ckpts/ft", out, "--in-process") == 2
    err = capsys.readouterr().err
    assert_clean_exit_2(out, err, f"s3://ckpts/{key}")
    assert f"tensor {_last_tensor(shard)!r}" in err and "truncated" in err, err


def test_a_key_deleted_after_planning_is_exit_2_naming_the_uri(remote_pair, s3_env, tmp_path, monkeypatch, capsys):
    shard = sorted(remote_pair.base.glob("*.safetensors"))[0]
    key = f"base/{shard.name}"
    _after_planning(monkeypatch, lambda _: s3_env.boto3().delete_object(Bucket="ckpts", Key=key))
    out = tmp_path / "out"
    assert repair("s3://ckpts/base", "s3://ckpts/ft", out, "--in-process") == 2
    err = capsys.readouterr().err
    assert_clean_exit_2(out, err, f"s3://ckpts/{key}")
    assert "deleted or moved since" in err and "tensor '" in err, err


def test_throttling_beyond_the_retries_is_exit_2_naming_the_uri(remote_pair, s3_env, tmp_path, monkeypatch,
                                                                capsys):
    proxy = ThrottlingProxy(s3_env.url)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        _at_the_first_unit(monkeypatch, lambda: setattr(proxy, "fail", 10**6))  # every request from now on
        out = tmp_path / "out"
        assert repair("s3://ckpts/base", "s3://ckpts/ft", out, "--in-process") == 2
    finally:
        proxy.close()
    err = capsys.readouterr().err
    assert_clean_exit_2(out, err, "s3://ckpts/")
    assert "503 SlowDown" in err and "retries" in err and "tensor '" in err, err
    gets = [p for m, p, _ in proxy.log if m == "GET"]
    assert len(gets) > Storage().settings.max_retries  # it did retry before giving up


def test_s3_inputs_to_an_s3_output_give_the_bytes_of_the_local_run(remote_pair, local_result, s3_env, tmp_path):
    """The whole path through the bucket: --base, --ft and --out all s3://."""
    assert repair("s3://ckpts/base", "s3://ckpts/ft", "s3://ckpts/out", "--in-process",
                  "--scratch", str(tmp_path / "scratch")) == 0
    got = {k: v for k, v in s3_env.files("ckpts", "out").items() if not k.startswith("dgrepair/")}
    assert got == output_digests(local_result)


@pytest.mark.slow
def test_ray_two_workers_from_s3_write_the_local_bytes_and_stop_cleanly_on_a_deleted_key(
        remote_pair, local_result, s3_env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ray-from-s3"
    assert repair("s3://ckpts/base", "s3://ckpts/ft", out, "--workers", "2") == 0
    assert output_digests(out) == output_digests(local_result)
    assert ranks(out) == ranks(local_result)
    capsys.readouterr()
    # A worker's bucket error crosses to the driver intact: exit 2, the URI named, no summary.
    shard = sorted(remote_pair.ft.glob("*.safetensors"))[0]
    key = f"ft/{shard.name}"
    _after_planning(monkeypatch, lambda _: s3_env.boto3().delete_object(Bucket="ckpts", Key=key))
    bad = tmp_path / "ray-bad"
    assert repair("s3://ckpts/base", "s3://ckpts/ft", bad, "--workers", "2") == 2
    err = capsys.readouterr().err
    assert_clean_exit_2(bad, err, f"s3://ckpts/{key}")
    assert "deleted or moved since" in err, err


def test_storage_errors_keep_their_type_across_pickling():
    for cls in (NoSuchKey, Throttled, TruncatedObject):
        err = pickle.loads(pickle.dumps(cls("s3://b/k", "why")))
        assert type(err) is cls and str(err) == "s3://b/k: why"


@pytest.mark.slow
def test_s3_inputs_to_an_s3_output_on_two_ray_workers(remote_pair, local_result, s3_env, tmp_path):
    assert repair("s3://ckpts/base", "s3://ckpts/ft", "s3://ckpts/runs/ray", "--workers", "2",
                  "--scratch", str(tmp_path / "scratch")) == 0
    got = s3_env.files("ckpts", "runs/ray")
    assert {k: v for k, v in got.items() if not k.startswith("dgrepair/")} == output_digests(local_result)
    assert "dgrepair/summary.json" in got
