"""Ranged-read throughput and client CPU per GB of three S3 clients against a loopback S3 server.

Candidates: obstore (Rust object_store), pyarrow.fs.S3FileSystem (AWS SDK for C++) and s3fs
(fsspec over aiobotocore). One object is uploaded to a moto server started here (and stopped by
its PID), then each candidate reads the whole object as 8 MB or 64 MB ranges, one range at a time
or 4 at a time from a thread pool. Candidates alternate inside every round so that load changes on
the shared machine hit all of them alike. CPU is this process's CPU time (all threads), so the
server's own CPU is not counted; throughput is bounded by the Python server on loopback, so the
CPU column is the one that transfers to a real endpoint.

    python bench/s3_clients.py [--size-mb 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
from s3server import start_moto, stop_moto  # noqa: E402 - the tests' loopback server, started by PID

BUCKET = "bench"
KEY = "blob.bin"
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


def make_readers(url: str) -> dict[str, object]:
    """name -> callable(begin, end) -> buffer, each built the way the library documents."""
    import obstore
    import pyarrow.fs as pafs
    import s3fs
    from obstore.store import S3Store

    ob = S3Store(BUCKET, endpoint=url, access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
                 secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"], region="us-east-1",
                 client_options={"allow_http": True})
    pa = pafs.S3FileSystem(access_key=CREDS["AWS_ACCESS_KEY_ID"], secret_key=CREDS["AWS_SECRET_ACCESS_KEY"],
                           endpoint_override=url, scheme="http", region="us-east-1")
    pa_file = pa.open_input_file(f"{BUCKET}/{KEY}")
    fs = s3fs.S3FileSystem(key=CREDS["AWS_ACCESS_KEY_ID"], secret=CREDS["AWS_SECRET_ACCESS_KEY"],
                           endpoint_url=url, client_kwargs={"region_name": "us-east-1"})
    return {
        "obstore": lambda b, e: obstore.get_range(ob, KEY, start=b, end=e),
        "pyarrow.fs": lambda b, e: pa_file.read_at(e - b, b),
        "s3fs": lambda b, e: fs.cat_file(f"{BUCKET}/{KEY}", start=b, end=e),
    }


def trial(read, size: int, chunk: int, workers: int) -> tuple[float, float, str]:
    ranges = [(b, min(b + chunk, size)) for b in range(0, size, chunk)]
    out = bytearray(size)
    view = memoryview(out)

    def one(r: tuple[int, int]) -> None:
        part = memoryview(read(*r))
        view[r[0]:r[1]] = part

    w0, c0 = time.perf_counter(), time.process_time()
    if workers == 1:
        for r in ranges:
            one(r)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, ranges))
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return wall, cpu, hashlib.sha256(out).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    size = args.size_mb << 20
    os.environ.update(CREDS)
    work = tempfile.mkdtemp(prefix="dgrepair-s3bench-")
    proc = start_moto(Path(work))
    url = proc.url
    try:
        import boto3
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        data = os.urandom(size)
        want = hashlib.sha256(data).hexdigest()
        s3.put_object(Bucket=BUCKET, Key=KEY, Body=data)
        del data
        readers = make_readers(url)
        print(f"# object {args.size_mb} MiB on moto_server {url}; load before: {os.getloadavg()}", flush=True)
        configs = [(8 << 20, 1), (8 << 20, 4), (64 << 20, 1), (64 << 20, 4)]
        results: dict[tuple[str, int, int], list[tuple[float, float]]] = {}
        for rnd in range(args.rounds):
            names = list(readers) if rnd % 2 == 0 else list(reversed(readers))
            for chunk, workers in configs:
                for name in names:
                    wall, cpu, digest = trial(readers[name], size, chunk, workers)
                    if digest != want:
                        raise SystemExit(f"{name}: read bytes differ from the uploaded object")
                    results.setdefault((name, chunk, workers), []).append((wall, cpu))
                    print(f"round {rnd} {name:10s} {chunk >> 20:3d} MiB x{workers}: {size / wall / 1e6:7.1f} MB/s "
                          f"cpu {cpu:6.2f} s", flush=True)
        print(f"# load after: {os.getloadavg()}")
        print("\n| client | range | concurrency | MB/s (median) | client CPU s per GB (median) |")
        print("|---|---|---|---|---|")
        for (name, chunk, workers), runs in results.items():
            mbps = statistics.median(size / w / 1e6 for w, _ in runs)
            cpu_gb = statistics.median(c / (size / 1e9) for _, c in runs)
            print(f"| {name} | {chunk >> 20} MiB | {workers} | {mbps:.0f} | {cpu_gb:.2f} |")
    finally:
        stop_moto(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
