"""The object-storage layer against a real S3 API server (moto) on loopback: values and errors."""

from __future__ import annotations

import os
import threading

import pytest
import s3server
from s3server import S3Server, ThrottlingProxy, use_endpoint

from dgrepair.engine.io.objstore import (
    AccessDenied,
    BadCredentials,
    NoSuchBucket,
    NoSuchKey,
    ObjectURI,
    Storage,
    StorageError,
    StoreSettings,
    Throttled,
    TruncatedObject,
    is_object_uri,
    parse_uri,
)

s3_server, s3_env = s3server.s3_server, s3server.s3_env  # the loopback server fixtures
auth_server = s3server.auth_server

SMALL = StoreSettings(part_bytes=256 << 10, concurrency=4, max_retries=3, backoff_initial_s=0.01,
                      backoff_max_s=0.05, retry_timeout_s=20, multipart_chunk_bytes=5 << 20)
_bucket_lock = threading.Lock()
_bucket_n = [0]


def new_bucket(server: S3Server) -> str:
    with _bucket_lock:
        _bucket_n[0] += 1
        name = f"dgr-test-{os.getpid()}-{_bucket_n[0]}"
    server.boto3().create_bucket(Bucket=name)
    return name


def pending_uploads(server: S3Server, bucket: str) -> list:
    return server.boto3().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


# -- URIs (no server) --------------------------------------------------------------------------

def test_parse_uri_values():
    assert parse_uri("s3://my-bucket/a/b/") == ObjectURI("s3", "my-bucket", "a/b")
    assert parse_uri("gs://bkt.x") == ObjectURI("gs", "bkt.x", "")
    u = parse_uri("s3://bkt/out")
    assert str(u.child("shard-1.safetensors")) == "s3://bkt/out/shard-1.safetensors"
    assert u.child("a/b").relative_to(u) == "a/b"
    assert parse_uri("s3://bkt").child("x") == ObjectURI("s3", "bkt", "x")
    with pytest.raises(ValueError):
        parse_uri("s3://bkt/outer").relative_to(u)  # `out` is not a path prefix of `outer`
    assert is_object_uri("s3://b/k") and is_object_uri("gs://b")
    assert not is_object_uri("org/model") and not is_object_uri("/tmp/s3://x") and not is_object_uri(3)


@pytest.mark.parametrize("text, says", [
    ("s3:/bkt/x", "not an object-store URI"),
    ("s3://", "bucket name ''"),
    ("s3://Upper/x", "bucket name 'Upper'"),
    ("s3://bkt/a//b", "empty, '.' or '..'"),
    ("gs://bkt/a/../b", "empty, '.' or '..'"),
])
def test_parse_uri_errors_name_the_uri(text, says):
    with pytest.raises(StorageError) as err:
        parse_uri(text)
    assert str(err.value).startswith(f"{text}: ") and says in str(err.value)


def test_gs_goes_through_the_same_layer():
    from obstore.store import GCSStore

    assert isinstance(Storage()._store(parse_uri("gs://some-bucket/p")), GCSStore)


# -- reads -------------------------------------------------------------------------------------

def test_ranged_reads_return_the_stored_bytes(s3_env):
    bucket = new_bucket(s3_env)
    data = os.urandom(3_000_017)
    s3_env.boto3().put_object(Bucket=bucket, Key="ck/model.safetensors", Body=data)
    st, uri = Storage(SMALL), parse_uri(f"s3://{bucket}/ck/model.safetensors")
    assert st.size(uri) == len(data)
    assert st.read_range(uri, 0, 8) == data[:8]
    assert st.read_range(uri, 1000, 2_500_001) == data[1000:2_500_001]  # 10 concurrent parts
    assert st.read_range(uri, 0, len(data)) == data
    assert st.read_range(uri, 5, 5) == b""
    assert st.read_object(uri) == data


