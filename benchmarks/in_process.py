"""In-process fits of numpy input against scikit-learn and against a LocalCluster, timed in turn.

    python benchmarks/in_process.py            # about a minute on 2 cores
    python benchmarks/in_process.py --quick    # small (a)

1. Whole ``fit`` with defaults, numpy input, no client: iris K=3 full and
   digits K=10 full, daskem and ``sklearn.mixture.GaussianMixture`` in turn
   (median of the rounds). Both run with the process's BLAS settings: run
   it with ``OPENBLAS_NUM_THREADS=1`` too (scikit-learn's small products
   with several BLAS threads are slow on a busy machine).
2. Seconds per EM iteration on (a) N=1e6 D=16 K=8, full and diag, from the
   same parameters: in process (numpy input, the engine's forked pass workers) and on
   a 2-worker LocalCluster (the data persisted there), in turn.
   Then whole default fits of that data in process, with the forked pass
   workers and with threads (``DASKEM_FORK=0``), in turn.
3. The per-pass overhead of the cluster: a pass over 1,000 rows in process and
   on the cluster (what sets ``engine.IN_PROCESS_BYTES``).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import dask
import dask.array as da
import numpy as np
from distributed import Client, LocalCluster
from sklearn.datasets import load_digits, load_iris
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import daskem
from daskem import _engine as engine
from daskem import _fitloop
from daskem import _gaussian as g
from daskem._blas import single_threaded_blas
from daskem._gaussian_model import GaussianModel
from daskem.cli import local_cluster_config


def whole_fits(rounds: int) -> None:
    for name, X, k in (("iris", load_iris().data, 3), ("digits", load_digits().data, 10)):
        ours, theirs = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            daskem.GaussianMixture(k, random_state=0).fit(X)
            SkGaussianMixture(k, random_state=0).fit(X)
            for r in range(rounds):
                t = time.perf_counter()
                a = daskem.GaussianMixture(k, random_state=r).fit(X)
                ours.append(time.perf_counter() - t)
                t = time.perf_counter()
                b = SkGaussianMixture(k, random_state=r).fit(X)
                theirs.append(time.perf_counter() - t)
        mo, mt = np.median(ours), np.median(theirs)
        print(
            f"{name:6s} K={k:<2d} fit, defaults: daskem {mo * 1e3:7.1f} ms  scikit-learn {mt * 1e3:7.1f} ms  "
            f"ratio {mo / mt:.2f}  (median of {rounds}; last lower bounds {a.lower_bound_:.4f} / {b.lower_bound_:.4f})"
        )


def iterations(Xd: da.Array, model: GaussianModel, params: g.GaussianParams, iters: int) -> list[float]:
    """Seconds of ``iters`` EM iterations, after one that is not counted (as in ``run.py``:
    in process it is the forked workers' first pass, ~0.08 s slower here)."""
    secs: list[float] = []
    # the client's M-steps with one BLAS thread, as in ``fit``
    with warnings.catch_warnings(), single_threaded_blas():
        warnings.simplefilter("ignore", RuntimeWarning)
        _fitloop.iterate(
            _fitloop.Passes(Xd, model),
            model,
            [_fitloop.Run(params)],
            tol=-1.0,
            max_iter=iters + 1,
            callback=lambda info: secs.append(info.seconds),
        )
    return secs[1:]


def per_iteration(n: int, rounds: int, iters: int) -> None:
    d, k = 16, 8
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=3.0, size=(k, d))
    X = centres[rng.integers(k, size=n)] + rng.normal(size=(n, d))
    # configured as the clusters daskem starts (no worker profiler)
    with (
        dask.config.set(local_cluster_config()),
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
    ):
        with Client(cluster):
            for ctype in ("full", "diag"):
                model = GaussianModel(covariance_type=ctype)
                cov = np.ones((k, d)) if ctype == "diag" else np.tile(np.eye(d), (k, 1, 1))
                params = g.GaussianParams.from_covariances(np.full(k, 1 / k), X[:k].copy(), cov, ctype)
                order = model.chunk_order
                on_cluster, persisted = engine.prepare_data(
                    da.from_array(X, chunks=(n // 4, d)).map_blocks(np.copy), True, order=order
                )
                assert persisted and engine.local_blocks(on_cluster) is None
                # in process although a client is active: Dask's local scheduler setting
                with dask.config.set(scheduler="threads"):
                    local, _ = engine.prepare_data(engine.local_array(X), "auto", in_memory=True, order=order)
                    assert engine.in_process_blocks(local) is not None
                samples: dict[str, list[float]] = {"in process": [], "LocalCluster 2x1": []}
                for r in range(rounds + 1):  # the first round warms up
                    # as ``fit`` runs them: the passes in forked worker processes
                    with dask.config.set(scheduler="threads"), engine.local_workers(local):
                        s = iterations(local, model, params, iters)
                    if r:
                        samples["in process"] += s
                    s = iterations(on_cluster, model, params, iters)
                    if r:
                        samples["LocalCluster 2x1"] += s
                med = {name: float(np.median(v)) for name, v in samples.items()}
                print(
                    f"(a) N={n:.0e} D={d} K={k} {ctype:4s}: s/iter in process {med['in process']:.3f} "
                    f"(best {min(samples['in process']):.3f}), 2-worker LocalCluster {med['LocalCluster 2x1']:.3f} "
                    f"(best {min(samples['LocalCluster 2x1']):.3f}); ratio {med['in process'] / med['LocalCluster 2x1']:.2f}"
                )
                del on_cluster
            # the cluster's per-pass overhead: a tiny pass
            small = make_small()
            model = GaussianModel()
            params = g.GaussianParams.from_covariances(np.full(3, 1 / 3), small[:3].copy(), np.ones((3, 4)), "diag")
            tiny_cluster, _ = engine.prepare_data(da.from_array(small, chunks=250).map_blocks(np.copy), True)
            ts: dict[str, list[float]] = {"in process": [], "cluster": []}
            for _ in range(20):
                with dask.config.set(scheduler="threads"):
                    t = time.perf_counter()
                    engine.reduce_statistics(engine.local_array(small), model, [params])
                    ts["in process"].append(time.perf_counter() - t)
                t = time.perf_counter()
                engine.reduce_statistics(tiny_cluster, model, [params])
                ts["cluster"].append(time.perf_counter() - t)
            print(
                f"a pass over 1,000 rows: in process {np.median(ts['in process']) * 1e3:.2f} ms, "
                f"2-worker LocalCluster {np.median(ts['cluster']) * 1e3:.2f} ms (median of 20)"
            )


def forked_vs_threads(n: int, rounds: int) -> None:
    """Whole default fits of (a)'s data in process: passes in forked workers (the
    default on Linux) and on threads (``DASKEM_FORK=0``), in turn."""
    d, k = 16, 8
    rng = np.random.default_rng(0)
    X = rng.normal(scale=3.0, size=(k, d))[rng.integers(k, size=n)] + rng.normal(size=(n, d))
    for ctype in ("full", "diag"):
        secs: dict[str, list[float]] = {"1": [], "0": []}
        passes = {}
        for r in range(rounds + 1):  # the first round warms up
            for fork in ("1", "0"):
                os.environ[engine.FORK_ENV] = fork
                t = time.perf_counter()
                m = daskem.GaussianMixture(k, covariance_type=ctype, random_state=r).fit(X)
                if r:
                    secs[fork].append(time.perf_counter() - t)
                passes[fork] = m.n_passes_
        os.environ.pop(engine.FORK_ENV, None)
        f, t_ = np.median(secs["1"]), np.median(secs["0"])
        print(
            f"(a) N={n:.0e} D={d} K={k} {ctype:4s} fit, defaults: forked workers {f:.2f} s, threads {t_:.2f} s, "
            f"ratio {f / t_:.2f}  (median of {rounds}; {passes['1']} / {passes['0']} passes)"
        )


def make_small() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(1000, 4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--part", choices=["fits", "iterations", "all"], default="all")
    args = ap.parse_args()
    if args.part in ("fits", "all"):
        whole_fits(rounds=3 if args.quick else 9)
        forked_vs_threads(n=100_000 if args.quick else 1_000_000, rounds=1 if args.quick else 3)
    if args.part in ("iterations", "all"):
        per_iteration(n=100_000 if args.quick else 1_000_000, rounds=1 if args.quick else 3, iters=2)


if __name__ == "__main__":
    main()
