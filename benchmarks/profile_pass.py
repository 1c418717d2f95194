"""Where an EM pass spends its time: the kernel step by step, and the pass on a cluster.

Usage::

    python benchmarks/profile_pass.py [--rows 1000000] [--passes 6]

Two parts, printed as tables (float64 and float32, D=16, K=8, full covariance,
the benchmark's case (a)):

1. **The fused kernel, step by step**, on one block of ``DEFAULT_BLOCK_ROWS``
   rows in this process (one BLAS thread; best of several repeats of each
   step): the design matrix, the E-step product, the squared norms, the
   responsibilities, the moment products, and the whole block.
2. **The pass on a two-worker ``LocalCluster``** (data cached as
   ``GaussianMixture(cache=True)`` does), from Dask's task stream: the
   delay from the client's call to the first chunk task, the chunk tasks'
   compute seconds on each worker, the gaps between them, and the delay from
   the last task to the statistics on the client. The fixed part (start +
   end + M-step) does not shrink with float32 and caps the whole-iteration
   float32 speed-up below the kernel's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from daskem import _engine as engine  # noqa: E402
from daskem import _gaussian as g  # noqa: E402
from daskem._blas import single_threaded_blas  # noqa: E402
from daskem._gaussian_model import GaussianModel  # noqa: E402


def _best_us(f, repeats: int = 300) -> float:
    f()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeats):
            f()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best * 1e6


def kernel_steps(X: np.ndarray, p: g.GaussianParams, dtype: str) -> dict[str, float]:
    """Microseconds of each step of the full-covariance block kernel."""
    n = g.DEFAULT_BLOCK_ROWS
    xb = np.ascontiguousarray(X[:n], dtype=dtype)
    dt = np.dtype(dtype)
    plan = g._make_plan(p, dt)
    work = g._Workspace(dt)
    k, d = plan.k, plan.d
    out: dict[str, float] = {}
    with single_threaded_blas():
        ones = np.ones(d, dtype=dt)
        out["finite screen (block @ 1)"] = _best_us(lambda: np.isfinite(xb @ ones).all())
        out["design [x - c, 1].T"] = _best_us(lambda: g._design(xb, plan, work))
        a = g._design(xb, plan, work)
        y = work.get("y", (k * d, n))
        out["E-step product (K*D x D+1 @ D+1 x n)"] = _best_us(lambda: g._matmul(plan.weight, a, y))
        lp = work.get("lp", (k, n))
        y3 = y.reshape(k, d, n)
        out["squared norms (einsum)"] = _best_us(lambda: np.einsum("kdn,kdn->kn", y3, y3, out=lp))
        logp = g._log_prob_block(a, plan, work).copy()
        out["responsibilities (max, exp, sum, log)"] = _best_us(lambda: g._responsibilities(logp.copy(), False))
        q = g._responsibilities(logp.copy(), False)[0].copy()
        z = a[:d]
        out["first moments (q @ z.T)"] = _best_us(lambda: q @ z.T)
        zq = work.get("y", (k * d, n)).reshape(k, d, n)
        out["q-weighted rows (q * z)"] = _best_us(lambda: np.multiply(q[:, None, :], z[None, :, :], out=zq))
        c2 = work.get("c2", (k * d, d))
        out["scatter product (K*D x n @ n x D)"] = _best_us(lambda: g._matmul(zq.reshape(k * d, n), z.T, c2))
        acc = {"loglik": 0.0, "nk": np.zeros(k), "c1": np.zeros((k, d)), "c2": np.zeros((k * d, d))}
        out["whole block (_accumulate_block)"] = _best_us(
            lambda: g._accumulate_block(xb, p, False, dt, acc, plan, work)
        )
    return out


def pass_timeline(X: np.ndarray, p: g.GaussianParams, dtype: str, passes: int) -> dict[str, float]:
    """Median milliseconds of the parts of a pass on a two-worker LocalCluster."""
    import dask.array as da
    from distributed import Client, LocalCluster, get_task_stream, wait

    rows: dict[str, list[float]] = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, Client(cl):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sending large graph": the numpy rows, once
            Xd, _ = engine.prepare_data(da.from_array(X, chunks=(262_144, X.shape[1])), True, dtype=dtype)
            wait(Xd)
        model = GaussianModel(dtype=dtype)
        params = p
        for i in range(passes + 1):
            t0 = time.time()
            with get_task_stream() as ts:
                (stats,) = engine.reduce_statistics(Xd, model, [params])
            t1 = time.time()
            params, _ = model.m_step(stats, params)
            t2 = time.time()
            if i == 0:
                continue  # warm-up
            spans: dict[str, list[tuple[float, float]]] = {}
            for r in ts.data:
                for s in r["startstops"]:
                    if s["action"] == "compute":
                        spans.setdefault(r["worker"], []).append((s["start"], s["stop"]))
            first = min(a for v in spans.values() for a, _ in v)
            last = max(b for v in spans.values() for _, b in v)
            busy = [sum(b - a for a, b in v) for v in spans.values()]
            gaps = [sum(max(0.0, v2[0] - v1[1]) for v1, v2 in zip(sorted(v), sorted(v)[1:])) for v in spans.values()]
            for key, val in {
                "call -> first chunk task": first - t0,
                "chunk tasks, busiest worker": max(busy),
                "chunk tasks, other worker": min(busy),
                "gaps between a worker's tasks": max(gaps),
                "last task -> statistics on client": t1 - last,
                "M-step on client": t2 - t1,
                "whole iteration": t2 - t0,
            }.items():
                rows.setdefault(key, []).append(val * 1e3)
    return {k: statistics.median(v) for k, v in rows.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--passes", type=int, default=6)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run import init_params

    rng = np.random.default_rng(0)
    d, k = 16, 8
    centres = rng.normal(scale=3.0, size=(k, d))
    labels = rng.integers(0, k, size=args.rows)
    X = centres[labels] + rng.standard_normal((args.rows, d)) * rng.uniform(0.5, 1.5, size=(k, d))[labels]
    p = init_params(X, k, "full", seed=0)

    steps = {dt: kernel_steps(X, p, dt) for dt in ("float64", "float32")}
    print(f"[1] the fused kernel on one block of {g.DEFAULT_BLOCK_ROWS} rows, D={d}, K={k}, full (us, best of 5)")
    print(f"  {'step':42s} {'float64':>9s} {'float32':>9s} {'ratio':>6s}")
    for name in steps["float64"]:
        a, b = steps["float64"][name], steps["float32"][name]
        print(f"  {name:42s} {a:9.1f} {b:9.1f} {a / b:6.2f}")

    tl = {dt: pass_timeline(X, p, dt, args.passes) for dt in ("float64", "float32")}
    print(f"\n[2] one EM iteration on 2 workers, N={args.rows} (ms, median of {args.passes})")
    print(f"  {'part':42s} {'float64':>9s} {'float32':>9s} {'ratio':>6s}")
    for name in tl["float64"]:
        a, b = tl["float64"][name], tl["float32"][name]
        print(f"  {name:42s} {a:9.1f} {b:9.1f} {a / b:6.2f}")


if __name__ == "__main__":
    main()