def test_read_past_the_end_is_a_truncated_object(s3_env):
    bucket = new_bucket(s3_env)
    s3_env.boto3().put_object(Bucket=bucket, Key="short", Body=b"x" * 100)
    uri = parse_uri(f"s3://{bucket}/short")
    for begin, end in ((50, 200), (100, 108), (300, 308)):
        with pytest.raises(TruncatedObject) as err:
            Storage(SMALL).read_range(uri, begin, end)
        assert str(uri) in str(err.value) and "truncated" in str(err.value)


def test_missing_key_and_missing_bucket(s3_env):
    bucket = new_bucket(s3_env)
    st = Storage(SMALL)
    key = parse_uri(f"s3://{bucket}/nope/model.safetensors")
    gone = parse_uri("s3://no-such-bucket-dgr/ck/model.safetensors")
    for call in (lambda u: st.size(u), lambda u: st.read_range(u, 0, 8), lambda u: st.read_object(u)):
        with pytest.raises(NoSuchKey) as err:
            call(key)
        assert str(err.value).startswith(str(key))
        with pytest.raises(NoSuchBucket) as err:
            call(gone)
        assert str(err.value).startswith(str(gone)) and "no-such-bucket-dgr" in str(err.value)
    with pytest.raises(NoSuchBucket):
        st.list(parse_uri("s3://no-such-bucket-dgr/ck"))


def test_list_is_a_path_prefix_with_sizes(s3_env):
    bucket = new_bucket(s3_env)
    s3 = s3_env.boto3()
    for key, n in (("ck/a.json", 3), ("ck/sub/b.bin", 5), ("ck2/c", 7), ("top", 1)):
        s3.put_object(Bucket=bucket, Key=key, Body=b"z" * n)
    st = Storage(SMALL)
    got = [(o.uri.relative_to(parse_uri(f"s3://{bucket}/ck")), o.size) for o in st.list(parse_uri(f"s3://{bucket}/ck/"))]
    assert got == [("a.json", 3), ("sub/b.bin", 5)]
    assert [o.uri.key for o in st.list(parse_uri(f"s3://{bucket}"))] == ["ck/a.json", "ck/sub/b.bin", "ck2/c", "top"]
    assert st.list(parse_uri(f"s3://{bucket}/empty")) == []


# -- writes ------------------------------------------------------------------------------------

def test_write_small_and_multipart(s3_env):
    bucket = new_bucket(s3_env)
    st = Storage(SMALL)
    small = parse_uri(f"s3://{bucket}/out/summary.json")
    st.write(small, b'{"ok": true}')
    assert s3_env.boto3().get_object(Bucket=bucket, Key="out/summary.json")["Body"].read() == b'{"ok": true}'
    parts = [os.urandom(5 << 20), os.urandom(5 << 20), os.urandom(123_457)]
    big = parse_uri(f"s3://{bucket}/out/model-1.safetensors")
    st.write(big, iter(parts))  # an iterable goes up as a multipart upload, completed once
    head = s3_env.boto3().head_object(Bucket=bucket, Key="out/model-1.safetensors")
    assert head["ContentLength"] == sum(map(len, parts)) and head["ETag"].strip('"').endswith("-3")
    assert st.read_range(big, 0, head["ContentLength"]) == b"".join(parts)
    assert pending_uploads(s3_env, bucket) == []


def test_failed_multipart_leaves_no_object_under_the_final_key(s3_env):
    bucket = new_bucket(s3_env)
    st = Storage(SMALL)
    uri = parse_uri(f"s3://{bucket}/out/model-2.safetensors")

    def parts():
        yield os.urandom(5 << 20)
        yield os.urandom(5 << 20)
        raise OSError("scratch disk failed mid-shard")

    with pytest.raises(Exception):  # noqa: B017 - whatever the producer raised, surfaced by the client
        st.write(uri, parts())
    with pytest.raises(NoSuchKey):
        st.size(uri)
    assert st.list(parse_uri(f"s3://{bucket}/out")) == []
    assert pending_uploads(s3_env, bucket) == []  # the upload was aborted, not left to bill


