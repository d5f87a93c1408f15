"""Helpers for the Ray tests: a driver running in a background thread, stopped mid-unit on cue."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

SLOW_TENSOR = "model.layers.0.mlp.experts.down_proj"


def start_driver_with_a_slow_unit(config, marker: Path, monkeypatch, seconds: int, timeout: float = 90.0
                                  ) -> tuple[threading.Thread, dict[str, Any], int, str]:
    """Run the Ray driver in a thread with the SLOW_TENSOR unit sleeping on its first attempt; return
    once that unit is asleep, with (thread, result holder, actor index, node id) of the sleeper."""
    from dgrepair.cluster.driver import run_distributed

    monkeypatch.setenv("DGREPAIR_FAULT_SLEEP_ON", f"{SLOW_TENSOR}:{seconds}:{marker}")
    result: dict[str, Any] = {}
    driver = threading.Thread(target=lambda: result.update(summary=run_distributed(config)))
    driver.start()
    deadline = time.monotonic() + timeout
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the slow unit never started"
    time.sleep(0.3)  # the marker is written just before the sleep starts
    index, node_id = marker.read_text().split()
    return driver, result, int(index), node_id
