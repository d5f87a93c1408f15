"""An s3:// --out on a real S3 API server (moto, loopback): the same bytes as a local --out, each
object visible only complete, metadata in the bucket, resume from the bucket alone after SIGKILL,
the lock as a conditional put, and clean exit-2 errors."""

from __future__ import annotations

import hashlib
import json
import signal
import time
from pathlib import Path

import pytest
import s3server
from killed_run import kill_after_commits
from pairs import make_pair
from s3server import local_files, weights

from dgrepair.cli import main
from dgrepair.engine.io.objstore import Storage, parse_uri
from dgrepair.engine.output.bucket_lock import BucketOutputLock
from dgrepair.engine.output.lock import LockHolder

s3_server, s3_env = s3server.s3_server, s3server.s3_env


def repair_args(pair, out: str, *extra: str) -> list[str]:
    return ["repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", out, "--in-process",
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The same pair repaired to a local folder: the bytes every bucket run must reproduce."""
    root = tmp_path_factory.mktemp("ref")
    pair = make_pair(root / "pair")
    assert main(repair_args(pair, str(root / "out"))) == 0
    return pair, local_files(root / "out")


@pytest.fixture
def bucket(s3_env, request):
    name = "out-" + hashlib.sha256(request.node.name.encode()).hexdigest()[:10]
    s3_env.boto3().create_bucket(Bucket=name)
    return name


def test_s3_out_gives_the_local_bytes_with_metadata_in_the_bucket(local_reference, s3_env, bucket, tmp_path):
    pair, reference = local_reference
    scratch = tmp_path / "scratch"
    assert main(repair_args(pair, f"s3://{bucket}/runs/r1", "--scratch", str(scratch))) == 0
    got = s3_env.files(bucket, "runs/r1")
    assert weights(got) == weights(reference) and len(weights(got)) >= 4  # 3 shards + index (+ sidecars)
    assert "dgrepair/summary.json" in got and "dgrepair/run.json" in got
    assert any(k.startswith("dgrepair/manifest.parquet/part-") for k in got)
    assert {k.split("/")[-1] for k in got if k.startswith("dgrepair/published/")} == \
        {f"{k}.json" for k in weights(reference) if k.endswith(".safetensors")}
    assert "dgrepair/lock" not in got  # released: deleted
    assert not any(scratch.rglob("*.safetensors"))  # the scratch is freed at the end
    s3 = s3_env.boto3()
    summary = json.loads(s3.get_object(Bucket=bucket, Key="runs/r1/dgrepair/summary.json")["Body"].read())
    local_summary = json.loads((Path(str(pair.base)).parent.parent / "out" / "dgrepair" / "summary.json")
                               .read_text())
    assert summary["totals"] == local_summary["totals"]  # same ranks and energies
    # A second run of the same plan finds it complete in the bucket and changes nothing.
    assert main(repair_args(pair, f"s3://{bucket}/runs/r1", "--scratch", str(tmp_path / "other"))) == 0
    assert s3_env.files(bucket, "runs/r1") == got


def test_uploads_are_whole_objects_written_once_under_their_final_keys(local_reference, s3_env, bucket,
                                                                       tmp_path, monkeypatch):
    pair, reference = local_reference
    proxy = s3server.ThrottlingProxy(s3_env.url)  # logs every request the run makes
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        assert main(repair_args(pair, f"s3://{bucket}/o", "--scratch", str(tmp_path / "s"))) == 0
    finally:
        proxy.close()
    writes = [(m, p.split("?")[0]) for m, p, _ in proxy.log  # (a POST to the bucket itself is a delete)
              if m in ("PUT", "POST") and p.split("?")[0] != f"/{bucket}"]
    shard_writes = [p for _, p in writes if p.endswith(".safetensors")]
    assert sorted(shard_writes) == sorted(f"/{bucket}/o/{k}" for k in reference if k.endswith(".safetensors")
                                          and not k.startswith("dgrepair/"))  # one PUT each, never rewritten
    order = [p for _, p in writes]
    summary = order.index(f"/{bucket}/o/dgrepair/summary.json")
    assert summary == len(order) - 1, order[summary:]  # summary.json is the last write
    assert order[0] == f"/{bucket}/o/dgrepair/lock"  # the first one is the lock
    assert all(order.index(p) < summary for p in shard_writes)


def test_sigkill_then_resume_from_the_bucket_alone_is_byte_identical(local_reference, s3_env, bucket, tmp_path,
                                                                     capsys):
    pair, reference = local_reference
    out = f"s3://{bucket}/nightly"
    killed = kill_after_commits(repair_args(pair, out, "--scratch", str(tmp_path / "node-a"), "--lock-ttl-s", "3"), 6)
    assert killed == -signal.SIGKILL
    before = s3_env.files(bucket, "nightly")
    assert "dgrepair/summary.json" not in before and "dgrepair/lock" in before  # the dead run's lock stays
    published = [k for k in before if k.startswith("dgrepair/published/")]
    assert published  # some shards were uploaded whole before the kill ...
    assert not any(k.endswith(".safetensors") and k not in reference for k in before)  # ... and nothing else
    # A new machine: no scratch from the first attempt. The dead run's lock is still fresh ...
    assert main(repair_args(pair, out, "--scratch", str(tmp_path / "node-b"), "--lock-ttl-s", "3")) == 2
    assert f"--out {out} is locked by another dgrepair run" in capsys.readouterr().err
    time.sleep(3.5)  # ... until its heartbeat is older than the TTL
    assert main(repair_args(pair, out, "--scratch", str(tmp_path / "node-b"), "--lock-ttl-s", "3")) == 0
    err = capsys.readouterr().err
    assert f"taking over the lock on {out}" in err
    assert "resuming:" in err
    after = s3_env.files(bucket, "nightly")
    assert weights(after) == weights(reference)
    summary = json.loads(s3_env.boto3().get_object(Bucket=bucket, Key="nightly/dgrepair/summary.json")["Body"].read())
    assert summary["resumed_entries"] > 0  # the published shards' entries were not redone
    for key in published:  # and their objects were not rewritten
        shard = key.removeprefix("dgrepair/published/").removesuffix(".json")
        assert after[shard] == before[shard]


def test_the_bucket_lock_admits_one_run_and_takes_over_only_a_stale_one(s3_env, bucket):
    storage, out = Storage(), parse_uri(f"s3://{bucket}/locked")
    first, second = BucketOutputLock(storage, out, ttl_s=60), BucketOutputLock(storage, out, ttl_s=60)
    assert first.acquire(LockHolder("host-a", 1, "t0", "plan-a")) is None
    with pytest.raises(Exception, match=r"locked by another dgrepair run \(pid 1 on host host-a, started t0, plan "
                                         r"plan-a, last heartbeat \d+ s ago"):
        second.acquire(LockHolder("host-b", 2, "t1", "plan-b"))
    first.release()
    assert second.acquire(LockHolder("host-b", 2, "t1", "plan-b")) is None
    second.release()
    # A holder that stops beating (killed) loses the lock to the next run once its TTL has passed.
    fourth, fifth = BucketOutputLock(storage, out, ttl_s=0.5), BucketOutputLock(storage, out, ttl_s=60)
    assert fourth.acquire(LockHolder("host-d", 4, "t2", "plan-d")) is None
    fourth._stop.set()  # its heartbeat thread ends: as if the process froze
    time.sleep(1.2)
    stale = fifth.acquire(LockHolder("host-e", 5, "t3", "plan-e"))
    assert stale is not None and (stale.host, stale.pid) == ("host-d", 4)
    # The frozen holder's next heartbeat fails its If-Match: it knows it lost the lock, and stops.
    fourth.beat()
    with pytest.raises(Exception, match="was taken over by another run"):
        fourth.check()
    fourth.release()  # must not delete the new holder's lock
    assert json.loads(storage.read_object(fifth.uri))["pid"] == 5
    fifth.release()
    assert not storage.list(out)  # a clean release deletes the lock object
    storage.write(fifth.uri, b"not a lock record")  # never taken over: the user is told what to do
    with pytest.raises(Exception, match="its record is unreadable, so it is never taken over: if no run uses this "
                                         "output, delete that object"):
        BucketOutputLock(storage, out, ttl_s=0.01).acquire(LockHolder("h", 6, "t", "p"))


def test_bad_output_prefixes_exit_2_naming_the_uri(local_reference, s3_env, bucket, tmp_path, capsys):
    pair, _ = local_reference
    s3 = s3_env.boto3()
    s3.put_object(Bucket=bucket, Key="taken/notes.txt", Body=b"somebody else's")
    assert main(repair_args(pair, f"s3://{bucket}/taken", "--scratch", str(tmp_path))) == 2
    assert f"--out s3://{bucket}/taken is not empty and holds no dgrepair run (notes.txt)" in capsys.readouterr().err
    assert main(repair_args(pair, "s3://no-such-bucket-here/x", "--scratch", str(tmp_path))) == 2
    assert "s3://no-such-bucket-here/x" in capsys.readouterr().err
    assert main(repair_args(pair, f"s3://{bucket}/a", "--emit-adapter", str(tmp_path / "ad"))) == 2
    assert "--emit-adapter with an object-store --out" in capsys.readouterr().err
    assert s3_env.files(bucket, "taken") == {"notes.txt": hashlib.sha256(b"somebody else's").hexdigest()}


auth_server = s3server.auth_server


def _inputs_digest(pair) -> dict[str, str]:
    return {f"{d.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
            for d in (Path(pair.base), Path(pair.ft)) for p in sorted(d.iterdir())}


@pytest.mark.parametrize("who", ["reader", "wrong secret", "unknown key"])
def test_output_credentials_and_permissions_exit_2_naming_the_uri(local_reference, auth_server, who, tmp_path,
                                                                  monkeypatch, capsys):
    pair, _ = local_reference
    url, keys = auth_server
    creds = {"reader": keys["reader"], "wrong secret": {**keys["admin"], "AWS_SECRET_ACCESS_KEY": "nope"},
             "unknown key": {"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000", "AWS_SECRET_ACCESS_KEY": "x"}}[who]
    s3server.use_endpoint(monkeypatch, url, **creds)
    before = _inputs_digest(pair)
    assert main(repair_args(pair, "s3://guarded/out", "--scratch", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert "s3://guarded/out" in err and "Traceback" not in err
    assert ("access denied" in err) if who == "reader" else ("rejected the credentials" in err)
    assert _inputs_digest(pair) == before
    s3server.use_endpoint(monkeypatch, url, **keys["admin"])
    listing = Storage().list(parse_uri("s3://guarded/out"))
    assert not any(o.uri.key.endswith("summary.json") for o in listing)


def test_output_throttled_past_the_retries_exits_2_naming_the_uri(local_reference, s3_env, bucket, tmp_path,
                                                                   monkeypatch, capsys):
    pair, _ = local_reference
    proxy = s3server.ThrottlingProxy(s3_env.url)
    proxy.fail = 10_000  # every request answers 503 SlowDown
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        assert main(repair_args(pair, f"s3://{bucket}/slow", "--scratch", str(tmp_path))) == 2
    finally:
        proxy.close()
    err = capsys.readouterr().err
    assert f"s3://{bucket}/slow" in err and "503 SlowDown" in err and "Traceback" not in err
    assert proxy.seen > 1  # retried before giving up
    assert s3_env.files(bucket, "slow") == {}


def test_output_prefix_inside_an_input_prefix_is_refused(s3_env, tmp_path, capsys):
    s3 = s3_env.boto3()
    s3.create_bucket(Bucket="nested")
    pair = make_pair(tmp_path / "pair")
    for d, prefix in ((pair.base, "base"), (pair.ft, "ft")):
        for f in sorted(Path(d).iterdir()):
            s3.put_object(Bucket="nested", Key=f"{prefix}/{f.name}", Body=f.read_bytes())
    for out, says in (("s3://nested/ft/repaired", "is inside"), ("s3://nested", "contains")):
        assert main(["repair", "--base", "s3://nested/base", "--ft", "s3://nested/ft", "--out", out,
                     "--in-process", "--no-progress", "--scratch", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err
        assert f"--out {out.rstrip('/')}" in err and says in err and "the input checkpoint s3://nested/" in err
    uploaded = [f"{prefix}/{f.name}" for d, prefix in ((pair.base, "base"), (pair.ft, "ft")) for f in Path(d).iterdir()]
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket="nested")["Contents"]) == sorted(uploaded)


def test_another_runs_prefix_needs_force_which_deletes_only_that_runs_objects(local_reference, s3_env, bucket,
                                                                             tmp_path, capsys):
    pair, _ = local_reference
    out, s3 = f"s3://{bucket}/f", s3_env.boto3()
    assert main(repair_args(pair, out, "--scratch", str(tmp_path / "s"))) == 0
    assert main(repair_args(pair, out, "--scratch", str(tmp_path / "s"), "--scale", "2")) == 2
    assert f"--out {out} holds a different dgrepair run" in capsys.readouterr().err
    s3.put_object(Bucket=bucket, Key="f/README.md", Body=b"mine")
    assert main(repair_args(pair, out, "--scratch", str(tmp_path / "s"), "--scale", "2", "--force")) == 2
    assert "--force replaces only what dgrepair wrote, but 1 entry is not from the previous run: README.md" in \
        capsys.readouterr().err
    s3.delete_object(Bucket=bucket, Key="f/README.md")
    assert main(repair_args(pair, out, "--scratch", str(tmp_path / "s"), "--scale", "2", "--force")) == 0
    local = tmp_path / "local-scale-2"
    assert main(repair_args(pair, str(local), "--scale", "2")) == 0
    got = s3_env.files(bucket, "f")
    assert weights(got) == weights(local_files(local))
    assert len([k for k in got if k.startswith("dgrepair/manifest.parquet/")]) == \
        len(list((local / "dgrepair" / "manifest.parquet").glob("part-*")))  # the first run's parts are gone


def test_hub_inputs_to_an_s3_output_give_the_local_bytes(local_reference, s3_env, bucket, tmp_path, monkeypatch):
    from hubcache import cache_repo

    pair, reference = local_reference
    cache = tmp_path / "hub"
    for repo, folder in (("org/base", pair.base), ("org/sft", pair.ft)):
        cache_repo(cache, repo, {f.name: f.read_bytes() for f in sorted(Path(folder).iterdir())})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert main(["repair", "--base", "org/base", "--ft", "org/sft", "--out", f"s3://{bucket}/hub", "--in-process",
                 "--no-progress", "--scratch", str(tmp_path / "s")]) == 0
    assert weights(s3_env.files(bucket, "hub")) == weights(reference)


@pytest.mark.parametrize("who", ["reader", "wrong secret"])
def test_input_prefix_credentials_are_checked_before_anything_is_written(auth_server, who, tmp_path, monkeypatch,
                                                                         capsys):
    """Reading inputs needs only read access ('reader' may read s3://guarded/in); a wrong secret is named."""
    url, keys = auth_server
    creds = keys["reader"] if who == "reader" else {**keys["reader"], "AWS_SECRET_ACCESS_KEY": "nope"}
    s3server.use_endpoint(monkeypatch, url, **creds)
    out = tmp_path / "out"
    assert main(["repair", "--base", "s3://guarded/in", "--ft", "s3://guarded/in", "--out", str(out),
                 "--in-process", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "s3://guarded/in" in err and "Traceback" not in err
    if who == "reader":  # the credentials work; the object there is not a checkpoint, and it says so
        assert "rejected the credentials" not in err and "access denied" not in err
    else:
        assert "rejected the credentials" in err
    assert not out.exists()
