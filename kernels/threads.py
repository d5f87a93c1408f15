"""Thread policy for CPU spectral work: output bytes that do not depend on the thread count.

A threaded BLAS call splits its sums by the number of threads it gets: on an AVX2 machine
(OpenBLAS's Haswell kernels) `ssyrk` and `sgemm` with 2 threads give float32 results that differ
from 1 thread in the last bits (measured at 4096x1000: up to 1e-4 on a Gram of entries ~4e3), and
those bits reach the output as other BF16 roundings. So every BLAS call here runs on one BLAS
thread, and the cores are used by splitting a matrix into pieces whose shapes depend only on the
matrix (linalg.py: Gram tiles, projection row blocks) and running up to `threads` of them at once
in a thread pool (numpy's matmul releases the GIL). Each piece is one single-threaded call of a
fixed shape, so the bytes are the same on 1, 2 or 16 threads, in-process or on Ray.

Torch's own pool is held at 1 thread for the duration: alternating between two spinning pools is
slow on a small machine (bench/blas_threads.py: 11.4 ms vs 4.3 ms per alternation on 2 cores).
`threads_per_worker` splits the cores between workers so N workers on N cores do not oversubscribe
(measured collapse: a 6 s SVD took 40-55 s under contention, docs/adr/0004-cpu-spectral-kernels.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    """BLAS and torch at 1 thread each (restored after); yields how many pieces of a matrix may run
    at once (`threads`, default every core this process may use), which callers pass to `run_pieces`."""
    n = threads or available_cores()
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield n
    finally:
        torch.set_num_threads(saved)


def run_pieces(pieces: Sequence[Callable[[], None]], threads: int) -> None:
    """Run independent pieces of work (each writes only its own part of an output), up to `threads` at
    once. Which thread runs a piece never changes what it computes, so neither does `threads`."""
    if threads <= 1 or len(pieces) <= 1:
        for piece in pieces:
            piece()
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(pieces))) as pool:
        for done in [pool.submit(piece) for piece in pieces]:
            done.result()
