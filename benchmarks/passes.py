"""Passes to a model and how close it ends to the optimum: issue 12's measure.

Every pass over the data is a full read of the store out of core, so the
time to a model there is the number of passes. Pass counts do not depend on
the machine's load: this benchmark counts them exactly (``n_passes_``, and
the fit loop's pass counter for the traces) on in-process numpy fits.

Six data sets x ``full`` and ``diag`` x 5 seeds (``n_init=1``,
``random_state=seed``):

* ``overlap16``: 200,000 x 16, K=8, overlapping components (centres drawn
  with standard deviation 0.5, per-column spreads 0.6-1.4);
* ``digits``: scikit-learn's digits, 1,797 x 64, K=10;
* ``china``: the pixels of scikit-learn's ``china.jpg``, 273,280 x 3, K=8;
* ``separated5``: 100,000 x 5, K=6, well separated;
* ``singular``: 60,000 x 6, K=4, two components flat (standard deviation
  1e-2 across a tilted plane);
* ``unequal``: 100,000 x 4, K=5, weights 0.85, 0.1, 0.04, 0.009, 0.001.

For each case, the passes (initialisation included: ``n_passes_``) and the
final mean log-likelihood per row (``lower_bound_``) of

(a) today's defaults: ``init_params='kmeans-full'``, ``accelerate=None``;
(b) the new initialisation (``init_params='kmeans'``), plain EM;
(c) the estimator's defaults as they are now (whatever ``GaussianMixture()``
    does);

and the reference optimum ``L*``: plain EM from (c)'s initial parameters
(taken with the fit loop at ``max_iter=0``: the same seed gives the same
start) run to ``tol=1e-9`` (``max_iter`` 20,000). The gap is ``L* - L``
of (c) (negative: (c) ended at a higher optimum). Then the passes EM needs
from that start to first reach ``L* - 1e-4``: plain EM (``L*``'s own
trace) and SQUAREM (``tol=0``: it runs until it gets there; its accepted
log-likelihoods, counted per pass). The same again from the start before
the polish (the chosen k-means candidate after its short EM on the sample,
``_init.POLISH_MAX_ITER = 0``), to that start's own ``L*``: the polish is
accelerated EM on the sample and leaves a start from which both methods
need a few passes, so this is where the accelerator's own cut shows. And
once more from (a)'s start (``init_params='kmeans-full'``: k-means over
all rows, then the hard pass), to its own ``L*``: the start from which the
issue counted EM's iterations.

The four targets of issue 12 are printed at the end: the median over cases
of passes (c) / passes (a) (<= 0.35), the share of cases with (c) within
1e-4 of ``L*`` (>= 90%), the median of accelerated / plain passes to
``L* - 1e-4`` (<= 0.3), and, with ``--out-of-core``, the time to a model on
an out-of-core Zarr store, new defaults / today's defaults (<= 0.4).

``--out-of-core`` writes a store like case (d) of ``benchmarks/run.py``
(``make_store``: a K=8 mixture in D=16, float64, written chunk by chunk;
``--ooc-rows`` rows, default 1,000,000 = 128 MB, against run.py's 7e6 =
896 MB: smaller, so that both fits run 3 times in a few minutes), starts a ``LocalCluster`` (one single-threaded worker per core,
400 MB memory limit each) and fits it with ``cache=False`` (streamed from
the store every pass, as a store larger than memory is), K=8, diag,
``random_state=0``: today's defaults and the new defaults alternately, 3
rounds (``--ooc-rounds``) after one untimed fit of each, median seconds. Timings on a shared
machine drift; the ratio is measured in turn so that both see the same
load.

Usage::

    PYTHONPATH=$PWD python benchmarks/passes.py [--seeds 5] [--datasets ...] [--out-of-core]
        [--json benchmarks/results/passes.json]

Nothing is asserted; the JSON keeps every case. The full run took 18
minutes on the project's 2-core VM while other jobs shared it (most of it
in the reference runs of plain EM to ``tol=1e-9``: up to 900 passes on the
pixels, diag, and on the unequal weights); ``--datasets`` and ``--seeds``
make it shorter, ``--from-json`` reprints a run (``--markdown``: README's
table).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import daskem  # noqa: E402
from daskem import _engine as engine  # noqa: E402
from daskem import _fitloop, _init  # noqa: E402
from daskem._blas import single_threaded_blas  # noqa: E402

COVS = ("full", "diag")
DATASETS = ("overlap16", "digits", "china", "separated5", "singular", "unequal")
LSTAR_TOL = 1e-9
LSTAR_MAX_ITER = 20_000
NEAR = 1e-4  # nats per row: "within 1e-4 of L*"
SLOW = 20  # plain EM passes to L* - 1e-4 from which a case counts as slowly converging
TARGETS = {"passes_ratio": 0.35, "share_within": 0.90, "accel_ratio": 0.3, "ooc_time_ratio": 0.4}


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


def load(name: str) -> tuple[np.ndarray, int]:
    """The data set and its K."""
    rng = np.random.default_rng(12)
    if name == "overlap16":
        n, d, k = 200_000, 16, 8
        centres = rng.normal(scale=0.5, size=(k, d))  # as the issue's: k-means over all rows needs ~20 passes
        scales = rng.uniform(0.6, 1.4, size=(k, d))
        lab = rng.integers(0, k, size=n)
        return centres[lab] + rng.standard_normal((n, d)) * scales[lab], k
    if name == "digits":
        from sklearn.datasets import load_digits

        return load_digits().data.astype(np.float64), 10
    if name == "china":
        from sklearn.datasets import load_sample_image

        return load_sample_image("china.jpg").reshape(-1, 3).astype(np.float64), 8
    if name == "separated5":
        n, d, k = 100_000, 5, 6
        centres = rng.normal(scale=10.0, size=(k, d))
        lab = rng.integers(0, k, size=n)
        return centres[lab] + rng.standard_normal((n, d)), k
    if name == "singular":
        n, d, k = 60_000, 6, 4
        parts = []
        for j, m in enumerate((20_000, 20_000, 12_000, 8_000)):
            z = rng.standard_normal((m, d))
            if j < 2:
                z[:, 2:] *= 1e-2  # flat: spread in 2 of 6 directions only
            q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # tilted
            parts.append(z @ q.T * 2.0 + rng.normal(scale=3.0, size=d))
        X = np.concatenate(parts)
        return X[rng.permutation(n)], k
    if name == "unequal":
        n, d = 100_000, 4
        w = np.array([0.85, 0.1, 0.04, 0.009, 0.001])
        centres = rng.normal(scale=4.0, size=(len(w), d))
        lab = rng.choice(len(w), size=n, p=w)
        return centres[lab] + rng.standard_normal((n, d)) * rng.uniform(0.5, 1.5, size=(len(w), d))[lab], len(w)
    raise ValueError(name)


# --------------------------------------------------------------------------
# fits
# --------------------------------------------------------------------------


def fit(X: np.ndarray, **kw) -> daskem.GaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return daskem.GaussianMixture(**kw).fit(X)


def initial_params(X: np.ndarray, **kw):
    """The initial parameters of ``GaussianMixture(**kw).fit(X)``: the fit loop at ``max_iter=0``."""
    est = daskem.GaussianMixture(**kw)
    est._validate_params()
    data, in_memory = est._data(X, reset=True)
    Xd = est._dask(data)
    settings = dataclasses.replace(est._settings(X.shape[1]), max_iter=0)
    model = est._make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = _fitloop.fit(Xd, model, [est._candidate()], settings, in_memory=in_memory)
    (run,) = res.runs
    return run.params, Xd, model


def trace(Xd, model, params, run_class, *, tol: float, max_iter: int, stop_at: float = math.inf) -> dict:
    """EM from ``params``: the accepted log-likelihood after each pass; stops early once it reaches ``stop_at``."""
    Xw, _ = engine.prepare_data(Xd, "auto", in_memory=True, dtype="float64", order=getattr(model, "chunk_order", "C"))
    passes = _fitloop.Passes(Xw, model, seed=0)
    run = run_class(params, tag={"k": model.n_components(params), "init": 0})
    per_pass: list[float] = []

    def cb(info: _fitloop.IterationInfo) -> None:
        per_pass.append(run.lower_bound)
        if run.lower_bound >= stop_at:
            run.done = True

    with single_threaded_blas(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fitloop.iterate(passes, model, [run], tol=tol, max_iter=max_iter, callback=cb)
    return {"per_pass": per_pass, "final": run.lower_bound, "n_iter": run.n_iter, "converged": run.converged}


def first_pass_reaching(per_pass: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(per_pass) if v >= target), None)


@contextlib.contextmanager
def unpolished() -> Iterator[None]:
    """The ``kmeans`` start before the polish: the chosen candidate after its scoring EM on the sample."""
    before = _init.POLISH_MAX_ITER
    _init.POLISH_MAX_ITER = 0
    try:
        yield
    finally:
        _init.POLISH_MAX_ITER = before


def to_target(X: np.ndarray, base: dict) -> tuple[dict, dict]:
    """From ``GaussianMixture(**base)``'s start: ``L*`` (plain EM to ``tol=1e-9``) and both methods' passes to it."""
    params, Xd, model = initial_params(X, **base)
    plain = trace(Xd, model, params, _fitloop.Run, tol=LSTAR_TOL, max_iter=LSTAR_MAX_ITER)
    target = plain["final"] - NEAR
    acc = trace(
        Xd,
        model,
        params,
        _fitloop.AcceleratedRun,
        tol=0.0,
        max_iter=max(200, 2 * len(plain["per_pass"])),
        stop_at=target,
    )
    lstar = {"loglik": plain["final"], "passes": plain["n_iter"], "converged": plain["converged"]}
    reach = {
        "plain": first_pass_reaching(plain["per_pass"], target),
        "squarem": first_pass_reaching(acc["per_pass"], target),
        "squarem_best": acc["final"],
    }
    return lstar, reach


def case(X: np.ndarray, k: int, cov: str, seed: int, c_options: dict | None = None) -> dict:
    base = dict(n_components=k, covariance_type=cov, random_state=seed)
    out: dict = {}
    for key, kw in (
        ("a", dict(init_params="kmeans-full", accelerate=None)),
        ("b", dict(init_params="kmeans", accelerate=None)),
        ("c", dict(c_options or {})),
    ):
        t = time.perf_counter()
        est = fit(X, **base, **kw)
        out[key] = {
            "passes": int(est.n_passes_),
            "n_iter": int(est.n_iter_),
            "loglik": float(est.lower_bound_),
            "converged": bool(est.converged_),
            "seconds": round(time.perf_counter() - t, 3),
        }
    out["c"]["accelerate"] = daskem.GaussianMixture(**(c_options or {})).accelerate
    out["lstar"], out["to_target"] = to_target(X, base)
    out["gap"] = out["lstar"]["loglik"] - out["c"]["loglik"]
    # the accelerator where EM still has work to do: from the start before the polish (which is
    # itself accelerated EM, on the sample), to that start's own L*
    with unpolished():
        out["lstar_unpolished"], out["to_target_unpolished"] = to_target(X, base)
    # and from the former initialisation's start ((a)'s: k-means over all rows, then the hard pass), the
    # start the issue's own counts of EM iterations were made from
    out["lstar_former"], out["to_target_former"] = to_target(X, {**base, "init_params": "kmeans-full"})
    return out


# --------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------


def summarise(cases: list[dict]) -> dict:
    ratios = [c["c"]["passes"] / c["a"]["passes"] for c in cases]
    within = [c["gap"] <= NEAR for c in cases]
    acc = []
    for c in cases:
        p, s = c["to_target"]["plain"], c["to_target"]["squarem"]
        if p:
            acc.append((s if s is not None else math.inf) / p)
    # the cases where plain EM needs 20 passes or more: where acceleration has something to cut
    slow = [
        (c["to_target"]["squarem"] or math.inf) / c["to_target"]["plain"]
        for c in cases
        if (c["to_target"]["plain"] or 0) >= SLOW
    ]
    reach_u = [c["to_target_unpolished"] for c in cases if (c.get("to_target_unpolished") or {}).get("plain")]
    reach_f = [c["to_target_former"] for c in cases if (c.get("to_target_former") or {}).get("plain")]
    former = [(t["squarem"] or math.inf) / t["plain"] for t in reach_f]
    # SQUAREM may leave for another optimum below L* (it never reaches L* - 1e-4 then): counted apart
    both_f = [t for t in reach_f if t["squarem"]]
    unpolished = [(t["squarem"] or math.inf) / t["plain"] for t in reach_u]
    unpolished_slow = [(t["squarem"] or math.inf) / t["plain"] for t in reach_u if t["plain"] >= SLOW]
    return {
        "cases": len(cases),
        "accel_ratio_median_unpolished": statistics.median(unpolished) if unpolished else math.nan,
        "unpolished_cases": len(unpolished),
        "accel_ratio_median_former": statistics.median(former) if former else math.nan,
        "former_cases": len(former),
        "accel_ratio_total_former": (
            sum(t["squarem"] for t in both_f) / sum(t["plain"] for t in both_f) if both_f else math.nan
        ),
        "former_elsewhere": len(reach_f) - len(both_f),
        "accel_ratio_median_unpolished_slow": statistics.median(unpolished_slow) if unpolished_slow else math.nan,
        "unpolished_slow_cases": len(unpolished_slow),
        "accel_ratio_total_unpolished": (
            sum(t["squarem"] or math.inf for t in reach_u) / sum(t["plain"] for t in reach_u) if reach_u else math.nan
        ),
        "accel_ratio_median_slow": statistics.median(slow) if slow else math.nan,
        "slow_cases": len(slow),
        "passes_ratio_median": statistics.median(ratios),
        "passes_median": {key: statistics.median(c[key]["passes"] for c in cases) for key in "abc"},
        "share_within": sum(within) / len(within),
        "gap_median": statistics.median(c["gap"] for c in cases),
        "gap_max": max(c["gap"] for c in cases),
        "accel_ratio_median": statistics.median(acc) if acc else math.nan,
    }


def print_table(cases: list[dict], summary: dict) -> None:
    head = (
        f"{'data':11s} {'cov':4s} {'seed':>4s} | {'(a) passes':>10s} {'loglik':>11s} | {'(b) passes':>10s} "
        f"{'loglik':>11s} | {'(c) passes':>10s} {'loglik':>11s} | {'L*':>11s} {'gap':>9s} | "
        f"{'to L*-1e-4: plain':>17s} {'squarem':>7s}"
    )
    print(head)
    print("-" * len(head))
    for c in cases:
        t = c["to_target"]
        print(
            f"{c['data']:11s} {c['cov']:4s} {c['seed']:4d} | {c['a']['passes']:10d} {c['a']['loglik']:11.5f} | "
            f"{c['b']['passes']:10d} {c['b']['loglik']:11.5f} | {c['c']['passes']:10d} {c['c']['loglik']:11.5f} | "
            f"{c['lstar']['loglik']:11.5f} {c['gap']:9.2e} | {t['plain'] or '-':>17} {t['squarem'] or '-':>7}"
        )


def print_targets(summary: dict, ooc: dict | None) -> None:
    s = summary
    print()
    if s:
        print_em_targets(s)
    if ooc:
        print(
            f"4. out of core ({ooc['rows']:,} x {ooc['D']}, {ooc['store_MB']:.0f} MB, streamed): time to a model, "
            f"new / today's defaults: {ooc['time_ratio']:.3f}  (target <= 0.4; medians of {ooc['rounds']} fits "
            f"each, timed in turn on a shared machine; passes {ooc['new']['passes']} vs {ooc['old']['passes']})"
        )


def print_em_targets(s: dict) -> None:
    print(
        f"cases: {s['cases']}; median passes (a) {s['passes_median']['a']}, (b) {s['passes_median']['b']}, "
        f"(c) {s['passes_median']['c']}"
    )
    print(f"1. median passes new defaults / today's defaults: {s['passes_ratio_median']:.3f}  (target <= 0.35)")
    print(
        f"2. share of cases within 1e-4 of L*: {s['share_within']:.1%}  (target >= 90%; "
        f"median gap {s['gap_median']:.2e}, largest {s['gap_max']:.2e})"
    )
    print(
        f"3. median accelerated / plain passes to L* - 1e-4: {s['accel_ratio_median']:.3f} over all cases, "
        f"{s['accel_ratio_median_slow']:.3f} over the {s['slow_cases']} where plain EM needs >= {SLOW} passes "
        "(target <= 0.3)"
    )
    if s.get("unpolished_cases"):
        print(
            f"3'. the same from the start before the polish (the k-means candidate after its short EM on the "
            f"sample; the polish is accelerated EM itself): {s['accel_ratio_median_unpolished']:.3f} over "
            f"{s['unpolished_cases']} cases, {s['accel_ratio_median_unpolished_slow']:.3f} over the "
            f"{s['unpolished_slow_cases']} where plain EM needs >= {SLOW} passes; all cases' passes together "
            f"{s['accel_ratio_total_unpolished']:.3f}"
        )
    if s.get("former_cases"):
        print(
            f"3''. the same from the former initialisation's start ((a)'s: k-means over all rows, then the hard "
            f"pass): {s['accel_ratio_median_former']:.3f} over {s['former_cases']} cases; all cases' passes "
            f"together {s['accel_ratio_total_former']:.3f} (without the {s['former_elsewhere']} where accelerated EM "
            "ended at another optimum below L* - 1e-4, counted as infinite in the median)"
        )


def markdown(cases: list[dict]) -> str:
    """One row per data set and covariance type: medians over the seeds (README's table)."""
    rows = [
        "| data | cov | passes (a) former defaults | (b) new init, plain EM | (c) new defaults | (c)'s gap to L* | "
        "(c) within 1e-4 | passes to L* - 1e-4: plain | accelerated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in cases:
        groups.setdefault((c["data"], c["cov"]), []).append(c)
    for (name, cov), cs in groups.items():

        def med(f, cs=cs):
            return statistics.median(f(c) for c in cs)

        shape = f"{cs[0]['N']:,} x {cs[0]['D']}, K={cs[0]['K']}"
        rows.append(
            f"| {name} ({shape}) | {cov} | {med(lambda c: c['a']['passes']):g} | {med(lambda c: c['b']['passes']):g} "
            f"| {med(lambda c: c['c']['passes']):g} | {med(lambda c: c['gap']):.1e} | "
            f"{sum(c['gap'] <= NEAR for c in cs)}/{len(cs)} | {med(lambda c: c['to_target']['plain'] or math.inf):g} "
            f"| {med(lambda c: c['to_target']['squarem'] or math.inf):g} |"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------
# out of core
# --------------------------------------------------------------------------


def out_of_core(rows: int, rounds: int = 3) -> dict:
    import dask
    from distributed import Client, LocalCluster

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run import make_store

    d, k = 16, 8
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "ooc.zarr"
        make_store(store, rows, d, k, chunk_rows=262_144)
        variants = {
            "old": dict(init_params="kmeans-full", accelerate=None),
            "new": {},
        }
        times: dict[str, list[float]] = {v: [] for v in variants}
        info: dict[str, dict] = {}
        with (
            dask.config.set({"distributed.worker.memory.spill": False}),
            LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", memory_limit="400MB"
            ) as cl,
            Client(cl),
        ):
            for r in range(rounds + 1):
                for name, kw in variants.items():
                    t = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        est = daskem.GaussianMixture(k, covariance_type="diag", random_state=0, cache=False, **kw).fit(
                            str(store)
                        )
                    dt = time.perf_counter() - t
                    if r:  # the first round warms up
                        times[name].append(dt)
                    info[name] = {"passes": int(est.n_passes_), "loglik": float(est.lower_bound_)}
    out = {"rows": rows, "D": d, "K": k, "store_MB": rows * d * 8 / 1e6, "rounds": rounds}
    for name in variants:
        out[name] = {**info[name], "seconds": times[name], "median_s": statistics.median(times[name])}
    out["time_ratio"] = out["new"]["median_s"] / out["old"]["median_s"]
    return out


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--covs", nargs="+", default=list(COVS))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out-of-core", action="store_true")
    ap.add_argument(
        "--ooc-only", action="store_true", help="only the out-of-core section (the JSON keeps its earlier cases)"
    )
    ap.add_argument("--ooc-rows", type=int, default=1_000_000)
    ap.add_argument("--ooc-rounds", type=int, default=3, help="timed rounds of the out-of-core section")
    ap.add_argument(
        "--c", nargs="*", default=[], metavar="KEY=VALUE", help="options of (c) other than the defaults (tuning)"
    )
    ap.add_argument("--from-json", metavar="PATH", help="print the table and targets of an earlier run")
    ap.add_argument("--markdown", action="store_true", help="with --from-json: README's table")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "passes.json"))
    args = ap.parse_args(argv)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        res["summary"] = summarise(res["cases"]) if res["cases"] else {}
        if args.markdown:
            print(markdown(res["cases"]))
        elif res["cases"]:
            print_table(res["cases"], res["summary"])
            print_targets(res["summary"], res.get("out_of_core"))
        else:
            print_targets({}, res.get("out_of_core"))
        return res
    c_options = {}
    for kv in args.c:
        key, value = kv.split("=", 1)
        c_options[key] = None if value == "None" else json.loads(value) if value[0] in "0123456789.-" else value
    t0 = time.perf_counter()
    cases: list[dict] = []
    if not args.ooc_only:
        for name in args.datasets:
            X, k = load(name)
            for cov in args.covs:
                for seed in range(args.seeds):
                    row = {"data": name, "N": X.shape[0], "D": X.shape[1], "K": k, "cov": cov, "seed": seed}
                    row.update(case(X, k, cov, seed, c_options))
                    cases.append(row)
                    print(
                        f"# {name} {cov} {seed}: passes a/b/c {row['a']['passes']}/{row['b']['passes']}/"
                        f"{row['c']['passes']}, gap {row['gap']:.2e}, to target {row['to_target']['plain']}/"
                        f"{row['to_target']['squarem']}  ({time.perf_counter() - t0:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
    earlier = {}
    if args.ooc_only and args.json and Path(args.json).exists():
        earlier = json.loads(Path(args.json).read_text())
        cases = earlier.get("cases", [])  # keep the earlier run's cases
    summary = summarise(cases) if cases else {}
    ooc = out_of_core(args.ooc_rows, args.ooc_rounds) if (args.out_of_core or args.ooc_only) else None
    res = {
        "command": "PYTHONPATH=$PWD python benchmarks/passes.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "defaults": {"accelerate": daskem.GaussianMixture().accelerate, "tol": daskem.GaussianMixture().tol},
        "targets": TARGETS,
        "summary": summary,
        "out_of_core": ooc,
        "cases": cases,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if earlier.get("cases"):
        res["cases_command"] = earlier.get("cases_command", earlier.get("command"))
    if cases:
        print_table(cases, summary)
    print_targets(summary, ooc)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1, default=float) + "\n")
    return res


if __name__ == "__main__":
    main()
