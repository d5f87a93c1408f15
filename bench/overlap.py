"""`--overlap` against `--no-overlap` (the default): same pair, same executor, alternating, one sitting.

With overlap a worker reads the next unit and writes the previous one while a unit computes
(engine/run/pipeline.py). Two inputs:

- `--pair DIR` (DIR/base and DIR/ft, read in place, never written): local files, warm in the page
  cache after the first run (e.g. an 8-layer TinyLlama-shaped BF16 pair from bench/vs_paper.py);
- `--s3`: a synthetic TinyLlama-shaped BF16 pair (`--s3-layers`, `--s3-vocab`) uploaded to a moto
  server started here on 127.0.0.1 (the tests' fixture, stopped by its PID), where reads are slow.

Every run is `dgrepair repair` in a fresh process to a fresh local --out under a temporary folder;
on and off alternate inside each round (order reversed every other round) for each executor
(`--executors in-process ray`; ray = the embedded Ray with one worker per core). Every output is
checked byte for byte against the first run's. Printed: the load average before and after, each
run's wall (and an in-process run's peak RSS, from bench/repair_memory.py's one-child wrapper), and
per executor the median wall of on and off, their ratio, and the highest peak RSS of each.

    python bench/overlap.py --pair bench/_work/vs_paper_L8 --rounds 3
    python bench/overlap.py --s3 --s3-layers 2 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
from repair_memory import measure  # noqa: E402 - wall and peak RSS of one command
from s3_repair import digests, timed_repair, uptime  # noqa: E402 - the same run-and-check as the S3 bench

BUCKET = "bench"


def s3_pair(work: Path, layers: int, vocab: int) -> tuple[tuple[str, str], dict[str, str], object]:
    """Write a synthetic pair, upload it to a fresh loopback moto server; (inputs, env, server)."""
    import boto3
    from s3server import REGION, client_env, start_moto

    from dgrepair.engine.demo.synthetic import tinyllama_spec, write_pair

    spec = tinyllama_spec(layers, vocab=vocab, shard_bytes=128 << 20)
    base, ft = write_pair(work / "pair", spec)
    proc = start_moto(work)
    s3 = boto3.client("s3", endpoint_url=proc.url, region_name=REGION, aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    for side, folder in (("base", base), ("ft", ft)):
        for f in sorted(folder.iterdir()):
            s3.upload_file(str(f), BUCKET, f"{side}/{f.name}")
    print(f"s3 pair: {spec.n_params() / 1e6:.0f}M params per checkpoint, BF16, on moto_server {proc.url}")
    return (f"s3://{BUCKET}/base", f"s3://{BUCKET}/ft"), client_env(proc.url), proc


def series(label: str, inputs: tuple[str, str], env: dict[str, str], executors: list[str], rounds: int,
           work: Path) -> None:
    configs = [(ex, mode) for ex in executors for mode in ("on", "off")]
    walls: dict[tuple[str, str], list[float]] = {c: [] for c in configs}
    peaks: dict[tuple[str, str], list[float]] = {c: [] for c in configs}
    reference: dict[str, str] | None = None
    print(f"\n[{label}] load before: {uptime()}", flush=True)
    for rnd in range(rounds):
        for executor, mode in (configs if rnd % 2 == 0 else list(reversed(configs))):
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "dgrepair", "repair", "--base", inputs[0], "--ft", inputs[1], "--out",
                   str(out), "--no-progress",
                   *(["--in-process"] if executor == "in-process" else ["--executor", "ray"]),
                   "--overlap" if mode == "on" else "--no-overlap"]
            what = f"{label} {executor} overlap {mode}"
            if executor == "in-process":  # one process: its peak RSS is the worker's
                wall, peak = measure(cmd)
                got = digests(out)
                if reference is not None and got != reference:
                    sys.exit(f"{what}: output bytes differ from the first run's")
                peaks[(executor, mode)].append(peak)
            else:
                wall, got = timed_repair(cmd, env, out, reference, what)
            reference = reference or got
            walls[(executor, mode)].append(wall)
            rss = f", peak RSS {peaks[(executor, mode)][-1]:.2f} GiB" if executor == "in-process" else ""
            print(f"[{label}] round {rnd} {executor:10s} overlap {mode:3s}: {wall:6.1f} s{rss}", flush=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    print(f"[{label}] load after: {uptime()}")
    print(f"\n| input | executor | overlap on (median of {rounds}) | off | off / on | peak RSS on / off |")
    print("|---|---|---|---|---|---|")
    for executor in executors:
        on, off = (statistics.median(walls[(executor, m)]) for m in ("on", "off"))
        rss = (f"{max(peaks[(executor, 'on')]):.2f} / {max(peaks[(executor, 'off')]):.2f} GiB"
               if executor == "in-process" else "-")
        print(f"| {label} | {executor} | {on:.1f} s | {off:.1f} s | {off / on:.2f} | {rss} |")
    print("(all outputs byte-identical)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", help="folder with base/ and ft/ (read in place)")
    ap.add_argument("--s3", action="store_true", help="also run a synthetic pair from a loopback S3 server")
    ap.add_argument("--s3-layers", type=int, default=2)
    ap.add_argument("--s3-vocab", type=int, default=8000)
    ap.add_argument("--executors", nargs="+", default=["in-process", "ray"], choices=["in-process", "ray"])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not args.pair and not args.s3:
        ap.error("give --pair DIR and/or --s3")
    work = Path(tempfile.mkdtemp(prefix="dgrepair-overlap-"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    try:
        if args.pair:
            pair = Path(args.pair)
            series(f"local {pair.name}", (str(pair / "base"), str(pair / "ft")), env, args.executors, args.rounds,
                   work)
        if args.s3:
            from s3server import stop_moto

            inputs, s3_env, proc = s3_pair(work, args.s3_layers, args.s3_vocab)
            os.environ.update(s3_env)  # the in-process runs' wrapper inherits this process's environment
            try:
                series("s3 (loopback moto)", inputs, {**env, **s3_env}, args.executors, args.rounds, work)
            finally:
                stop_moto(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
