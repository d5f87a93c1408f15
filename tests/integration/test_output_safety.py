"""Safe nightly runs: the --out lock, --force, completeness, output OS errors, signals (real processes)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ckpt import tree_digest
from killed_run import kill_after_commits
from pairs import SHARDS

import dgrepair.engine.output.manifest as manifest
import dgrepair.engine.output.parts as parts
import dgrepair.engine.output.shards as output
from dgrepair.cli import main
from dgrepair.engine.output.lock import FileOutputLock, LockHolder

TESTS = Path(__file__).parents[1] / "fixtures"
ROOT = Path(__file__).parents[2]


def args(pair, out: Path, *extra: str, in_process: bool = True) -> list[str]:
    return ["repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", str(out), "--no-progress",
            *(["--in-process"] if in_process else ["--executor", "ray", "--workers", "2"]), *extra]


def repair(pair, out: Path, *extra: str) -> int:
    return main(args(pair, out, *extra))


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(TESTS), "RAY_USAGE_STATS_ENABLED": "0"}


def same_shards(a: Path, b: Path) -> None:
    for shard in SHARDS:
        assert (a / shard).read_bytes() == (b / shard).read_bytes(), shard


def hold_lock(out: Path, plan_id: str) -> subprocess.Popen:
    """Another real process holding the lock on `out` until killed."""
    code = ("import sys, time; from pathlib import Path; "
            "from dgrepair.engine.output.lock import FileOutputLock, LockHolder;"
            f"FileOutputLock(Path({str(out)!r})).acquire(LockHolder.here({plan_id!r})); print('held', flush=True);"
            "time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env())
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One uninterrupted in-process run of the standard pair: the reference bytes."""
    from pairs import make_pair

    root = tmp_path_factory.mktemp("clean")
    pair = make_pair(root)
    assert main(args(pair, root / "out")) == 0
    return root / "out"


# --- the lock --------------------------------------------------------------------------------------------


def test_a_second_run_on_a_locked_out_exits_2_naming_folder_and_holder(pair, tmp_path, capsys):
    out = tmp_path / "out"
    holder = hold_lock(out, "plan-of-the-other-run")
    try:
        assert repair(pair, out) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is locked by another dgrepair run" in err
        assert f"pid {holder.pid} on host {os.uname().nodename}" in err and "plan plan-of-the-other-run" in err
        assert sorted(p.name for p in out.rglob("*")) == ["dgrepair", "lock"]  # nothing else created
        assert repair(pair, out, "--force") == 2  # --force never takes a live lock
        assert "is locked by another dgrepair run" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over_and_said_so(pair, tmp_path, capsys):
    out = tmp_path / "out"
    holder = hold_lock(out, "dead-plan")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert repair(pair, out) == 0
    err = capsys.readouterr().err
    assert f"taking over the lock on {out} left by a run that is no longer running (pid {holder.pid}" in err
    assert (out / "dgrepair" / "lock").read_text() == ""  # released cleanly
    lock = FileOutputLock(out)
    assert lock.acquire(LockHolder.here("x")) is None  # a clean release leaves no holder behind
    lock.release()


def test_the_lock_is_exclusive_between_two_lock_objects(tmp_path):
    first, second = FileOutputLock(tmp_path), FileOutputLock(tmp_path)
    first.acquire(LockHolder("h", 1, "t", "p1"))
    with pytest.raises(Exception, match=r"locked by another dgrepair run \(pid 1 on host h, started t, plan p1"):
        second.acquire(LockHolder("h", 2, "t", "p2"))
    first.release()
    assert second.acquire(LockHolder("h", 2, "t", "p2")) is None
    second.release()


# --- completeness and --force ----------------------------------------------------------------------------


def test_a_summary_of_another_plan_does_not_make_the_output_complete(pair, tmp_path, clean):
    out = tmp_path / "out"
    assert repair(pair, out) == 0
    summary = out / "dgrepair" / "summary.json"
    data = json.loads(summary.read_text())
    plan_id = data["plan_id"]
    summary.write_text(json.dumps({**data, "plan_id": "somebody-else"}))
    (out / SHARDS[0]).write_bytes(b"\0" * (out / SHARDS[0]).stat().st_size)  # damaged behind the summary's back
    assert repair(pair, out) == 0
    assert json.loads(summary.read_text())["plan_id"] == plan_id
    same_shards(out, clean)


