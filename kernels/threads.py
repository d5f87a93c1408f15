"""Thread policy for CPU spectral work.

Two thread pools live in one process: torch's OpenMP pool and scipy's OpenBLAS pool. On a small
machine, alternating between them is slow because the idle pool's threads spin while the other
works (bench/blas_threads.py: 11.4 ms vs 4.3 ms per alternation on 2 cores). So CPU kernels
run all heavy linear algebra in the BLAS pool with `threads` threads and keep torch at 1 thread for
the duration; `threads_per_worker` splits the cores between workers so N workers on N cores do not
oversubscribe (measured collapse: a 6 s SVD took 40–55 s under contention, docs/adr/0004-cpu-spectral-kernels.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    return max(1, (cores or available_cores()) // max(1, workers))


@contextmanager
def cpu_thread_policy(threads: int | None = None) -> Iterator[int]:
    """BLAS gets `threads` (default: every core this process may use); torch gets 1; restored after."""
    n = threads or available_cores()
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=n, user_api="blas"):
            yield n
    finally:
        torch.set_num_threads(saved)
