"""Why the CPU kernels pin threads: two measurements behind docs/adr/0004 (prints, asserts nothing).

1. Alternating a torch op (OpenMP pool) with a scipy LAPACK call (OpenBLAS pool), with both pools at
   their defaults versus under dgrepair's cpu_thread_policy.
2. LAPACK eigenvalues (`syev`) and the tridiagonalisation (`sytrd`) with 1 versus 2 BLAS threads.
3. The float64 Gram (`syrk`) of a 7168x2048 expert matrix with 1 and 2 threads, and its GFLOP/s:
   the floor under any float64 Gram-based kernel at that shape.
4. The float32 Gram as the kernels build it (fixed-shape tiles, one BLAS thread per tile, up to
   `threads` tiles at once: docs/adr/0016) against one threaded `ssyrk`, on 1 and 2 threads, and
   whether each gives the same bits on 1 and 2 threads.

    python bench/blas_threads.py
"""

from __future__ import annotations

import os
import time

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import blas, lapack
from threadpoolctl import threadpool_limits

from dgrepair.kernels import linalg
from dgrepair.kernels.threads import cpu_thread_policy


def best(fn, repeats: int = 3) -> float:
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def main() -> None:
    print(f"cores {os.cpu_count()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    rng = np.random.default_rng(0)
    g = rng.standard_normal((1024, 256))
    g = np.asfortranarray(g.T @ g)
    a = torch.randn(1024, 256, dtype=torch.float64)

    def alternate() -> None:
        for _ in range(20):
            _ = a.T @ a
            scipy.linalg.eigh(g, driver="evr", subset_by_index=[252, 255])

    print(f"alternating torch matmul + scipy eigh (256): defaults {best(alternate) / 20 * 1e3:.1f} ms/iter; ", end="")
    with cpu_thread_policy():
        print(f"under cpu_thread_policy {best(alternate) / 20 * 1e3:.1f} ms/iter")
    for p in (256, 1024, 2048):
        x = np.asfortranarray(rng.standard_normal((p, 3 * p)))
        gram = blas.dsyrk(1.0, x, lower=1)
        lwork = int(lapack.dsytrd_lwork(p, lower=1)[0])
        row = []
        for threads in (1, 2):
            with threadpool_limits(threads, user_api="blas"):
                ev = best(lambda m=gram: scipy.linalg.eigh(m, lower=True, eigvals_only=True, driver="ev",
                                                           check_finite=False))
                trd = best(lambda m=gram, w=lwork: lapack.dsytrd(m, lower=1, lwork=w))
            row.append(f"{threads} thread(s): syev {ev:.3f} s, sytrd {trd:.3f} s")
        print(f"p={p}: " + "; ".join(row))
    expert = np.asfortranarray(rng.standard_normal((2048, 7168)))  # F (2048, 7168): syrk gives 2048x2048
    flops = 7168 * 2048 * 2048  # syrk: half of the 2mnp of a full product
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):
            t = best(lambda x=expert: blas.dsyrk(1.0, x, lower=1))
        print(f"float64 syrk of a 7168x2048 delta, {threads} thread(s): {t:.3f} s ({flops / t / 1e9:.0f} GFLOP/s)")
    for rows, p in ((7168, 2048), (8192, 4096), (5632, 2048)):
        w = torch.from_numpy(rng.standard_normal((rows, p)).astype(np.float32))
        times, bits = [], {}
        for threads in (1, 2):
            with threadpool_limits(threads, user_api="blas"):
                x = w.numpy().T  # Fortran-ordered (p, rows): what ssyrk reads without a copy
                syrk = best(lambda x=x: blas.ssyrk(1.0, x, lower=1), repeats=2)
                bits[("ssyrk", threads)] = np.tril(blas.ssyrk(1.0, x, lower=1)).tobytes()
            with cpu_thread_policy(threads) as n:
                tiles = best(lambda n=n, w=w: linalg.gram(w, torch.float32, torch.device("cpu"), 1 << 24, threads=n),
                             repeats=2)
                bits[("tiles", threads)] = np.tril(linalg.gram(w, torch.float32, torch.device("cpu"), 1 << 24,
                                                               threads=n).numpy()).tobytes()
            times.append(f"{threads} thread(s): ssyrk {syrk:.3f} s, tiles {tiles:.3f} s")
        same = {k: bits[(k, 1)] == bits[(k, 2)] for k in ("ssyrk", "tiles")}
        print(f"float32 Gram {rows}x{p}: " + "; ".join(times)
              + f"; same bits on 1 and 2 threads: ssyrk {same['ssyrk']}, tiles {same['tiles']}")


if __name__ == "__main__":
    main()