def test_manifest_rows_of_another_plan_make_the_output_incomplete(pair, tmp_path):
    out = tmp_path / "out"
    assert repair(pair, out) == 0
    rows = manifest.read_rows(out)
    from dataclasses import replace

    manifest.write_part(out, [replace(rows[0], plan_id="other-plan")])
    plan = json.loads((out / "dgrepair" / "run.json").read_text())["plan_id"]
    from dgrepair.engine.config import RepairConfig
    from dgrepair.engine.run.inputs import load_inputs

    inp = load_inputs(RepairConfig.of(base=str(pair.base), ft=str(pair.ft), out=str(out)))
    assert inp.plan.plan_id == plan
    assert not output.is_complete(out, inp.plan)
    assert repair(pair, out) == 0
    assert output.is_complete(out, inp.plan)


def test_force_replaces_only_what_dgrepair_wrote(pair, tmp_path, capsys):
    out, other = tmp_path / "out", tmp_path / "other"
    assert repair(pair, out) == 0
    (out / "notes.txt").write_text("mine")
    (out / "results").mkdir()
    before = tree_digest(out)
    assert repair(pair, out, "--min-numel", "4096", "--force") == 2
    err = capsys.readouterr().err
    assert "--force replaces only what dgrepair wrote, but 2 entries are not from the previous run: notes.txt, " \
           "results. Move them away" in err
    assert tree_digest(out) == before
    (out / "notes.txt").unlink()
    (out / "results").rmdir()
    assert repair(pair, out, "--min-numel", "4096", "--force") == 0
    assert repair(pair, other, "--min-numel", "4096") == 0
    def names(root: Path) -> set[str]:
        return {n for n in tree_digest(root) if "manifest.parquet" not in n}

    assert names(out) == names(other)  # nothing of the replaced run is left
    same_shards(out, other)


def test_run_json_lists_the_files_the_run_writes(pair, tmp_path):
    out = tmp_path / "out"
    assert repair(pair, out) == 0
    files = json.loads((out / "dgrepair" / "run.json").read_text())["files"]
    on_disk = sorted(p.name for p in out.iterdir() if p.name != "dgrepair")
    assert files == on_disk == sorted([*SHARDS, "model.safetensors.index.json", "config.json", "tokenizer.json",
                                       "chat_template.jinja", "generation_config.json"])


# --- output OS errors ------------------------------------------------------------------------------------


def no_half_written_json(out: Path) -> None:
    for path in out.rglob("*.json"):
        json.loads(path.read_text())
    assert not [p for p in out.rglob("*") if p.name.endswith((".dgrepair-tmp", ".tmp")) or p.name.startswith(".tmp-")]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EIO])
def test_an_output_os_error_exits_2_keeps_the_committed_work_and_resumes(pair, tmp_path, monkeypatch, capsys,
                                                                         clean, code):
    out = tmp_path / "out"
    real, calls = parts.pq.write_table, {"n": 0}

    def failing(table, where, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(where, "wb") as fh:  # a partly written part, as a full disk leaves it
                fh.write(b"PAR1")
            raise OSError(code, os.strerror(code), str(where))
        real(table, where, *a, **k)

    monkeypatch.setattr(parts.pq, "write_table", failing)
    import dgrepair.engine.run.session as runner

    monkeypatch.setattr(runner, "FLUSH_ROWS", 4)
    assert repair(pair, out) == 2
    err = capsys.readouterr().err
    name = errno.errorcode[code]
    assert f"({name}); " in err and "Everything committed so far is kept: once that is fixed, re-run the same " \
                                    "command to resume." in err and "Traceback" not in err
    assert str(out / "dgrepair" / "manifest.parquet") in err
    committed = manifest.read_rows(out)
    assert committed  # the first part survived
    no_half_written_json(out)
    assert not (out / "dgrepair" / "summary.json").exists()
    monkeypatch.undo()
    assert repair(pair, out) == 0
    same_shards(out, clean)
    assert json.loads((out / "dgrepair" / "summary.json").read_text())["resumed_entries"] >= 1


def test_read_only_output_is_refused_before_a_traceback(pair, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def ro_mkdir(self, *a, **k):
        if self == out or out in self.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", ro_mkdir)
    assert repair(pair, out) == 2
    err = capsys.readouterr().err
    assert f"{out / 'dgrepair'}: Read-only file system (EROFS); the filesystem is read-only: remount it " \
           "read-write or choose another --out." in err


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_a_full_disk_on_a_real_tmpfs_exits_2_and_resumes_after_growing_it(pair, tmp_path, clean):
    """A size-limited tmpfs smaller than the output: real ENOSPC from the kernel, then a remount."""
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "160k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        out = mnt / "out"
        done = subprocess.run([sys.executable, "-m", "dgrepair", *args(pair, out)], capture_output=True,
                              text=True, env=env(), timeout=300)
        assert done.returncode == 2, done.stderr
        assert "No space left on device (ENOSPC); the filesystem is full" in done.stderr
        assert "Traceback" not in done.stderr
        no_half_written_json(out)
        assert not (out / "dgrepair" / "summary.json").exists()
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True, timeout=20)
        done = subprocess.run([sys.executable, "-m", "dgrepair", *args(pair, out)], capture_output=True,
                              text=True, env=env(), timeout=300)
        assert done.returncode == 0, done.stderr
        same_shards(out, clean)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, timeout=20)
        other = subprocess.run([sys.executable, "-m", "dgrepair", *args(pair, mnt / "new")], capture_output=True,
                               text=True, env=env(), timeout=300)
        assert other.returncode == 2 and "Read-only file system (EROFS)" in other.stderr, other.stderr
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=20)


