"""Cost of one EM iteration with missing entries vs the complete-data kernel.

Times the chunk kernel (pure numpy, one thread, the work of one EM pass
without Dask) on N rows in row chunks: the complete-data kernel on the data
without NaN, and ``missing="marginalize"`` on the same data with 0%, 5% and
20% of entries missing completely at random. Configurations are interleaved
within each repeat (the machine may be shared) and the ratios are taken per
repeat; the median is reported.

    OMP_NUM_THREADS=1 python benchmarks/missing_cost.py --n 200000 --d 8 --k 4 --covariance-type full

With ``--cluster``, the same data are written to chunked Zarr stores and one
EM pass (read, kernel, tree reduction) is timed on a
``distributed.LocalCluster`` with worker processes, streaming from the store.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np

from daskem._gaussian import GaussianParams
from daskem._gaussian_model import GaussianModel as MixtureModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--covariance-type", default="full")
    ap.add_argument("--chunk-rows", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--fractions", default="0,0.05,0.2")
    ap.add_argument("--cluster", action="store_true", help="time passes on a LocalCluster over Zarr stores")
    ap.add_argument("--n-workers", type=int, default=2)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    n, d, k, ct = args.n, args.d, args.k, args.covariance_type
    centres = rng.normal(scale=4.0, size=(k, d))
    X = centres[rng.integers(k, size=n)] + rng.normal(size=(n, d))
    cov = {
        "full": np.stack([np.eye(d) + 0.1] * k),
        "tied": np.eye(d) + 0.1,
        "diag": np.ones((k, d)),
        "spherical": np.ones(k),
    }[ct]
    params = GaussianParams.from_covariances(np.full(k, 1.0 / k), centres + 0.1, cov, ct)
    fractions = [float(f) for f in args.fractions.split(",")]
    data = {}
    for f in fractions:
        Xm = X.copy()
        Xm[np.random.default_rng(1).random(X.shape) < f] = np.nan
        data[f] = Xm
    complete = MixtureModel()
    marg = MixtureModel(missing="marginalize")
    if args.cluster:
        with _cluster_passes(args, X, data, params) as one_pass:
            _report(args, one_pass, complete, marg, X, data, fractions, "LocalCluster pass over Zarr")
        return

    def one_pass(model: MixtureModel, A: np.ndarray) -> float:
        t = time.perf_counter()
        for i in range(0, n, args.chunk_rows):
            model.statistics(A[i : i + args.chunk_rows], [params], None)
        return time.perf_counter() - t

    _report(args, one_pass, complete, marg, X, data, fractions, "numpy kernel, one thread")


@contextlib.contextmanager
def _cluster_passes(
    args: argparse.Namespace, X: np.ndarray, data: dict[float, np.ndarray], params: GaussianParams
) -> Iterator[Callable[[MixtureModel, np.ndarray], float]]:
    """Zarr stores of ``X`` and of every ``data`` array, and a timed pass on a LocalCluster."""
    import zarr
    from distributed import Client, LocalCluster

    from daskem import _engine, open_array

    with tempfile.TemporaryDirectory() as tmp:
        arrays = {}
        for name, A in [("clean", X)] + [(f, data[f]) for f in data]:
            path = f"{tmp}/{name}.zarr"
            z = zarr.create_array(store=path, shape=A.shape, chunks=(args.chunk_rows, A.shape[1]), dtype="f8")
            z[:] = A
            arrays[id(A)] = open_array(path, chunk_bytes=args.chunk_rows * A.shape[1] * 8)
        with (
            LocalCluster(
                n_workers=args.n_workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as cluster,
            Client(cluster),
        ):

            def one_pass(model: MixtureModel, A: np.ndarray) -> float:
                t = time.perf_counter()
                _engine.reduce_statistics(arrays[id(A)], model, [params])
                return time.perf_counter() - t

            yield one_pass


def _report(
    args: argparse.Namespace,
    one_pass: Callable[[MixtureModel, np.ndarray], float],
    complete: MixtureModel,
    marg: MixtureModel,
    X: np.ndarray,
    data: dict[float, np.ndarray],
    fractions: list[float],
    what: str,
) -> None:
    n, d, k, ct = args.n, args.d, args.k, args.covariance_type

    one_pass(complete, X)  # warm up
    for f in fractions:
        one_pass(marg, data[f])
    base, times = [], {f: [] for f in fractions}
    for _ in range(args.repeats):
        base.append(one_pass(complete, X))
        for f in fractions:
            times[f].append(one_pass(marg, data[f]))
    base_a = np.array(base)
    print(f"{what}: N={n} D={d} K={k} {ct}, chunks of {args.chunk_rows} rows, {args.repeats} interleaved repeats")
    print(f"complete-data kernel: median {np.median(base_a) * 1e3:8.1f} ms/iteration")
    for f in fractions:
        t = np.array(times[f])
        rows_nan = np.isnan(data[f]).any(axis=1).mean()
        print(
            f"marginalize {f:4.0%} missing ({rows_nan:5.1%} rows with NaN): median {np.median(t) * 1e3:8.1f} "
            f"ms/iteration, ratio to complete-data: median {np.median(t / base_a):5.2f} "
            f"(min {np.min(t / base_a):5.2f}, max {np.max(t / base_a):5.2f})"
        )


if __name__ == "__main__":
    main()
