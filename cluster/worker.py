"""The Ray worker actor: executes work units with the engine's repair step, reading and writing
shared storage itself (only paths and small records cross Ray, never tensor data). With an
object-store output it also stages the shards it owns on its node's scratch and uploads them.

Fault-injection hooks for tests (environment variables, forwarded to actors by the driver):
- `DGREPAIR_FAULT_CRASH_ON=<tensor name>`: the actor process exits abruptly (`os._exit`) when a
  unit containing that tensor starts, every time (a poison tensor).
- `DGREPAIR_FAULT_SLEEP_ON=<tensor name>:<seconds>:<marker file>`: the first time (the marker file
  does not exist yet) a unit containing that tensor starts, the actor writes "<index> <node id>" into
  the marker file and sleeps, so a test can kill the actor or its node mid-unit.
- `DGREPAIR_FAULT_UNIT_DELAY=<seconds>`: every unit sleeps that long first (slows a run down so a
  test can kill the driver part-way).
- The pipeline's trace and slow-phase hooks (engine/run/pipeline.py, `HOOK_ENV`).

With overlap an actor runs two units at once (`max_concurrency=2` for `run`), one in the kernels at a
time (the pipeline's ComputeGate), so the next unit's reads and the previous unit's writes happen while a
unit computes. Shard staging, publishing and the restart ping have their own threads ("control"), so
they never wait behind two running units.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import ExitStack
from pathlib import Path

import ray

from ..engine.output.bucket import PublishResult, publish_shard
from ..engine.output.shards import open_partial
from ..engine.run.jobs import EntryJob, StepSettings
from ..engine.run.pipeline import HOOK_ENV, ComputeGate, Hooks
from ..engine.run.unit_result import Step, UnitResult, run_unit
from ..kernels.threads import cpu_thread_policy

FAULT_ENV = ("DGREPAIR_FAULT_CRASH_ON", "DGREPAIR_FAULT_SLEEP_ON", "DGREPAIR_FAULT_UNIT_DELAY", *HOOK_ENV)
CONTROL = "control"  # the concurrency group of everything but `run`


def actor_name(plan_id: str, index: int) -> str:
    return f"dgrepair-{plan_id}-worker-{index}"


def node_label() -> str:
    """This process's node as the summary's per-node totals name it: host/Ray node id."""
    return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:8]}"


@ray.remote(max_restarts=-1, max_task_retries=0, concurrency_groups={CONTROL: 2})
class RepairWorker:
    """One per GPU (num_gpus=1) or one per CPU slot, for one phase; retries belong to the driver."""

    def __init__(self, step: Step, settings: StepSettings,
                 index: int, writes_output: bool) -> None:
        self.step = step
        self.settings = settings
        self.index = index
        self.writes_output = writes_output
        self.node = node_label()
        self.gate = ComputeGate(Hooks.from_env())
        # Thread limits are process-wide: set once for the actor's life, not per unit (two units overlap).
        self._policy = ExitStack()
        if settings.device == "cpu":
            self._policy.enter_context(cpu_thread_policy(settings.threads))

    @ray.method(concurrency_group=CONTROL)
    def ping(self) -> bool:
        """Answers once the actor is up again after a restart: the driver sends it no unit before then."""
        return True

    @ray.method(concurrency_group=CONTROL)
    def open_shard(self, staging: str, shard: str, prefix: bytes, size: int) -> None:
        """Object-store output: preallocate this worker's staged copy of a shard it owns (the driver passes
        this call's result to the shard's units, so Ray runs them only after it)."""
        open_partial(Path(staging), shard, prefix, size)

    @ray.method(concurrency_group=CONTROL)
    def publish(self, staging: str, out_uri: str, shard: str, checks: list[tuple[int, int, str]],
                plan_id: str) -> PublishResult:
        """Object-store output: verify the staged shard, upload it whole, free the scratch."""
        return publish_shard(staging, out_uri, shard, checks, plan_id)

    def run(self, unit_id: int, jobs: list[EntryJob], *after: None) -> UnitResult:  # noqa: ARG002
        """Execute one unit. `after`: results of the `open_shard` calls its shards need (Ray resolves
        them before the call starts); seconds exclude the wait for the kernels' turn."""
        self._faults({j.entry.name for j in jobs})
        return run_unit(self.step, unit_id, jobs, self.settings, self.gate, self.node, self.writes_output)

    def _faults(self, names: set[str]) -> None:
        crash = os.environ.get("DGREPAIR_FAULT_CRASH_ON")
        if crash and crash in names:
            os._exit(17)
        delay = os.environ.get("DGREPAIR_FAULT_UNIT_DELAY")
        if delay:
            time.sleep(float(delay))
        sleep = os.environ.get("DGREPAIR_FAULT_SLEEP_ON")
        if sleep:
            name, seconds, marker = sleep.rsplit(":", 2)
            if name in names and not os.path.exists(marker):
                with open(marker, "w") as fh:
                    fh.write(f"{self.index} {ray.get_runtime_context().get_node_id()}")
                time.sleep(float(seconds))