# --- signals (real processes, real signals) -----------------------------------------------------------------


def run_until(phase: str, argv: list[str], marker: Path, timeout: float = 180.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(TESTS / "phase_run.py"), phase, str(marker), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"phase {phase} never reached: {proc.communicate()}")
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen, sig: int, group: bool) -> tuple[int, str]:
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def check_stopped(pair, out: Path, clean: Path, code: int, err: str, sig: int) -> None:
    assert code == 128 + sig, err
    assert f"dgrepair: stopped by {signal.Signals(sig).name}; finished work is committed and the output lock " \
           "released. Re-run the same command to resume." in err
    assert "Traceback" not in err
    if out.exists():
        assert not (out / "dgrepair" / "summary.json").exists()
        no_half_written_json(out)
        lock = FileOutputLock(out)
        assert lock.acquire(LockHolder.here("probe")) is None  # released, not left behind
        lock.release()
    assert repair(pair, out) == 0
    same_shards(out, clean)


@pytest.mark.parametrize("phase", ["planning", "dispatch", "finalising"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_in_process_run_stops_cleanly_on_a_signal_in_every_phase(pair, tmp_path, clean, phase, sig):
    out = tmp_path / "out"
    proc = run_until(phase, args(pair, out), tmp_path / "marker")
    code, err = stop(proc, sig, group=False)
    if phase == "dispatch":
        assert len({r.tensor for r in manifest.read_rows(out)}) >= 3  # the finished units were committed
    if phase == "finalising":
        assert (out / "model.safetensors.index.json").exists()  # the index may exist; summary.json marks complete
    check_stopped(pair, out, clean, code, err, sig)


# finalising comes after ray.shutdown, which resets SIGTERM to the default action behind Python's back
RAY_CASES = [("startup", signal.SIGTERM), ("dispatch", signal.SIGTERM), ("finalising", signal.SIGTERM),
             pytest.param("dispatch", signal.SIGINT, marks=pytest.mark.slow),
             pytest.param("startup", signal.SIGINT, marks=pytest.mark.slow),
             pytest.param("planning", signal.SIGTERM, marks=pytest.mark.slow),
             pytest.param("finalising", signal.SIGINT, marks=pytest.mark.slow)]


@pytest.mark.parametrize("phase,sig", RAY_CASES)
def test_ray_driver_stops_cleanly_on_a_signal_to_its_process_group(pair, tmp_path, clean, phase, sig):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    # In dispatch, the actors must run units: on this small pair the head start would run them all.
    extra = ("--no-head-start",) if phase == "dispatch" else ()
    proc = run_until(phase, args(pair, out, *extra, in_process=False), tmp_path / "marker")
    if phase == "startup":
        time.sleep(1.0)  # inside ray.init
    code, err = stop(proc, sig, group=True)
    check_stopped(pair, out, clean, code, err, sig)


def test_a_signal_does_not_wait_for_the_head_start_unit_that_is_still_computing(pair, tmp_path, clean):
    """ADR 0017: the driver's own unit has not begun to write, so the run stops without finishing it
    (here it would take 60 s more), writes none of it after the lock is gone, and resumes to the same bytes."""
    pytest.importorskip("ray")
    out = tmp_path / "out"
    proc = run_until("head-start", args(pair, out, in_process=False), tmp_path / "marker")
    started = time.monotonic()
    code, err = stop(proc, signal.SIGTERM, group=True)
    assert time.monotonic() - started < 45, err  # the unit's 60 s were not waited for
    check_stopped(pair, out, clean, code, err, signal.SIGTERM)


# --- a crash of the default executor ----------------------------------------------------------------------


def test_a_killed_default_run_resumes_to_the_bytes_of_an_uninterrupted_one(pair, tmp_path, clean, capsys,
                                                                           monkeypatch):
    """ADR 0019: on one CPU machine the default runs lanes in one process, so a crash or an out-of-memory
    kill ends the whole run (Ray would retry the unit on a fresh worker). The killed run leaves no
    summary and the other lane's unit unfinished; the same command resumes what was committed and ends
    with the bytes of a run that was never killed."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "out"
    argv = ["repair", "--base", str(pair.base), "--ft", str(pair.ft), "--out", str(out), "--no-progress",
            "--device", "cpu", "--workers", "2", "--threads", "1", "--commit-interval-s", "0"]
    assert kill_after_commits(argv, 3, {k: v for k, v in env().items() if k != "RAY_ADDRESS"}) == -signal.SIGKILL
    assert not (out / "dgrepair" / "summary.json").exists()
    committed = {r.tensor for r in manifest.read_rows(out)}
    assert committed
    assert main(argv) == 0
    err = capsys.readouterr().err
    said = re.search(r"^dgrepair: resuming: (\d+) of (\d+) entries verified on disk, (\d+) to do$", err, re.M)
    assert said, err
    done, total, todo = map(int, said.groups())
    assert done >= len(committed) and todo >= 1 and done + todo == total
    summary = json.loads((out / "dgrepair" / "summary.json").read_text())
    assert summary["executor"]["kind"] == "in-process" and summary["executor"]["lanes"] == 2
    same_shards(out, clean)


# --- the stress test -----------------------------------------------------------------------------------------


FORCED = ("--force", "--min-numel", "4096")  # a different plan that replaces the output when it can


@pytest.fixture(scope="module")
def clean_forced(tmp_path_factory):
    from pairs import make_pair

    root = tmp_path_factory.mktemp("clean-forced")
    pair = make_pair(root)
    assert main(args(pair, root / "out", *FORCED)) == 0
    return root / "out"


def race(pair, root: Path, refs: dict[int, Path], rounds: int, seed: int, max_offset: float = 4.0
         ) -> dict[str, int]:
    """Two runs on one --out, the second started at a random offset (0 to max_offset s; one run takes 3-6 s):
    identical commands in even rounds, the second with `--force` and other options in odd rounds (the
    case that used to corrupt silently). Whichever finishes last must hold exactly the bytes of a clean
    run of its plan; the other exits 0 (found it complete) or 2 (found it locked)."""
    import random

    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    for i in range(rounds):
        out = root / f"race-{i}"
        cmd = [sys.executable, "-m", "dgrepair", *args(pair, out)]
        first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        time.sleep(rng.uniform(0.0, max_offset))
        second = subprocess.Popen([*cmd, *(FORCED if i % 2 else ())], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env())
        results = []
        for proc in (first, second):
            _, err = proc.communicate(timeout=300)
            assert proc.returncode in (0, 2), err
            assert "Traceback" not in err
            if proc.returncode == 2:  # locked; or, rarely, the forced run finished before the plain one looked
                assert "is locked by another dgrepair run" in err or "holds a different dgrepair run" in err, err
            results.append(proc.returncode)
        assert 0 in results
        summary = json.loads((out / "dgrepair" / "summary.json").read_text())
        assert summary["plan_id"] == json.loads((out / "dgrepair" / "run.json").read_text())["plan_id"]
        same_shards(out, refs[summary["config"]["min_numel"]])
        assert not (out / "dgrepair" / "failures.json").exists()
        key = f"{'force' if i % 2 else 'same'}:{results[0]}+{results[1]}:{summary['config']['min_numel']}"
        outcomes[key] = outcomes.get(key, 0) + 1
    print(f"stress: {rounds} rounds, outcomes (kind:first+second exit codes:winner's --min-numel): {outcomes}")
    return outcomes


def test_two_runs_racing_on_one_out_leave_the_clean_bytes(pair, tmp_path, clean, clean_forced):
    race(pair, tmp_path, {1024: clean, 4096: clean_forced}, rounds=4, seed=11, max_offset=1.5)


@pytest.mark.stress
def test_two_runs_racing_on_one_out_many_rounds(pair, tmp_path, clean, clean_forced):
    race(pair, tmp_path, {1024: clean, 4096: clean_forced}, rounds=16, seed=1111)
