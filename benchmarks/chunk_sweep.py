"""Per-pass time against the number of chunks of one array: tasks per pass bounded by the workers.

    python benchmarks/chunk_sweep.py            # about a minute on 2 cores
    python benchmarks/chunk_sweep.py --quick    # 1e5 rows, fewer chunk counts

One 1e6 x 16 float64 array (a Zarr store on disk in 16 store chunks,
uncompressed), cut into 16, 256, 2,048, 8,192 and 50,000 dask chunks
(``da.from_zarr(z, chunks=...)``), on a LocalCluster of 2 single-threaded
worker processes. One pass = the statistics of a K=8 mixture, diag by default
(``--covariance-type full``: a heavier kernel, the same scheduling;
``engine.reduce_statistics``). Timed in turn, median of the rounds:

* ``persisted``: ``engine.prepare_data(X, True)``: whatever the input
  chunks, at most ``PERSIST_BLOCKS_PER_THREAD`` blocks per worker thread.
* ``streamed``: ``cache=False``: one task per group of consecutive chunks
  (``STREAM_TASKS_PER_THREAD`` per worker thread), each task reading its
  chunks in sequence (a store chunk once, when the dask chunks are pieces of it).
* ``one task per chunk`` (before): the persisted data cut back into the
  chunks and passed over one task per chunk, as the engine did before; up to
  ``--before-max`` chunks (256 by default: on a busy 2-core machine a task
  costs milliseconds, and 50,000 would take minutes), timed in the first
  ``--before-rounds`` rounds only. Its slope is the per-task cost.

Then, on paper, the scheduling a pass over a 10 TB store in 100 MB chunks
(100,000 chunks) on 1,000 workers would cost, before and after.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from distributed import Client, LocalCluster, wait

from daskem import _engine as engine
from daskem import _gaussian as g
from daskem._gaussian_model import GaussianModel

COUNTS = (16, 256, 2048, 8192, 50_000)
BEFORE_MAX = 256


def one_pass(X: da.Array, model: GaussianModel, params: g.GaussianParams) -> float:
    t = time.perf_counter()
    engine.reduce_statistics(X, model, [params])
    return time.perf_counter() - t


def sweep(
    n: int,
    d: int,
    k: int,
    counts: tuple[int, ...] = COUNTS,
    rounds: int = 5,
    before_rounds: int = 2,
    before_max: int = BEFORE_MAX,
    covariance_type: str = "diag",
    workdir: Path | None = None,
) -> dict:
    """Write the store, time the passes in turn, return the table (also what :func:`report` prints)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, d)) + rng.normal(scale=3.0, size=(k, d))[rng.integers(k, size=n)]
    tmp = Path(tempfile.mkdtemp(prefix="daskem-sweep-", dir=workdir))
    try:
        path = str(tmp / "x.zarr")
        z = zarr.create_array(path, shape=X.shape, chunks=(math.ceil(n / 16), d), dtype=X.dtype, compressors=None)
        z[:] = X
        z = zarr.open_array(path, mode="r")
        model = GaussianModel(covariance_type=covariance_type)
        cov = np.tile(np.eye(d), (k, 1, 1)) if covariance_type == "full" else np.ones((k, d))
        params = g.GaussianParams.from_covariances(np.full(k, 1 / k), X[:k].copy(), cov, covariance_type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # large-graph warnings of the "before" arrays
            return run(z, counts, before_max, model, params, rounds, before_rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--covariance-type", default="diag", choices=["full", "diag"])
    ap.add_argument("--before-rounds", type=int, default=2)
    ap.add_argument("--before-max", type=int, default=BEFORE_MAX)
    args = ap.parse_args()
    n, d, k = (100_000, 16, 8) if args.quick else (1_000_000, 16, 8)
    counts = (16, 256, 2048) if args.quick else COUNTS
    before_max = min(args.before_max, 2048) if args.quick else args.before_max
    res = sweep(n, d, k, counts, args.rounds, args.before_rounds, before_max, args.covariance_type)
    report(res)


def run(z, counts, before_max, model, params, rounds, before_rounds) -> dict:
    n, d = z.shape
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            threads = sum(client.nthreads().values())
            variants: dict[tuple[str, int], da.Array] = {}
            tasks: dict[tuple[str, int], int] = {}
            base = None
            for c in counts:
                X = da.from_zarr(z, chunks=(math.ceil(n / c), d))
                persisted, _ = engine.prepare_data(X, True)
                wait(persisted)
                streamed, _ = engine.prepare_data(X, False)
                variants[("persisted", c)] = persisted
                variants[("streamed", c)] = streamed
                tasks[("persisted", c)] = persisted.numblocks[0]
                tasks[("streamed", c)] = len(engine.stream_groups(X.chunks[0]))
                if base is None:
                    base = persisted
                if c <= before_max:
                    # the persisted rows cut back into c chunks: one task per chunk per pass
                    per_chunk = base.rechunk({0: X.chunks[0]}).persist()
                    wait(per_chunk)
                    variants[("one task per chunk", c)] = per_chunk
                    tasks[("one task per chunk", c)] = per_chunk.numblocks[0]
            times: dict[tuple[str, int], list[float]] = {key: [] for key in variants}
            for X in variants.values():
                one_pass(X, model, params)  # warm-up
            order = np.random.default_rng(0)
            keys = list(variants)
            for r in range(rounds):
                # a fresh order every round: no variant always follows the slow ones
                for i in order.permutation(len(keys)):
                    key = keys[i]
                    if key[0] != "one task per chunk" or r < before_rounds:
                        times[key].append(one_pass(variants[key], model, params))
    med = {key: float(np.median(v)) for key, v in times.items()}
    before = sorted(c for c in counts if ("one task per chunk", c) in med)
    xs = np.array(before, dtype=float)
    ys = np.array([med[("one task per chunk", c)] for c in before])
    per_task = float(np.polyfit(xs, ys, 1)[0]) if len(xs) > 1 else float("nan")
    rows = [
        {
            "chunks": c,
            "variant": name,
            "tasks_per_pass": tasks[(name, c)],
            "s_per_pass": round(med[(name, c)], 4),
            "best_s_per_pass": round(min(times[(name, c)]), 4),
            "ratio_to_first": round(med[(name, c)] / med[(name, counts[0])], 3),
        }
        for name in ("persisted", "streamed", "one task per chunk")
        for c in counts
        if (name, c) in med
    ]
    return {
        "N": n,
        "D": d,
        "K": params.n_components,
        "covariance_type": params.covariance_type,
        "counts": list(counts),
        "rounds": rounds,
        "before_rounds": before_rounds,
        "threads": threads,
        "rows": rows,
        "per_task_s": per_task,
        "paper_10TB_1000_workers": paper(per_task),
    }


def paper(per_task: float, chunks: int = 100_000, workers: int = 1_000) -> dict:
    """Scheduling seconds per pass of a 10 TB store in 100 MB chunks on 1,000 workers, before and after."""
    return {
        "chunks": chunks,
        "workers": workers,
        "per_task_s": per_task,
        "before_one_task_per_chunk_s": chunks * per_task,
        "after_1_thread_per_worker_s": engine.STREAM_TASKS_PER_THREAD * workers * per_task,
        "after_8_threads_per_worker_s": engine.STREAM_TASKS_PER_THREAD * 8 * workers * per_task,
    }


def report(res: dict) -> None:
    """Print :func:`sweep`'s table."""
    n, d, k, ctype = res["N"], res["D"], res["K"], res["covariance_type"]
    rounds, before_rounds = res["rounds"], res["before_rounds"]
    print(
        f"one pass, N={n:,} D={d} K={k} {ctype}, {res['threads']} worker threads, timed in turn (shuffled each "
        f"round): median (best) of {rounds} rounds ({before_rounds} for one task per chunk)"
    )
    print(
        f"{'chunks':>8} | {'variant':<20} | {'tasks/pass':>10} | {'s/pass':>15} | ratio to {res['counts'][0]} chunks (medians)"
    )
    for r in res["rows"]:
        secs = f"{r['s_per_pass']:.3f} ({r['best_s_per_pass']:.3f})"
        print(
            f"{r['chunks']:>8,} | {r['variant']:<20} | {r['tasks_per_pass']:>10,} | {secs:>15} | {r['ratio_to_first']:5.2f}"
        )
    per_task = res["per_task_s"]
    p = res["paper_10TB_1000_workers"]
    print(f"per-task cost (slope of 'one task per chunk'): {per_task * 1e3:.3f} ms")
    print(
        f"10 TB in 100 MB chunks ({p['chunks']:,} chunks) on {p['workers']:,} workers, scheduling per pass at "
        f"{per_task * 1e3:.3f} ms/task: before {p['before_one_task_per_chunk_s']:.1f} s ({p['chunks']:,} tasks); "
        f"after, streamed ({engine.STREAM_TASKS_PER_THREAD} tasks per thread): {p['after_1_thread_per_worker_s']:.2f} s "
        f"with 1 thread per worker, {p['after_8_threads_per_worker_s']:.2f} s with 8 "
        f"(persisted: at most {engine.PERSIST_BLOCKS_PER_THREAD} blocks per thread, the same)"
    )


if __name__ == "__main__":
    main()
