"""Scratch: passes of plain EM vs SQUAREM to reach L* - 1e-4 from the same start (in memory, no Dask).

Run from the repository root::

    PYTHONPATH=$PWD python benchmarks/squarem_scratch.py [--quick]

For each data set x covariance type: one start (``--start kmeans``: k-means on
a sample, then the Gaussian fitted to its hard labels on all rows; ``--start
seeds``: k-means++ seeds only, nearest-seed labels), plain EM run to ``tol=1e-9`` (or the pass
cap), SQUAREM run to ``tol=1e-10``; L* is the better of the two
final log-likelihoods. Prints the passes each needs to first reach L* - 1e-4,
the ratio, and where SQUAREM with its own rule
stops, in passes and in distance to L* (``gap``), at ``tol=1e-3`` and ``1e-5``, next to plain
EM at ``tol=1e-3`` (scikit-learn's rule).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from daskem._gaussian import GaussianParams, chunk_statistics, m_step
from daskem._squarem import EMAccelerator, gaussian_from_vector, gaussian_to_vector

REG = 1e-6


def datasets(quick: bool) -> dict[str, tuple[np.ndarray, int]]:
    from sklearn.datasets import load_digits, load_sample_image

    out = {}
    out["digits 1797x64 K=10"] = (load_digits().data.astype(np.float64), 10)
    pix = load_sample_image("china.jpg").reshape(-1, 3).astype(np.float64)
    out[f"china pixels {pix.shape[0]}x3 K=8"] = (pix, 8)
    rng = np.random.default_rng(0)
    n = 50_000 if quick else 200_000
    centres = rng.normal(scale=0.6, size=(8, 16))
    lab = rng.integers(8, size=n)
    a = rng.normal(size=(8, 16, 16)) / 4 + np.eye(16)
    x = centres[lab] + np.einsum("nij,nj->ni", a[lab], rng.normal(size=(n, 16)))
    out[f"overlap {n}x16 K=8"] = (x, 8)
    n = 100_000
    centres = rng.normal(scale=10.0, size=(6, 5))
    lab = rng.integers(6, size=n)
    out[f"separated {n}x5 K=6"] = (centres[lab] + rng.normal(size=(n, 5)), 6)
    return out


def hard_start(X: np.ndarray, k: int, ctype: str, seed: int = 0) -> GaussianParams:
    """k-means on a sample (scikit-learn), then the Gaussian of its hard labels on all rows."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    sample = X[rng.choice(X.shape[0], size=min(X.shape[0], 20_000), replace=False)]
    km = KMeans(k, n_init=1, max_iter=20, random_state=seed).fit(sample)
    lab = km.predict(X)
    return params_from_labels(X, lab, k, ctype)


def seeds_start(X: np.ndarray, k: int, ctype: str, seed: int = 0) -> GaussianParams:
    """k-means++ seeds on a sample (no Lloyd iterations), then the Gaussian of the nearest-seed labels."""
    from sklearn.cluster import kmeans_plusplus

    rng = np.random.default_rng(seed)
    sample = X[rng.choice(X.shape[0], size=min(X.shape[0], 20_000), replace=False)]
    centres, _ = kmeans_plusplus(sample, k, random_state=seed)
    d2 = (X**2).sum(1)[:, None] - 2 * X @ centres.T + (centres**2).sum(1)[None]
    return params_from_labels(X, np.argmin(d2, axis=1), k, ctype)


def params_from_labels(X: np.ndarray, lab: np.ndarray, k: int, ctype: str) -> GaussianParams:
    d = X.shape[1]
    nk = np.bincount(lab, minlength=k).astype(np.float64) + 1e-10
    means = np.stack([X[lab == j].mean(axis=0) if (lab == j).any() else X.mean(axis=0) for j in range(k)])
    covs = []
    for j in range(k):
        xj = X[lab == j] - means[j]
        covs.append(xj.T @ xj / max(len(xj), 1) + REG * np.eye(d))
    covs = np.stack(covs)
    if ctype == "tied":
        cov = np.einsum("k,kij->ij", nk, covs) / nk.sum()
    elif ctype == "diag":
        cov = np.diagonal(covs, axis1=1, axis2=2).copy()
    elif ctype == "spherical":
        cov = np.diagonal(covs, axis1=1, axis2=2).mean(axis=1)
    else:
        cov = covs
    return GaussianParams.from_covariances(nk / nk.sum(), means, cov, ctype)


def machine(params, method, tol, max_iter):
    def mstep(stats, p):
        new, empty = m_step(stats, p, REG)
        return new, bool(empty.any())

    return EMAccelerator(
        params,
        m_step=mstep,
        objective=lambda s: s.mean_loglik,
        to_vector=gaussian_to_vector,
        from_vector=gaussian_from_vector,
        method=method,
        tol=tol,
        max_iter=max_iter,
    )


def run(X, m) -> list[tuple[int, float]]:
    """Drive one machine; the (passes, lower_bound) trajectory."""
    traj = []
    while (p := m.proposal()) is not None:
        (s,) = chunk_statistics(X, [p], block_rows=8192)
        m.receive(s)
        traj.append((m.n_iter, m.lower_bound))
    return traj


def first_reach(traj, target):
    return next((n for n, ll in traj if ll >= target), math.inf)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cap", type=int, default=3000)
    ap.add_argument("--start", choices=["kmeans", "seeds"], default="kmeans")
    args = ap.parse_args(argv)
    rows = []
    print(
        f"{'data':32s} {'cov':5s} {'L*':>12s} {'plain':>6s} {'sqrm':>6s} {'ratio':>6s}"
        f" | {'stop@1e-3':>9s} {'gap':>8s} | {'stop@1e-5':>9s} {'gap':>8s} | {'plain@1e-3':>10s} {'gap':>8s}"
    )
    for name, (X, k) in datasets(args.quick).items():
        for ctype in ("full", "diag"):
            t0 = time.perf_counter()
            start = (hard_start if args.start == "kmeans" else seeds_start)(X, k, ctype)
            plain = run(X, machine(start, None, 1e-9, args.cap))
            sq_m = machine(start, "squarem", 1e-10, args.cap)
            sq = run(X, sq_m)
            lstar = max(plain[-1][1], sq[-1][1])
            target = lstar - 1e-4
            np_, ns = first_reach(plain, target), first_reach(sq, target)
            stops = []
            for tol in (1e-3, 1e-5):
                t = run(X, machine(start, "squarem", tol, args.cap))
                stops.append((t[-1][0], lstar - t[-1][1]))
            p3 = run(X, machine(start, None, 1e-3, args.cap))
            # plain EM may end in another (lower) optimum than SQUAREM: then it never reaches L* - 1e-4
            ratio = ns / np_ if math.isfinite(np_) else math.nan
            rows.append(ratio)
            print(
                f"{name:32s} {ctype:5s} {lstar:12.5f} {np_:6} {ns:6} {ratio:6.2f}"
                f" | {stops[0][0]:9d} {stops[0][1]:8.1e} | {stops[1][0]:9d} {stops[1][1]:8.1e}"
                f" | {p3[-1][0]:10d} {lstar - p3[-1][1]:8.1e}"
                f"  ({time.perf_counter() - t0:.0f} s; plain end {plain[-1][0]} passes, squarem end {sq[-1][0]},"
                f" rejected {sq_m.n_rejected}/{sq_m.n_extrapolations})",
                flush=True,
            )
    finite = [r for r in rows if math.isfinite(r)]
    print(f"median ratio (SQUAREM / plain passes to L* - 1e-4): {np.median(finite):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
