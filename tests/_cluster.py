"""Real Dask clusters for tests: ``dask scheduler`` and ``dask worker`` subprocesses.

Plain helper functions (no fixtures): a test starts what it needs and stops it
by pid in a ``finally`` block. Every process started here runs with
``PYTHONPATH`` set to this repository, so workers import this copy of daskem.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def repo_env(**extra: str) -> dict[str, str]:
    """The environment for subprocesses: this repository first on ``PYTHONPATH``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    # one BLAS thread per process: one-thread workers on a small machine
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    # a busy shared machine: give the cluster time rather than failing on timeouts
    env.setdefault("DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT", "60s")
    return env


def _dask_cli() -> list[str]:
    # the `dask` console script of this interpreter; `python -m dask` is the same program
    return [sys.executable, "-m", "dask"]


@dataclass
class Cluster:
    """A scheduler and its workers, all subprocesses started by this test."""

    workdir: Path
    scheduler: subprocess.Popen
    address: str
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: list = field(default_factory=list)

    def worker_pids(self, name: str) -> list[int]:
        """The pids of a worker: the ``dask worker`` process and its children (nanny's worker)."""
        p = self.workers[name]
        try:
            proc = psutil.Process(p.pid)
            return [p.pid] + [c.pid for c in proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def compute_pid(self, name: str) -> int:
        """The pid of the process that runs the tasks (the nanny's child, if any)."""
        pids = self.worker_pids(name)
        return pids[-1] if pids else -1


def start_scheduler(workdir: Path, timeout: float = 60.0) -> Cluster:
    """Start ``dask scheduler`` on localhost; returns once its address is known."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sfile = workdir / "scheduler.json"
    log = open(workdir / "scheduler.log", "wb")
    proc = subprocess.Popen(
        [
            *_dask_cli(),
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(sfile),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=repo_env(),
        cwd=workdir,
    )
    cluster = Cluster(workdir, proc, "", logs=[log])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stop(cluster)
            raise RuntimeError(f"dask scheduler exited: {(workdir / 'scheduler.log').read_text()}")
        if sfile.exists():
            with contextlib.suppress(json.JSONDecodeError):
                cluster.address = json.loads(sfile.read_text())["address"]
                return cluster
        time.sleep(0.1)
    stop(cluster)
    raise RuntimeError("dask scheduler did not start in time")


def start_worker(
    cluster: Cluster,
    name: str,
    *,
    memory_limit: str = "1GB",
    nanny: bool = True,
) -> subprocess.Popen:
    """Start one ``dask worker`` process (one thread) and register it under ``name``."""
    wdir = cluster.workdir / name
    wdir.mkdir(parents=True, exist_ok=True)
    log = open(cluster.workdir / f"{name}.log", "wb")
    cluster.logs.append(log)
    cmd = [
        *_dask_cli(),
        "worker",
        cluster.address,
        "--nworkers",
        "1",
        "--nthreads",
        "1",
        "--memory-limit",
        str(memory_limit),
        "--no-dashboard",
        "--name",
        name,
        "--local-directory",
        str(wdir),
        "--nanny" if nanny else "--no-nanny",
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=repo_env(), cwd=wdir)
    cluster.workers[name] = proc
    return proc


def wait_for_workers(client, names: set[str], timeout: float = 90.0) -> dict:
    """Wait until workers with exactly these names are connected; returns their info by name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.scheduler_info(n_workers=-1)["workers"]
        by_name = {str(w["name"]): {**w, "address": a} for a, w in info.items()}
        if set(by_name) == set(names):
            return by_name
        time.sleep(0.2)
    raise TimeoutError(f"workers {sorted(names)} did not connect; connected: {sorted(by_name)}")


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to each pid (children first); ignore the ones already gone."""
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop(cluster: Cluster) -> None:
    """Stop every process of the cluster by pid: workers first, then the scheduler."""
    for name in list(cluster.workers):
        pids = cluster.worker_pids(name)
        kill_pids(pids, signal.SIGTERM)
    for name, p in cluster.workers.items():
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            kill_pids(cluster.worker_pids(name))
            p.wait(timeout=10)
    # a nanny's child that outlived its nanny
    for name in cluster.workers:
        kill_pids(cluster.worker_pids(name))
    cluster.scheduler.terminate()
    try:
        cluster.scheduler.wait(timeout=10)
    except subprocess.TimeoutExpired:
        cluster.scheduler.kill()
        cluster.scheduler.wait(timeout=10)
    for log in cluster.logs:
        log.close()


@contextlib.contextmanager
def running_cluster(workdir: Path, workers: dict[str, dict]) -> Iterator[Cluster]:
    """A scheduler and the named workers (``{name: start_worker kwargs}``), stopped on exit."""
    cluster = start_scheduler(workdir)
    try:
        for name, kw in workers.items():
            start_worker(cluster, name, **kw)
        yield cluster
    finally:
        stop(cluster)


class PeakRSS:
    """Sample the resident memory of processes in a thread; keeps the peak of each.

    ``pids`` maps a label to a callable that returns the current pids to sum
    (so a worker's nanny child can be found again after it starts). ``start``
    holds each label's memory when the block began (a test process's own
    memory depends on the tests it ran before).
    """

    def __init__(self, pids: dict, interval: float = 0.05):
        self.pids = pids
        self.interval = interval
        self.peak: dict[str, int] = {k: 0 for k in pids}
        self.start: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[str, int]:
        out = {}
        for label, get in self.pids.items():
            total = 0
            for pid in get():
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    total += psutil.Process(pid).memory_info().rss
            out[label] = total
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            for label, total in self._sample().items():
                self.peak[label] = max(self.peak[label], total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def read_chars(pid: int) -> int:
    """Bytes this process has read through read() calls so far (Linux /proc/PID/io)."""
    return psutil.Process(pid).io_counters().read_chars


# --------------------------------------------------------------------------
# data on disk
# --------------------------------------------------------------------------


def blob_means(k: int, d: int, seed: int = 0, spread: float = 8.0):
    """Well separated component means (deterministic)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.uniform(-spread, spread, size=(k, d))


def write_blob_store(
    path: Path,
    n: int,
    d: int,
    k: int,
    *,
    chunk_rows: int,
    seed: int = 0,
    dtype: str = "float64",
    compressed: bool = True,
    scale: float = 1.0,
) -> str:
    """A Zarr array of ``n`` rows drawn from ``k`` unit-variance blobs, written chunk by chunk.

    Row ``i`` depends only on ``seed`` and its chunk, never on the whole array
    being in memory: stores far larger than RAM can be written this way.
    """
    import numpy as np
    import zarr

    means = blob_means(k, d, seed)
    kwargs = {} if compressed else {"compressors": None}
    z = zarr.create_array(str(path), shape=(n, d), chunks=(chunk_rows, d), dtype=dtype, **kwargs)
    for i, start in enumerate(range(0, n, chunk_rows)):
        stop_ = min(n, start + chunk_rows)
        rng = np.random.default_rng([seed, i])
        lab = rng.integers(k, size=stop_ - start)
        x = rng.standard_normal((stop_ - start, d), dtype=np.float32 if dtype == "float32" else np.float64)
        x *= scale
        x += means[lab].astype(x.dtype)
        z[start:stop_] = x
    return str(path)
