"""Keep BLAS single-threaded inside the chunk kernel, without new dependencies.

The kernel multiplies small row blocks (``block_rows x D`` by ``D x K*D``);
parallelism comes from Dask running several chunks at once. A multi-threaded
BLAS under a multi-threaded Dask scheduler oversubscribes the cores (Dask
threads x BLAS threads > cores), and OpenBLAS's threads spin on such small
products: measured on a loaded 2-core machine, a 4096x16 @ 16x16 product took
7.7 ms with OpenBLAS's 2 threads and 74 us with one.

Dask's worker *processes* (``distributed.Nanny``) already start with
``OPENBLAS_NUM_THREADS=1``. For the threaded scheduler, and any other case, the
kernel calls OpenBLAS's *thread-local* ``openblas_set_num_threads_local``
(OpenBLAS >= 0.3.27, the one numpy ships): only the calling thread changes,
and its previous value is restored on exit. Where that symbol is missing
(another BLAS, an older OpenBLAS, no ``/proc``) this is a no-op; set
``OPENBLAS_NUM_THREADS=1`` (or ``OMP_NUM_THREADS=1``) in the environment then.
Setting ``DASKEM_BLAS_THREADS=keep`` disables it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy  # noqa: F401  (numpy's BLAS must be loaded before it is looked up)

_lock = threading.Lock()
_setters: list[Callable[[int], int]] | None = None


def _find_setters() -> list[Callable[[int], int]]:
    """``openblas_set_num_threads_local`` of every OpenBLAS numpy has loaded."""
    found: list[Callable[[int], int]] = []
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return found
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local64_"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_int]
                found.append(fn)
                break
    return found


def _get_setters() -> list[Callable[[int], int]]:
    global _setters
    if _setters is None:
        with _lock:
            if _setters is None:
                _setters = _find_setters()
    if os.environ.get("DASKEM_BLAS_THREADS") == "keep":
        return []
    return _setters


def blas_limit_available() -> bool:
    """Whether :func:`single_threaded_blas` can act in this process."""
    return bool(_get_setters())


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the body with one BLAS thread in the calling thread only."""
    setters = _get_setters()
    previous = [fn(1) for fn in setters]
    try:
        yield
    finally:
        for fn, prev in zip(setters, previous):
            fn(max(int(prev), 1))


def keep_forked_thread_count() -> None:
    """In a process forked from a thread inside :func:`single_threaded_blas`:
    keep the one BLAS thread it inherited, and make :func:`single_threaded_blas`
    a no-op from now on.

    A forked child inherits the forking thread's thread-local BLAS setting,
    but not OpenBLAS's thread pool (OpenBLAS stops it before a fork). Any call
    of ``openblas_set_num_threads_local`` starts that pool again, and its
    threads spin for about 0.1 s (measured here: 2 forked workers on 2 cores,
    digits-sized products, the first 15 EM iterations 1.5x slower: 0.20 s
    instead of 0.13). Not calling it, the child's calls stay single-threaded
    and start no pool.
    """
    global _setters
    with _lock:
        _setters = []
