"""Initialisation quality and cost: the former ``kmeans-full`` against the sample-based ``kmeans``.

For scikit-learn's iris, digits, breast cancer (wdbc) and the pixels of
``china.jpg`` (273,280 x 3), every covariance type and a few K, prints the
passes over the data (initialisation and in all: calls of the engine's
``reduce_statistics`` and ``sample_rows``, counted by wrapping them; the
total agrees with the estimator's ``n_passes_``) and the
final mean log-likelihood per row after EM with the defaults (``tol=1e-3``):
the median over 10 seeds with ``n_init=1`` (plain EM, ``accelerate=None``), and the best of ``n_init=10``.

With ``--mclust``, also fits wdbc with R's mclust (``Rscript``, mclust
installed) for VVV/EEE/VVI/VII and G=1..5 and prints the total
log-likelihoods side by side with daskem's best of ``n_init=10`` (EM to
``tol=1e-9`` per row, ``reg_covar=0``: mclust does not regularise).

Usage::

    PYTHONPATH=$PWD python benchmarks/init_quality.py [--datasets iris wdbc digits china] [--mclust] [--json out.json]

A scratch benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

import daskem
from daskem import _engine as engine
from daskem import _init

COVS = ("full", "diag", "tied", "spherical")
SEEDS = range(10)
OLD, NEW = "kmeans-full", "kmeans"


def load(name: str) -> tuple[np.ndarray, list[int]]:
    """The data and the K values to try."""
    from sklearn import datasets

    if name == "iris":
        return datasets.load_iris().data, [2, 3, 4]
    if name == "wdbc":
        return datasets.load_breast_cancer().data, [2, 3, 4]
    if name == "digits":
        return datasets.load_digits().data.astype(np.float64), [10]
    if name == "china":
        img = datasets.load_sample_image("china.jpg")
        return img.reshape(-1, 3).astype(np.float64), [8]
    raise ValueError(name)


class PassCounter:
    """Counts the engine's reading calls, split into initialisation and the rest."""

    def __init__(self) -> None:
        self.init = 0
        self.total = 0
        self._in_init = False

    @contextlib.contextmanager
    def installed(self):
        real_reduce, real_sample, real_init = engine.reduce_statistics, engine.sample_rows, _init.initialize

        def counted(fn):
            def wrapper(*a, **kw):
                self.total += 1
                self.init += self._in_init
                return fn(*a, **kw)

            return wrapper

        def init(*a, **kw):
            self._in_init = True
            try:
                return real_init(*a, **kw)
            finally:
                self._in_init = False

        engine.reduce_statistics, engine.sample_rows = counted(real_reduce), counted(real_sample)
        _init.initialize = init
        try:
            yield self
        finally:
            engine.reduce_statistics, engine.sample_rows, _init.initialize = real_reduce, real_sample, real_init


