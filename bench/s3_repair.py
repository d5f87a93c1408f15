"""Repair reading its inputs from a loopback S3 server vs from the local disk, same pair, one sitting.

A synthetic TinyLlama-shaped pair (engine/demo/synthetic.py, BF16, small vocabulary, shards of
--shard-mb) is written to local disk and uploaded to a moto server started here on 127.0.0.1 (the
tests' fixture, stopped by its PID). Then `dgrepair repair` runs, each in a fresh process and always
to a local --out, in four configurations that alternate inside every round (the order is reversed
every other round, so load changes on a shared machine hit all of them alike):

    local in-process, s3 in-process, local --workers 2, s3 --workers 2

Every output is checked byte for byte (sha256 of every file but dgrepair/) against the first run's.
Printed: median wall per configuration, the s3/local ratio per executor, and for the Ray runs the
bytes per second each worker reached (summary.json executor.per_node: bytes_read / seconds, where
seconds sums the workers' unit times, so it is the mean per-worker rate; it includes compute).

    python bench/s3_repair.py [--layers 2] [--vocab 8000] [--rounds 3] [--shard-mb 128] [--method dg_hard]

`--method wise_ft` (an elementwise method: almost no compute) shows the read path itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
from s3server import REGION, client_env, start_moto, stop_moto  # noqa: E402 - the tests' loopback server

from dgrepair.engine.demo.synthetic import tinyllama_spec, write_pair  # noqa: E402

BUCKET = "bench"
CONFIGS = (("local", "in-process"), ("s3", "in-process"), ("local", "workers 2"), ("s3", "workers 2"))


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.relative_to(out).parts[0] != "dgrepair"}


def timed_repair(cmd: list[str], env: dict[str, str], out: Path, reference: dict[str, str] | None,
                 what: str) -> tuple[float, dict[str, str]]:
    """Run one `dgrepair repair` command; (wall seconds, output digests), which must equal `reference`."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    got = digests(out)
    if reference is not None and got != reference:
        sys.exit(f"{what}: output bytes differ from the first run's")
    return wall, got


def upload(url: str, folder: Path, prefix: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=url, region_name=REGION, aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    for f in sorted(folder.iterdir()):
        s3.upload_file(str(f), BUCKET, f"{prefix}/{f.name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--shard-mb", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--method", default="dg_hard")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dgrepair-s3repair-"))
    spec = tinyllama_spec(args.layers, vocab=args.vocab, shard_bytes=args.shard_mb << 20)
    base, ft = write_pair(work / "pair", spec)
    pair_bytes = sum(f.stat().st_size for d in (base, ft) for f in d.glob("*.safetensors"))
    proc = start_moto(work)
    try:
        import boto3

        boto3.client("s3", endpoint_url=proc.url, region_name=REGION, aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        upload(proc.url, base, "base")
        upload(proc.url, ft, "ft")
        env = {**os.environ, **client_env(proc.url), "RAY_USAGE_STATS_ENABLED": "0"}
        inputs = {"local": (str(base), str(ft)), "s3": (f"s3://{BUCKET}/base", f"s3://{BUCKET}/ft")}
        print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; moto_server {proc.url}")
        print(f"pair: {spec.n_params() / 1e6:.0f}M params per checkpoint, BF16, {pair_bytes / 1e6:.0f} MB of "
              f"safetensors (base + ft), shards <= {args.shard_mb} MiB; --method {args.method}")
        print(f"load before: {uptime()}", flush=True)
        walls: dict[tuple[str, str], list[float]] = {c: [] for c in CONFIGS}
        rates: dict[tuple[str, str], list[float]] = {c: [] for c in CONFIGS}
        reference: dict[str, str] | None = None
        for rnd in range(args.rounds):
            for source, executor in (CONFIGS if rnd % 2 == 0 else tuple(reversed(CONFIGS))):
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                b, f = inputs[source]
                flags = ["--in-process"] if executor == "in-process" else ["--executor", "ray", "--workers", "2"]
                cmd = [sys.executable, "-m", "dgrepair", "repair", "--base", b, "--ft", f, "--out", str(out),
                       "--no-progress", "--method", args.method, *flags]
                wall, got = timed_repair(cmd, env, out, reference, f"{source} {executor}")
                reference = reference or got
                summary = json.loads((out / "dgrepair" / "summary.json").read_text())
                nodes = summary["executor"].get("per_node", {})
                rate = (sum(n["bytes_read"] for n in nodes.values()) / sum(n["seconds"] for n in nodes.values())
                        if nodes else pair_bytes / wall)
                walls[(source, executor)].append(wall)
                rates[(source, executor)].append(rate)
                print(f"round {rnd} {source:5s} {executor:10s}: wall {wall:6.1f} s, "
                      f"{'per worker' if nodes else 'pair bytes / wall'} {rate / 1e6:6.1f} MB/s", flush=True)
        shutil.rmtree(work / "out", ignore_errors=True)
        print(f"load after: {uptime()}")
        print(f"\n| input | executor | wall (median of {args.rounds}) | MB/s (median) | rate is |")
        print("|---|---|---|---|---|")
        for c in CONFIGS:
            what = "per worker: bytes_read / unit seconds" if c[1] != "in-process" else "pair bytes / wall"
            print(f"| {c[0]} | {c[1]} | {statistics.median(walls[c]):.1f} s | "
                  f"{statistics.median(rates[c]) / 1e6:.1f} | {what} |")
        for executor in ("in-process", "workers 2"):
            ratio = statistics.median(walls[("s3", executor)]) / statistics.median(walls[("local", executor)])
            print(f"s3 / local wall, {executor}: {ratio:.2f}")
    finally:
        stop_moto(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