def test_put_if_absent_creates_once(s3_env):
    bucket = new_bucket(s3_env)
    st = Storage(SMALL)
    lock = parse_uri(f"s3://{bucket}/out/.dgrepair.lock")
    assert st.put_if_absent(lock, b"run-a") is True
    assert st.put_if_absent(lock, b"run-b") is False
    assert st.read_object(lock) == b"run-a"
    st.delete(lock)
    assert st.put_if_absent(lock, b"run-c") is True and st.read_object(lock) == b"run-c"


# -- throttling --------------------------------------------------------------------------------

def test_slowdown_is_retried_then_a_clear_error(s3_env, monkeypatch):
    bucket = new_bucket(s3_env)
    s3_env.boto3().put_object(Bucket=bucket, Key="k", Body=b"0123456789")
    proxy = ThrottlingProxy(s3_env.url)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        uri = parse_uri(f"s3://{bucket}/k")
        proxy.fail = 2
        assert Storage(SMALL).read_range(uri, 2, 6) == b"2345"  # two 503s, then the answer
        assert proxy.seen == 3 and proxy.fail == 0
        proxy.fail, proxy.seen = 1000, 0
        with pytest.raises(Throttled) as err:
            Storage(SMALL).read_range(uri, 0, 4)
        assert proxy.seen == SMALL.max_retries + 1
        assert str(err.value).startswith(str(uri)) and "SlowDown" in str(err.value)
    finally:
        proxy.close()


def test_unreachable_endpoint_is_a_clear_error(monkeypatch):
    use_endpoint(monkeypatch, f"http://127.0.0.1:{s3server._free_port()}")  # nothing listens there
    uri = parse_uri("s3://bkt/model.safetensors")
    with pytest.raises(StorageError) as err:
        Storage(SMALL).read_range(uri, 0, 8)
    assert str(err.value).startswith(f"{uri}: cannot reach http://127.0.0.1:") and "AWS_ENDPOINT_URL" in str(err.value)


# -- credentials and permissions (a second server with IAM authentication switched on) ----------

def _use(monkeypatch, url, keys):
    use_endpoint(monkeypatch, url, **keys)


def test_valid_reader_reads(auth_server, monkeypatch):
    url, keys = auth_server
    _use(monkeypatch, url, keys["reader"])
    assert Storage(SMALL).read_range(parse_uri("s3://guarded/in/model.safetensors"), 2, 5) == b"cde"


@pytest.mark.parametrize("who", ["unknown key", "wrong secret"])
def test_bad_credentials(auth_server, monkeypatch, who):
    url, keys = auth_server
    bad = ({"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000", "AWS_SECRET_ACCESS_KEY": "x"} if who == "unknown key"
           else {**keys["reader"], "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    _use(monkeypatch, url, bad)
    uri = parse_uri("s3://guarded/in/model.safetensors")
    for call in (lambda st: st.read_range(uri, 0, 8), lambda st: st.size(uri)):
        with pytest.raises(BadCredentials) as err:
            call(Storage(SMALL))
        assert str(err.value).startswith(str(uri)) and "AWS_ACCESS_KEY_ID" in str(err.value)


def test_access_denied_on_the_output_prefix(auth_server, monkeypatch):
    url, keys = auth_server
    _use(monkeypatch, url, keys["reader"])
    out = parse_uri("s3://guarded/out/model.safetensors")
    st = Storage(SMALL)
    lock = parse_uri("s3://guarded/out/.dgrepair.lock")
    for call in (lambda: st.write(out, b"x"), lambda: st.put_if_absent(lock, b"x")):
        with pytest.raises(AccessDenied) as err:
            call()
        assert "access denied" in str(err.value) and str(err.value).startswith("s3://guarded/out/")