def fit(X: np.ndarray, k: int, cov: str, init: str, seed: int, n_init: int = 1, **kw) -> dict:
    c = PassCounter()
    with c.installed(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            gm = daskem.GaussianMixture(
                k, covariance_type=cov, init_params=init, random_state=seed, n_init=n_init, **{"accelerate": None, **kw}
            ).fit(X)
        except ValueError as exc:  # ill-defined covariance with reg_covar=0
            return {"ll": float("nan"), "init_passes": c.init, "passes": c.total, "error": str(exc)[:60]}
    return {"ll": float(gm.lower_bound_), "init_passes": c.init, "passes": c.total, "n_iter": int(gm.n_iter_)}


def quality(
    names: list[str],
    covs: tuple[str, ...] = COVS,
    ks: list[int] | None = None,
    seeds: range = SEEDS,
    best10: bool = True,
) -> list[dict]:
    rows = []
    head = (
        f"{'data':8s} {'n x d':>11s} {'K':>3s} {'cov':9s} | {'passes init/all (old)':>21s} {'(new)':>9s} | "
        f"{'median ll old':>13s} {'new':>10s} {'new-old':>9s} | {'best10 old':>10s} {'new':>10s} {'new-old':>9s}"
    )
    print(head)
    print("-" * len(head))
    for name in names:
        X, default_ks = load(name)
        for k in ks or default_ks:
            for cov in covs:
                row = {"data": name, "n": X.shape[0], "d": X.shape[1], "k": k, "cov": cov}
                for label, init in (("old", OLD), ("new", NEW)):
                    single = [fit(X, k, cov, init, s) for s in seeds]
                    best = fit(X, k, cov, init, 0, n_init=10) if best10 else {"ll": float("nan"), "passes": 0}
                    row[label] = {
                        "median_ll": float(np.nanmedian([r["ll"] for r in single])),
                        "init_passes": int(np.median([r["init_passes"] for r in single])),
                        "passes": int(np.median([r["passes"] for r in single])),
                        "best10_ll": best["ll"],
                        "best10_passes": best["passes"],
                    }
                o, n = row["old"], row["new"]
                print(
                    f"{name:8s} {X.shape[0]:>6d} x{X.shape[1]:>3d} {k:>3d} {cov:9s} | "
                    f"{o['init_passes']:>10d}/{o['passes']:<10d} {n['init_passes']:>4d}/{n['passes']:<4d} | "
                    f"{o['median_ll']:>13.5f} {n['median_ll']:>10.5f} {n['median_ll'] - o['median_ll']:>+9.5f} | "
                    f"{o['best10_ll']:>10.5f} {n['best10_ll']:>10.5f} {n['best10_ll'] - o['best10_ll']:>+9.5f}",
                    flush=True,
                )
                rows.append(row)
    return rows


MCLUST_MODELS = {"VVV": "full", "EEE": "tied", "VVI": "diag", "VII": "spherical"}


def mclust_wdbc(gs: range) -> list[dict]:
    from sklearn.datasets import load_breast_cancer

    X = load_breast_cancer().data
    n = X.shape[0]
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "wdbc.csv"
        np.savetxt(csv, X, delimiter=",")
        script = (
            "suppressMessages(library(mclust)); X <- as.matrix(read.csv('" + str(csv) + "', header=FALSE)); "
            "for (m in c(" + ",".join(f"'{m}'" for m in MCLUST_MODELS) + ")) for (G in "
            f"{gs.start}:{gs.stop - 1}) {{ f <- Mclust(X, G=G, modelNames=m, verbose=FALSE); "
            "cat(m, G, if (is.null(f)) NA else f$loglik, '\\n') }"
        )
        out = subprocess.run(["Rscript", "-e", script], capture_output=True, text=True, timeout=600).stdout
    ref = {}
    for line in out.splitlines():
        m, g, ll = line.split()
        ref[(m, int(g))] = float(ll)
    rows = []
    print(f"\nwdbc ({n} x {X.shape[1]}) vs mclust: total log-likelihood, best of n_init=10, tol=1e-9, reg_covar=0")
    print(f"{'model':6s} {'G':>2s} | {'mclust':>11s} | {'old':>11s} {'old-mcl':>9s} | {'new':>11s} {'new-mcl':>9s}")
    for m, cov in MCLUST_MODELS.items():
        for g in gs:
            mc = ref.get((m, g), float("nan"))
            res = {
                label: fit(X, g, cov, init, 0, n_init=10, tol=1e-9, max_iter=3000, reg_covar=0.0)["ll"] * n
                for label, init in (("old", OLD), ("new", NEW))
            }
            print(
                f"{m:6s} {g:>2d} | {mc:>11.2f} | {res['old']:>11.2f} {res['old'] - mc:>+9.2f} | "
                f"{res['new']:>11.2f} {res['new'] - mc:>+9.2f}",
                flush=True,
            )
            rows.append({"model": m, "G": g, "mclust": mc, **res})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="*", default=["iris", "wdbc", "digits", "china"])
    ap.add_argument("--covs", nargs="*", default=list(COVS), choices=COVS)
    ap.add_argument("--ks", nargs="*", type=int, help="K values (default: per data set)")
    ap.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds of the n_init=1 median (default 10)")
    ap.add_argument("--no-best10", action="store_true", help="skip the best of n_init=10")
    ap.add_argument("--mclust", action="store_true", help="also compare with R's mclust on wdbc")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    out = {
        "quality": quality(args.datasets, tuple(args.covs), args.ks, range(args.seeds), not args.no_best10)
        if args.datasets
        else []
    }
    if args.mclust:
        out["mclust_wdbc"] = mclust_wdbc(range(1, 6))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
