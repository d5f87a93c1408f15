"""Connect to Ray: join a cluster (`address` / RAY_ADDRESS) or start an embedded local one.

Joining follows Ray's own authentication conventions. RAY_AUTH_MODE, when set, is obeyed as it is.
When it is unset and a token is available (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token),
the driver uses token mode, which is the rule `ray start` applies; `ray.init(address=...)` alone does
not, which is why a job on a token cluster used to fail with "RAY_AUTH_MODE is currently
'disabled'". A failed handshake is one message saying exactly what to export (exit 2, no traceback).

The embedded cluster binds loopback only (127.0.0.1: GCS, raylet, agents and workers), runs no
dashboard, and keeps Ray's default token authentication (the token is written under ~/.ray by Ray
itself). An already initialised Ray (tests, a `ray job` entry point that called ray.init) is used
as it is and left running.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import ray

from ..engine.errors import InputError
from ..kernels.threads import available_cores

LOCAL_OBJECT_STORE_BYTES = 128 << 20  # only small records travel through the object store
LOOPBACK = "127.0.0.1"
TOKEN_HINT = ("export RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN=<token> (or "
              "RAY_AUTH_TOKEN_PATH=<file>); `ray get-auth-token` on the head prints it")


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return Path(path).expanduser().is_file()


def _enable_token_mode() -> None:
    """What Ray itself does when `ray start` finds a token: token mode for this process and its children."""
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray caches its config; refresh it as Ray's own _enable_token_auth does
        from ray._raylet import Config
    except ImportError:
        return
    Config.initialize("")


def handshake_message(target: str, exc: BaseException) -> str:
    """The one message a failed handshake prints: what went wrong, this side's auth state, what to export."""
    mode = os.environ.get("RAY_AUTH_MODE")
    first = str(getattr(exc, "message", None) or exc).strip().split("\n")[0].rstrip(".")
    if mode == "token":
        state = "RAY_AUTH_MODE is 'token' here and " + (
            "a token is set, so it may not be the cluster's" if _token_available() else "no token was found")
    else:
        state = (f"RAY_AUTH_MODE is {mode!r} here" if mode else "RAY_AUTH_MODE is unset here and no token was found")
    return (f"Ray cluster {target}: handshake failed ({first}). Either the address is wrong or unreachable, or "
            f"the cluster uses token authentication and {state}. For a cluster with token authentication, "
            f"{TOKEN_HINT}; under `ray job submit` the head's environment must hold them too (deploy/README.md, "
            "Authentication).")


def join_cluster(target: str) -> None:
    """ray.init(address=target) with Ray's `ray start` rule for the auth mode; a failed handshake is an
    InputError with the exact variables to export."""
    if "RAY_AUTH_MODE" not in os.environ and _token_available():
        _enable_token_mode()  # a token at hand means token mode, as `ray start` decides
    loopback = target.split("://")[-1].rsplit(":", 1)[0] in (LOOPBACK, "localhost")
    try:
        with loopback_only() if loopback else nullcontext():  # a head bound to 127.0.0.1 stays 127.0.0.1
            ray.init(address=target, logging_level="ERROR", log_to_driver=True)
    except (ConnectionError, TimeoutError, ray.exceptions.AuthenticationError) as exc:
        ray.shutdown()
        raise InputError(handshake_message(target, exc)) from None
    except RuntimeError as exc:  # Ray's "token authentication is enabled but no token was found"
        ray.shutdown()
        if "token" not in str(exc).lower():
            raise
        raise InputError(handshake_message(target, exc)) from None


@contextmanager
def loopback_only() -> Iterator[None]:
    """ray.init turns a 127.0.0.1 node address into the host's network address unless Ray treats
    the machine as a single-node host (its behaviour on macOS and Windows). Only for the duration
    of the embedded start, take that path: every server then binds 127.0.0.1."""
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # another Ray: tests/test_speaking_runs.py will say
        yield
        return
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def local_cpus(workers: int) -> int:
    """The CPUs the embedded local Ray offers: every core, or more if more workers were asked for."""
    return max(available_cores(), workers or 0)


def start_local(workers: int) -> None:
    with loopback_only():
        ray.init(address="local", num_cpus=local_cpus(workers), include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, _node_ip_address=LOOPBACK,
                 logging_level="ERROR", log_to_driver=True)


@contextmanager
def ray_session(address: str | None, workers: int, say: Callable[[str], None] = lambda _: None
                ) -> Iterator[dict[str, Any]]:
    """Ray for one run: join the cluster at `address` (ClusterOptions.cluster_to_join), or start an
    embedded local one when it is None; `say` gets a start-up line before the (seconds-long) start."""
    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if address:
            say(f"connecting to Ray cluster {address} ...")
            join_cluster(address)
        else:
            say(f"starting a local Ray on {LOOPBACK} (loopback only; takes a few seconds) ...")
            start_local(workers)
        started = True
    try:
        ctx = ray.get_runtime_context()
        yield {"address": getattr(ctx, "gcs_address", None) or "local", "resources": ray.cluster_resources(),
               "started_here": started}
    finally:
        if started:
            ray.shutdown()
