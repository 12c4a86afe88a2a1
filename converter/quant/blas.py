"""The BLAS thread count of numpy's OpenBLAS, set for a stretch of code (what threadpoolctl does, for the one
library numpy wheels ship). The converter runs its LAPACK factorizations (inverse, Cholesky, eigenvectors:
level-2-bound at these sizes, slower with more threads, and much slower when another process shares the
cores) and its python-threaded calibration passes on one BLAS thread, its large GEMMs on all of them.
Without a known OpenBLAS (another BLAS, another platform) the setting is left alone."""
from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

# setter and getter symbols, newest first: the scipy-openblas wheels numpy ships, then plain OpenBLAS builds
_SYMBOLS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
            ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
            ("openblas_set_num_threads", "openblas_get_num_threads"))


def _loaded_openblas() -> list[str]:
    """Paths of the OpenBLAS libraries mapped into this process (Linux), else those beside numpy."""
    paths: list[str] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if "openblas" in os.path.basename(path).lower() and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    if not paths:
        base = os.path.dirname(np.__file__)
        paths = sorted(glob.glob(os.path.join(base, "..", "numpy.libs", "*openblas*")) +
                       glob.glob(os.path.join(base, ".dylibs", "*openblas*")))
    return paths


@lru_cache(maxsize=1)
def _controls() -> tuple | None:
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _SYMBOLS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                setter, getter = getattr(lib, set_name), getattr(lib, get_name)
                setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                return setter, getter
    return None


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """numpy's OpenBLAS on `n` threads inside the block (process-wide), the previous count restored after."""
    c = _controls()
    if c is None:
        yield
        return
    setter, getter = c
    prev = int(getter())
    if prev == n:
        yield
        return
    setter(n)
    try:
        yield
    finally:
        setter(prev)


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
