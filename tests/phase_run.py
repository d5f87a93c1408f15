"""`python tests/phase_run.py PHASE MARKER dgrepair-args...`: the real CLI, paused in one phase.

When the run reaches PHASE it creates the file MARKER and sleeps, so a test can send a real signal
to a real process at a known point. Phases: planning (plan built, before the lock), startup (Ray
is starting), dispatch (some units committed, others still to run), finalising (index written,
summary.json not yet).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def pause(marker: Path) -> None:
    marker.write_text("reached\n")
    time.sleep(120)


def main() -> int:
    phase, marker, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    from dgrepair.cli import main as cli_main
    from dgrepair.engine import output, runner

    if phase == "planning":
        real_plan = runner.build_plan

        def plan_then_pause(*a, **k):
            result = real_plan(*a, **k)
            pause(marker)
            return result

        runner.build_plan = plan_then_pause
    elif phase == "startup":
        import ray

        real_init = ray.init

        def init_after_marker(*a, **k):
            marker.write_text("reached\n")
            return real_init(*a, **k)

        ray.init = init_after_marker
    elif phase == "dispatch":
        from dgrepair.cluster import driver

        real_collect, real_execute = driver._collect, runner.execute_unit
        seen = {"n": 0}

        def later(n: int) -> None:
            seen["n"] += 1
            if seen["n"] == n:
                pause(marker)

        def collect(*a, **k):
            real_collect(*a, **k)
            later(3)

        def execute(*a, **k):
            later(4)
            return real_execute(*a, **k)

        driver._collect, runner.execute_unit = collect, execute
    elif phase == "finalising":
        real_write = output.write_json_atomic

        def write(path, obj):
            if Path(path).name == output.SUMMARY_FILE:
                pause(marker)
            real_write(path, obj)

        output.write_json_atomic = write
    else:
        raise SystemExit(f"unknown phase {phase}")
    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
