"""Shared fixtures: synthetic data and real Zarr stores on disk."""

from __future__ import annotations

import os
import signal
from collections import Counter

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore, WrapperStore

# one BLAS thread per process: the test machine has 2 cores and Dask runs threads
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The Ctrl-C tests send SIGINT to daskem processes they start. A test run started in the background of a
# non-interactive shell (`pytest &`) ignores SIGINT, and its children would inherit that and never stop;
# a Python handler here is reset to the default in every child instead.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# A test run stopped by SIGTERM (a CI timeout, `kill`, `pkill`) would die at once, without its `finally`
# blocks and fixture teardowns: the scheduler, worker and job processes those tests started (each in a
# session of its own) would keep running. Stopped as by Ctrl-C, the run tears them down first.
def _stop_as_by_ctrl_c(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _stop_as_by_ctrl_c)

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]


def make_blobs(n: int = 6000, d: int = 4, k: int = 3, seed: int = 0, offset: float = 0.0) -> np.ndarray:
    """Well separated Gaussian blobs with different shapes and sizes."""
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(n, np.linspace(1, 2, k) / np.linspace(1, 2, k).sum())
    parts = []
    for j, m in enumerate(sizes):
        a = rng.normal(size=(d, d)) * 0.4 + np.eye(d) * (0.5 + j * 0.3)
        parts.append(rng.normal(size=(m, d)) @ a.T + rng.normal(scale=4.0, size=d))
    X = np.concatenate(parts) + offset
    return X[rng.permutation(n)]


@pytest.fixture
def blobs() -> np.ndarray:
    return make_blobs()


def write_zarr(path, X: np.ndarray, chunk_rows: int) -> str:
    z = zarr.create_array(LocalStore(str(path)), shape=X.shape, chunks=(chunk_rows, X.shape[1]), dtype=X.dtype)
    z[:] = X
    return str(path)


class CountingStore(WrapperStore):
    """A real Zarr store that counts every read of every key."""

    def __init__(self, store):
        super().__init__(store)
        self.reads: Counter = Counter()

    async def get(self, key, prototype, byte_range=None):
        self.reads[key] += 1
        return await self._store.get(key, prototype, byte_range)


def sklearn_init(X: np.ndarray, k: int, covariance_type: str, seed: int = 1) -> dict:
    """Initial parameters taken from one scikit-learn EM step (shared by both fits)."""
    import warnings

    from sklearn.mixture import GaussianMixture

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = GaussianMixture(k, covariance_type=covariance_type, max_iter=1, random_state=seed).fit(X)
    return {"weights_init": g.weights_, "means_init": g.means_, "precisions_init": g.precisions_}
