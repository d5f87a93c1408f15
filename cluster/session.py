"""Connect to Ray: join a cluster (`address` / RAY_ADDRESS) or start an embedded local one.

The embedded cluster binds loopback only, runs no dashboard, and keeps Ray 2.60's default token
authentication (the token is written under ~/.ray by Ray itself). An already initialised Ray
(tests, a `ray job` entrypoint that called ray.init) is used as it is and left running.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

from ..kernels.threads import available_cores

LOCAL_OBJECT_STORE_BYTES = 128 << 20  # only small records travel through the object store


@contextmanager
def ray_session(address: str | None, workers: int) -> Iterator[dict[str, Any]]:
    started = False
    if not ray.is_initialized():
        target = address or os.environ.get("RAY_ADDRESS")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if target:
            ray.init(address=target, logging_level="ERROR", log_to_driver=True)
        else:
            ray.init(address="local", num_cpus=max(available_cores(), workers or 0), include_dashboard=False,
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1",
                     logging_level="ERROR", log_to_driver=True)
        started = True
    try:
        ctx = ray.get_runtime_context()
        yield {"address": getattr(ctx, "gcs_address", None) or "local", "resources": ray.cluster_resources(),
               "started_here": started}
    finally:
        if started:
            ray.shutdown()
