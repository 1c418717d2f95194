"""Where a fit ends after its first EM pass, and how close to the optimum it is then.

SQUAREM's rule may end a run after its first pass, when EM's rate measured
on the sample and the gain of EM's surrogate from that pass bound what is
left below ``tol / 30`` (``daskem._squarem.surrogate_remaining``). This
sweeps the separation of a K=5 mixture in 4 dimensions (100,000 rows,
per-component spreads 0.6-1.4, centres drawn with standard deviation
``scale``), ``full`` and ``diag``, 3 seeds, and prints for the default fit its
passes, EM iterations, the rate measured on the sample, its gap to the
optimum (``score`` of plain EM from the same start run to ``tol=1e-9``, less
the fit's ``score``) and ``lower_bound_ - score`` (EM's lower bound: never
above the score). The summary says how many fits ended after one pass, the
largest gap among them, and whether any lower bound was above its score.

Usage::

    PYTHONPATH=$PWD python benchmarks/first_pass.py [--scales 1.5 2 3 4 6] [--seeds 3]

A scratch benchmark, not a test: nothing is asserted. Pass counts do not
depend on the machine's load.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

from daskem import GaussianMixture


def mixture(scale: float, seed: int, k: int = 5, d: int = 4, n: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=scale, size=(k, d))
    spreads = rng.uniform(0.6, 1.4, size=(k, d))
    lab = rng.integers(k, size=n)
    return centres[lab] + rng.standard_normal((n, d)) * spreads[lab]


def case(X: np.ndarray, cov: str, seed: int, k: int = 5) -> dict:
    gm = GaussianMixture(k, covariance_type=cov, random_state=seed).fit(X)
    start = GaussianMixture(k, covariance_type=cov, random_state=seed, max_iter=0).fit(X)
    ref = GaussianMixture(
        k,
        covariance_type=cov,
        accelerate=None,
        tol=1e-9,
        max_iter=20_000,
        weights_init=start.weights_,
        means_init=start.means_,
        precisions_init=start.precisions_,
    ).fit(X)
    score = gm.score(X)
    rate = gm.runs_[0]["prior_rate"]
    return {
        "passes": int(gm.n_passes_),
        "n_iter": int(gm.n_iter_),
        "rate": None if rate is None else float(rate),
        "gap": float(ref.score(X) - score),
        "bound_minus_score": float(gm.lower_bound_ - score),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", type=float, nargs="+", default=[1.5, 2.0, 2.5, 3.0, 4.0, 6.0])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    rows = []
    print(f"{'scale':>5} {'seed':>4} {'cov':>4} | {'passes':>6} {'iter':>4} {'rate':>6} {'gap':>9} {'bound-score':>11}")
    for scale in args.scales:
        for seed in range(args.seeds):
            X = mixture(scale, seed)
            for cov in ("full", "diag"):
                r = case(X, cov, seed)
                rows.append(r)
                rate = "-" if r["rate"] is None else f"{r['rate']:.3f}"
                print(
                    f"{scale:>5} {seed:>4} {cov:>4} | {r['passes']:>6} {r['n_iter']:>4} {rate:>6} "
                    f"{r['gap']:>9.2e} {r['bound_minus_score']:>11.1e}",
                    flush=True,
                )
    one = [r for r in rows if r["n_iter"] == 1]
    print(f"\n{len(one)} of {len(rows)} fits ended after their first EM pass", end="")
    if one:
        print(f"; largest gap to the optimum among them {max(r['gap'] for r in one):.2e} (tol / 30 = 3.3e-05)")
    else:
        print()
    above = sum(r["bound_minus_score"] > 1e-12 for r in rows)
    print(f"lower bound above the fit's score: {above} of {len(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
