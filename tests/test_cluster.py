"""On a real cluster (``dask scheduler`` and ``dask worker`` subprocesses, stopped by pid):
streaming versus caching, worker loss, and data larger than the workers' memory."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import dask.array as da
import numpy as np
import pytest
import zarr
from _cluster import (
    PeakRSS,
    blob_means,
    kill_pids,
    read_chars,
    running_cluster,
    start_worker,
    wait_for_workers,
    write_blob_store,
)
from distributed import Client

import daskem
from daskem import _engine as engine
from daskem.io import open_array

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _explicit_init(k: int, d: int, seed: int, shift: float = 0.5) -> dict:
    means = blob_means(k, d, seed) + shift
    return dict(
        weights_init=np.full(k, 1.0 / k),
        means_init=means,
        precisions_init=np.broadcast_to(np.eye(d), (k, d, d)).copy(),
    )


def _assert_same_params(a: daskem.GaussianMixture, b: daskem.GaussianMixture, rtol: float = 1e-10) -> None:
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=rtol, atol=0, err_msg=name)
    assert a.n_iter_ == b.n_iter_
    np.testing.assert_allclose(a.history_, b.history_, rtol=1e-12)


# --------------------------------------------------------------------------
# store chunks
# --------------------------------------------------------------------------


def test_small_store_chunks_are_merged_and_big_ones_split(tmp_path):
    small = write_blob_store(tmp_path / "small.zarr", 10_000, 4, 2, chunk_rows=100)
    big = write_blob_store(tmp_path / "big.zarr", 10_000, 4, 2, chunk_rows=10_000)
    row_bytes = 4 * 8
    Xs = open_array(small, chunk_bytes=1_000 * row_bytes)
    # whole store chunks per Dask chunk, about the target size: each task reads 10 store chunks
    assert set(Xs.chunks[0]) == {1_000}
    Xb = open_array(big, chunk_bytes=1_000 * row_bytes)
    # one 10 000-row store chunk split into ten pieces
    assert Xb.chunks[0] == (1_000,) * 10
    ok = open_array(small, chunk_bytes=100 * row_bytes)
    assert set(ok.chunks[0]) == {100}
    ref = zarr.open_array(small, mode="r")[:]
    np.testing.assert_array_equal(Xs.compute(), ref)
    np.testing.assert_array_equal(ok.compute(), ref)
    np.testing.assert_array_equal(Xb.compute(), zarr.open_array(big, mode="r")[:])


# --------------------------------------------------------------------------
# cache: persist once or stream every iteration
# --------------------------------------------------------------------------


def test_cache_false_streams_every_iteration_and_true_reads_once(tmp_path):
    n, d, k, passes = 200_000, 10, 3, 4
    store = write_blob_store(tmp_path / "x.zarr", n, d, k, chunk_rows=20_000, compressed=False)
    nbytes = n * d * 8
    opts = dict(n_components=k, tol=0.0, max_iter=passes, chunk_bytes=20_000 * d * 8, **_explicit_init(k, d, 0))
    with running_cluster(tmp_path / "cluster", {"w0": dict(memory_limit="2GB", nanny=False)}) as cl:
        with Client(cl.address) as client:
            wait_for_workers(client, {"w0"})
            pid = cl.workers["w0"].pid
            read, fits = {}, {}
            for cache in (False, True, "auto"):
                before = read_chars(pid)
                with pytest.warns(daskem.ConvergenceWarning):
                    fits[cache] = daskem.GaussianMixture(cache=cache, **opts).fit(store)
                read[cache] = read_chars(pid) - before
            # "auto" decides with the workers' memory limits: 2 GB holds 16 MB, not 160 GB
            assert engine.prepare_data(open_array(store), "auto")[1] is True
            assert engine.prepare_data(da.zeros((2 * 10**9, 10), chunks=(10**7, 10)), "auto")[1] is False
    assert read[False] >= passes * nbytes
    assert nbytes <= read[True] < 1.5 * nbytes
    assert nbytes <= read["auto"] < 1.5 * nbytes
    _assert_same_params(fits[True], fits[False])
    _assert_same_params(fits["auto"], fits[False])


# --------------------------------------------------------------------------
# worker loss
# --------------------------------------------------------------------------


def _checkpoint_iter(path) -> int:
    import json

    try:
        return max(r["n_iter"] for r in json.loads((path / "checkpoint.json").read_text())["runs"])
    except (FileNotFoundError, ValueError, KeyError):
        return -1


@pytest.mark.parametrize("cache", [False, True], ids=["streamed", "persisted"])
def test_worker_killed_mid_fit_gives_the_undisturbed_result(tmp_path, cache):
    """Streamed: the lost tasks are re-run. Persisted (placed on chosen workers,
    see ``engine._persist``): the lost chunks are read again on the others. The
    persisted passes are short and go straight to the workers (actors,
    ``engine.ACTOR_PASS_SECONDS``): the call to the lost worker fails and that
    pass is made of tasks, which the scheduler recomputes."""
    n, d, k = 300_000, 6, 3
    store = write_blob_store(tmp_path / "x.zarr", n, d, k, chunk_rows=10_000, seed=4)
    opts = dict(
        n_components=k, tol=0.0, max_iter=15, cache=cache, chunk_bytes=10_000 * d * 8, **_explicit_init(k, d, 4)
    )
    workers = {name: dict(memory_limit="1GB", nanny=False) for name in ("w0", "w1")}
    with running_cluster(tmp_path / "cluster", workers) as cl:
        with Client(cl.address) as client:
            before = wait_for_workers(client, {"w0", "w1"})
            with pytest.warns(daskem.ConvergenceWarning):
                ref = daskem.GaussianMixture(**opts).fit(store)

            ckpt = tmp_path / "ckpt"
            event: dict = {}

            def kill_one_worker() -> None:
                deadline = time.monotonic() + 120
                while _checkpoint_iter(ckpt) < 3 and time.monotonic() < deadline:
                    time.sleep(0.01)
                # mid-iteration: wait until the victim has tasks of the current pass
                # (streamed; persisted passes are actor calls, in flight but not tasks)
                victim = before["w1"]["address"]
                tasks = ()
                while cache is False and time.monotonic() < deadline:
                    tasks = client.processing(workers=[victim]).get(victim) or ()
                    if tasks:
                        break
                    time.sleep(0.005)
                event["at_iter"] = _checkpoint_iter(ckpt)
                event["tasks"] = len(tasks)  # what the victim held when it was chosen
                kill_pids([cl.workers["w1"].pid], signal.SIGKILL)
                event["killed"] = cl.workers["w1"].wait(timeout=30)
                start_worker(cl, "w2", memory_limit="1GB", nanny=False)

            killer = threading.Thread(target=kill_one_worker)
            killer.start()
            actors_before, fallbacks_before = engine.actor_passes.n, engine.actor_fallbacks.n
            with pytest.warns(daskem.ConvergenceWarning):
                got = daskem.GaussianMixture(checkpoint=ckpt, **opts).fit(store)
            killer.join()
            after = wait_for_workers(client, {"w0", "w2"})
    assert event["killed"] == -signal.SIGKILL
    assert 3 <= event["at_iter"] < opts["max_iter"]
    if cache:
        # the passes before the loss went to the workers' actors; the loss failed one
        # such pass, which tasks made again; later ones went to the actors again
        assert engine.actor_passes.n - actors_before >= 3
        assert engine.actor_fallbacks.n - fallbacks_before == 1
    else:
        assert event["tasks"] >= 1
        assert engine.actor_passes.n == actors_before
    assert after["w0"]["address"] == before["w0"]["address"]
    assert got.n_iter_ == opts["max_iter"]
    _assert_same_params(got, ref)


# --------------------------------------------------------------------------
# larger than the workers' memory
# --------------------------------------------------------------------------

BIG_ROWS = 60_000_000  # x 8 float32 columns = 1.92 GB on disk, uncompressed
BIG_D, BIG_K = 8, 3
STORE_CHUNK_ROWS = 262_144
WORKER_LIMIT = 300 * 2**20  # two workers: 600 MiB together, the store is 3.05x that


def _write_big_store(client: Client, path: str) -> None:
    """Each worker task draws and writes one store chunk: never the whole array in memory."""
    zarr.create_array(
        path, shape=(BIG_ROWS, BIG_D), chunks=(STORE_CHUNK_ROWS, BIG_D), dtype="float32", compressors=None
    )
    means = blob_means(BIG_K, BIG_D, 0).astype(np.float32)

    def write(i: int) -> int:
        z = zarr.open_array(path, mode="r+")
        start, stop = i * STORE_CHUNK_ROWS, min(BIG_ROWS, (i + 1) * STORE_CHUNK_ROWS)
        rng = np.random.default_rng([0, i])
        x = rng.standard_normal((stop - start, BIG_D), dtype=np.float32)
        x += means[rng.integers(BIG_K, size=stop - start)]
        z[start:stop] = x
        return stop - start

    n_chunks = -(-BIG_ROWS // STORE_CHUNK_ROWS)
    assert sum(client.gather(client.map(write, range(n_chunks), pure=False))) == BIG_ROWS


@pytest.mark.slow
def test_larger_than_memory_streams_with_bounded_memory(tmp_path):
    store = str(tmp_path / "big.zarr")
    store_bytes = BIG_ROWS * BIG_D * 4
    workers = {name: dict(memory_limit=str(WORKER_LIMIT), nanny=True) for name in ("w0", "w1")}
    max_iter = 2
    with running_cluster(tmp_path / "cluster", workers) as cl:
        with Client(cl.address) as client:
            before = wait_for_workers(client, {"w0", "w1"})
            total_limit = sum(w["memory_limit"] for w in before.values())
            _write_big_store(client, store)
            assert store_bytes >= 3 * total_limit
            X = open_array(store, chunk_bytes=8 * 2**20)
            assert engine.prepare_data(X, "auto")[1] is False  # "auto" must stream
            pids = {name: (lambda name=name: [cl.compute_pid(name)]) for name in workers}
            compute_pids = {name: cl.compute_pid(name) for name in workers}
            reads0 = {name: read_chars(pid) for name, pid in compute_pids.items()}
            pids["client"] = lambda: [os.getpid()]
            gm = daskem.GaussianMixture(
                BIG_K,
                covariance_type="diag",
                cache="auto",
                max_iter=max_iter,
                tol=1e-3,
                means_init=blob_means(BIG_K, BIG_D, 0) + 0.3,
                chunk_bytes=8 * 2**20,
                # plain EM: two iterations, unconverged (the warning below); the accelerated default can
                # end converged after its first cycle's two passes on these well-separated blobs
                accelerate=None,
            )
            with PeakRSS(pids) as rss:
                t0 = time.perf_counter()
                with pytest.warns(daskem.ConvergenceWarning):
                    gm.fit(store)
                seconds = time.perf_counter() - t0
            reads = {name: read_chars(pid) - reads0[name] for name, pid in compute_pids.items()}
            after = wait_for_workers(client, {"w0", "w1"})
            same_processes = {name: cl.compute_pid(name) for name in workers} == compute_pids
    shutil.rmtree(store)  # 1.9 GB: do not leave it to pytest's retained tmp folders
    logs = "".join((tmp_path / "cluster" / f"{name}.log").read_text() for name in workers)
    mib = {k: v / 2**20 for k, v in rss.peak.items()}
    passes = 1 + gm.n_iter_  # the hard pass of the means_init, then the EM iterations
    print(
        f"\nlarger-than-memory: store {store_bytes / 1e9:.2f} GB, 2 workers x {WORKER_LIMIT / 2**20:.0f} MiB; "
        f"peak RSS MiB {', '.join(f'{k} {v:.0f}' for k, v in mib.items())} (client from {rss.start['client'] / 2**20:.0f}); "
        f"{seconds:.1f} s for {passes} passes = {seconds / passes:.1f} s/pass; "
        f"worker reads GB {', '.join(f'{k} {v / 1e9:.2f}' for k, v in reads.items())}"
    )
    # the right parameters (60M rows: the estimates sit within a few 1e-4 of the truth)
    true = blob_means(BIG_K, BIG_D, 0)
    np.testing.assert_allclose(gm.means_, true, atol=0.01)
    np.testing.assert_allclose(gm.weights_, 1 / 3, atol=0.005)
    np.testing.assert_allclose(gm.covariances_, 1.0, atol=0.01)
    # streamed: every pass read the whole store from disk, split between the workers
    assert sum(reads.values()) >= passes * store_bytes
    # no worker restarted, no worker near its limit, the client far below the data size
    assert {n: w["address"] for n, w in after.items()} == {n: w["address"] for n, w in before.items()}
    assert same_processes
    assert "Restarting" not in logs and "exceeded" not in logs
    assert max(rss.peak["w0"], rss.peak["w1"]) < 0.8 * WORKER_LIMIT
    # (the client is this test process: what it grew by, not what earlier tests in it left)
    assert rss.peak["client"] - rss.start["client"] < store_bytes / 4
