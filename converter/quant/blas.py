"""The BLAS thread count for a stretch of code, through threadpoolctl (numpy's OpenBLAS, or whichever BLAS is
loaded). The converter runs its LAPACK factorizations (inverse, Cholesky, eigenvectors: level-2-bound at these
sizes, slower with more threads, and much slower when another process shares the cores) and its
python-threaded calibration passes on one BLAS thread, its large GEMMs on all of them."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache

import numpy as np  # noqa: F401  (numpy's BLAS loaded before the controller looks for it)
from threadpoolctl import ThreadpoolController


@lru_cache(maxsize=1)
def _controller() -> ThreadpoolController:
    return ThreadpoolController()


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """BLAS on `n` threads inside the block (process-wide), the previous count restored after."""
    with _controller().limit(limits=n, user_api="blas"):
        yield


def cpu_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parallel_for(fn: Callable[[int], None], n: int, threads: int | None = None) -> None:
    """fn(0) … fn(n-1) on a pool of python threads (numpy releases the GIL in its loops and BLAS calls), BLAS on
    one thread each meanwhile; in order on the calling thread when one thread is all there is. Each fn(i) must
    write only its own outputs: the results are those of the plain loop."""
    threads = min(cpu_threads() if threads is None else threads, n)
    if threads <= 1:
        for i in range(n):
            fn(i)
        return
    from concurrent.futures import ThreadPoolExecutor

    with blas_threads(1), ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(fn, range(n)):
            pass
