"""daskem speed and memory benchmark: one run measures everything, side by side.

Usage::

    python benchmarks/run.py [--quick] [--out benchmarks/results/latest.json]
    python benchmarks/run.py --only a,b,e       # some sections (limits,a,b,c,d,e,f,fit,sweep)

Sections of the JSON (and the printed table):

``limits`` (section ``limits``)
    The machine's floor: BLAS GFLOP/s for the tall-skinny shapes the kernel
    uses (rows x D @ D x D and rows x D @ D x K*D, on cache-sized row blocks,
    every core busy, one BLAS thread per core), at float64 and float32; the
    streaming-read bandwidth of memory (every core summing its part of a
    256 MiB float64 array); and (section ``d``) the read + decompress rate of
    the out-of-core Zarr store through the same Dask cluster.
``cases``
    Seconds per EM iteration from the same initial parameters on the same
    data, timed in turn: daskem on a two-worker ``LocalCluster`` (the data
    persisted there, ``daskem``), daskem in process on the numpy array
    (``daskem_in_process``: what ``GaussianMixture().fit(X)`` does without a
    client), oneDAL (``onedal``: ``daal4py.em_gmm``, when daal4py imports;
    see :class:`OneDAL`) and scikit-learn (``sklearn``: its ``_e_step`` +
    ``_m_step`` after an untimed ``fit(max_iter=1)`` from the same
    parameters); for (a) and (b) also the cluster's passes as scheduler tasks
    (``daskem_tasks``: short passes over persisted data otherwise go straight
    to the workers, ``engine.ACTOR_PASS_SECONDS``). Cases: (a) N=1e6 D=16 K=8
    full, (b) diag, (c) N=2e5 D=64 K=16 full, (e) N=2e5 D=256 K=64 diag and
    full (full on the first 20,000 rows by default, ``--e-full-rows``), (f)
    N=1e6 D=32 K=256 diag; (d) out
    of core (a store larger than the workers' memory limits), daskem only.
    The wide cases start near the generating centres (:func:`wide_init`).
    Plus daskem's achieved GFLOP/s, the BLAS limit of full's E-step shape and
    the streaming read of diag's data, each timed in turn with the passes,
    and peak memory.
``time_to_model`` (section ``fit``)
    ``fit`` with each library's defaults on (a)'s data, full and diag, seeds
    0-4 in turn: median seconds and median mean log-likelihood, every model
    scored by one function (:func:`mean_loglik`).
``chunk_sweep`` (section ``sweep``)
    ``chunk_sweep.sweep``: per-pass time of one 1e6 x 16 array cut into 16
    ... 50,000 chunks, and on paper the scheduling of a 10 TB / 1,000-worker
    pass at the measured per-task cost (and at the issue's 0.12 ms).
``ratios`` and ``targets``
    daskem (cluster and in process) / oneDAL and / scikit-learn, GFLOP/s /
    BLAS limit, bandwidth bound / s_per_iter, out-of-core s/iter / read
    bound, n_init=4 / n_init=1, float32 / float64, two workers / one,
    time-to-model ratios; ``targets`` lists issue 15's targets with the
    value and whether it is met.

The machine is shared and its speed drifts by 20% or more within a minute,
so every comparison is timed *in turn*: the variants compared each run a
few iterations, then the next, for several rounds, after one untimed
warm-up call of each (not of oneDAL and scikit-learn in the heavy cases).
``s_per_iter`` is the median over every timed iteration, ``best_s_per_iter``
the fastest; the ratios use medians. Per-iteration figures are plain EM
(``accelerate=None``), whatever ``GaussianMixture``'s default; the time to a
model uses the defaults (``daskem_accelerate_default`` records which).
A peer that fails (oneDAL stops on a covariance it cannot factor) is
dropped with its error; a section that fails is recorded under ``errors``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # chunk_sweep
os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")

import dask  # noqa: E402
import dask.array as da  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from daskem import _blas, _fitloop  # noqa: E402
from daskem import _engine as engine  # noqa: E402
from daskem import _gaussian as g  # noqa: E402
from daskem._gaussian_model import GaussianModel  # noqa: E402

BLOCK = g.DEFAULT_BLOCK_ROWS


# --------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------


def sizes(quick: bool) -> dict:
    if quick:
        return {
            "a": (20_000, 4, 3),
            "c": (8_000, 6, 4),
            "ooc_n": 80_000,
            "ooc_dk": (4, 3),
            "ooc_memory_limit": "400MB",
            "ooc_chunk_rows": 10_000,
            "rounds": 1,
            "per_call": 1,
            "limit_rows": 20_000,
            "blas_seconds": 0.05,
            "chunk_bytes": 2**18,
            "bandwidth_bytes": 2**24,
            "e": (4_000, 12, 4),
            "e_full_n": 3_000,
            "f": (10_000, 6, 12),
            "wide_rounds": 1,
            "wide_per_call": 1,
            "fit_n": 20_000,
            "fit_seeds": 2,
            "fit_onedal_init_rows": 5_000,
            "sweep": (40_000, 16, 8),
            "sweep_counts": (16, 256, 1024),
            "sweep_rounds": 1,
            "sweep_before_rounds": 1,
            "sweep_before_max": 256,
        }
    return {
        "a": (1_000_000, 16, 8),
        "c": (200_000, 64, 16),
        # 7e6 x 16 float64 = 896 MB > 2 workers x 400 MB
        "ooc_n": 7_000_000,
        "ooc_dk": (16, 8),
        "ooc_memory_limit": "400MB",
        "ooc_chunk_rows": 262_144,
        # every variant is timed `rounds` times in turn with the others, `per_call`
        # iterations each time
        "rounds": 3,
        "per_call": 2,
        "blas_seconds": 0.4,
        "limit_rows": 1_000_000,
        "chunk_bytes": None,
        # a float64 array well beyond the caches for the streaming-read bandwidth
        "bandwidth_bytes": 2**28,
        # wide cases: (e) 2e5 x 256, K=64 (diag on every row; full on the first
        # e_full_n rows: 2 K D^2 = 8.4 MFLOP a row, one iteration of one library on
        # 2e5 rows takes about a minute on two cores, and the run would not end in
        # minutes); (f) 1e6 x 32, K=256 diag. wide_rounds x wide_per_call timed
        # iterations per variant (e full: wide_rounds x 1).
        "e": (200_000, 256, 64),
        "e_full_n": 20_000,
        "f": (1_000_000, 32, 256),
        "wide_rounds": 2,
        "wide_per_call": 2,
        # time to a model: the (a) data, every row, seeds 0..fit_seeds-1
        "fit_n": 1_000_000,
        "fit_seeds": 5,
        # oneDAL's default initialisation (200 EM iterations) on this many random rows
        "fit_onedal_init_rows": 50_000,
        # the chunk-count sweep (chunk_sweep.sweep): one 1e6 x 16 K=8 diag array
        "sweep": (1_000_000, 16, 8),
        "sweep_counts": (16, 256, 2048, 8192, 50_000),
        "sweep_rounds": 3,
        "sweep_before_rounds": 2,
        "sweep_before_max": 256,
    }


# --------------------------------------------------------------------------
# data and initial parameters
# --------------------------------------------------------------------------


def make_store(path: Path, n: int, d: int, k: int, chunk_rows: int, seed: int = 0) -> None:
    """A Gaussian mixture written chunk by chunk to a Zarr array (never whole in memory)."""
    import zarr

    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(k, d))
    scales = rng.uniform(0.5, 1.5, size=(k, d))
    arr = zarr.create_array(str(path), shape=(n, d), chunks=(chunk_rows, d), dtype="f8", overwrite=True)
    for start in range(0, n, chunk_rows):
        m = min(chunk_rows, n - start)
        lab = rng.integers(0, k, size=m)
        arr[start : start + m] = centres[lab] + rng.standard_normal((m, d)) * scales[lab]


def init_params(X: np.ndarray, k: int, ctype: str, seed: int) -> g.GaussianParams:
    """Means on random rows, the sample covariance for every component."""
    rng = np.random.default_rng(seed)
    sample = X[rng.choice(len(X), min(len(X), 20_000), replace=False)]
    means = sample[rng.choice(len(sample), k, replace=False)]
    cov = np.cov(sample.T) + 1e-3 * np.eye(X.shape[1])
    cov = {
        "full": np.stack([cov] * k),
        "tied": cov,
        "diag": np.stack([np.diag(cov)] * k),
        "spherical": np.full(k, np.diag(cov).mean()),
    }[ctype]
    return g.GaussianParams.from_covariances(np.full(k, 1.0 / k), means, cov, ctype)


# --------------------------------------------------------------------------
# memory sampling
# --------------------------------------------------------------------------


class PeakMemory:
    """Samples the RSS of some processes every few ms; keeps the maximum of each."""

    def __init__(self, pids: dict[str, int], interval: float = 0.02):
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = {name: 0 for name in pids}
        self.interval = interval
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, p in self.procs.items():
                try:
                    self.peak[name] = max(self.peak[name], p.memory_info().rss)
                except psutil.Error:
                    pass
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def mib(self) -> dict[str, float]:
        return {k: round(v / 2**20, 1) for k, v in self.peak.items()}


def cluster_pids(client) -> dict[str, int]:
    pids = {"client": os.getpid()}
    for i, (_addr, pid) in enumerate(sorted(client.run(os.getpid).items())):
        pids[f"worker{i}"] = pid
    return pids


# --------------------------------------------------------------------------
# machine limits
# --------------------------------------------------------------------------


def blas_rate(rows: int, d_in: int, d_out: int, dtype: str, threads: int, seconds: float = 0.4) -> float:
    """GFLOP/s of ``block @ W`` over row blocks, ``threads`` threads x one BLAS thread each."""
    rng = np.random.default_rng(0)
    per = max(BLOCK, rows // threads)
    xs = [rng.standard_normal((per, d_in)).astype(dtype) for _ in range(threads)]
    w = rng.standard_normal((d_in, d_out)).astype(dtype)

    def work(x: np.ndarray) -> int:
        n = 0
        with _blas.single_threaded_blas():
            t_end = time.perf_counter() + seconds
            while time.perf_counter() < t_end:
                for s in range(0, len(x), BLOCK):
                    x[s : s + BLOCK] @ w
                n += len(x)
        return n

    with ThreadPoolExecutor(threads) as ex:
        ex.submit(work, xs[0][:BLOCK]).result()  # warm up
        t0 = time.perf_counter()
        done = sum(ex.map(work, xs))
        dt = time.perf_counter() - t0
    return 2.0 * done * d_in * d_out / dt / 1e9


def machine_limits(shapes: list[tuple[int, int]], rows: int, threads: int, seconds: float) -> dict:
    """BLAS GFLOP/s with every core busy (one BLAS thread per core)."""
    out = {}
    for d, k in shapes:
        for dtype in ("float64", "float32"):
            out[f"gemm_rows_x_{d}_at_{d}x{d}_{dtype}"] = round(blas_rate(rows, d, d, dtype, threads, seconds), 2)
            out[f"gemm_rows_x_{d}_at_{d}x{k * d}_{dtype}"] = round(
                blas_rate(rows, d, k * d, dtype, threads, seconds), 2
            )
    return out


def blas_scaling(d: int, k: int, rows: int, threads: int, seconds: float) -> dict:
    """How the BLAS rate scales from one core to every core: the ceiling of any parallel speed-up.

    Best of three of each, alternated, so that a noisy neighbour hurts both alike.
    """
    one, every = [], []
    for _ in range(3):
        one.append(blas_rate(rows, d, k * d, "float64", 1, seconds))
        every.append(blas_rate(rows, d, k * d, "float64", threads, seconds))
    return {
        "shape": f"rows x {d} @ {d} x {k * d} float64",
        "one_core_GFLOPs": round(max(one), 2),
        f"{threads}_cores_GFLOPs": round(max(every), 2),
        "speedup": round(max(every) / max(one), 2),
    }


def read_seconds(path: Path) -> float:
    """Seconds to read and decompress a whole Zarr store through the active Dask scheduler."""
    x = da.from_zarr(str(path))
    t0 = time.perf_counter()
    x.sum().compute()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------
# flops of the kernel (per row, per parameter set)
# --------------------------------------------------------------------------


def kernel_flops_per_row(ctype: str, d: int, k: int, stacked: bool = False) -> float:
    """Useful flops of one row (what a careful hand count gives), the same for every kernel of a type.

    full: the fewest flops of a per-component dense E-step and scatter: per
    component the triangular ``(x - mu_k) U_k`` (D^2), the shift, squares and
    sums (3 D), ``sqrt(q) z`` (D), the one-triangle scatter (D (D+1)) and
    first moments (2 D). That is what the wide kernel executes; the
    outer-product kernel's two products over the ``D (D+3) / 2 + 1`` features
    come within 2% of it (D=16 K=8: 4,992 against 5,100). With ``stacked``
    (the count of runs before 2026-12-02 below D=64, and of the stacked
    kernel, which computes both halves of every product): the E-step
    ``[z,1] @ W`` (2 K D (D+1)), squares and sums (2 K D), the ``q``-weighted
    rows (K D), the whole scatter (2 K D^2) and first moments (2 K D), about
    twice as many.
    tied: the stacked count.
    diag/spherical: E-step ``[z*z, z, 1] @ W`` (2 K (2D+1)), the design (2 D)
    and both moments in one product (2 K 2D).
    """
    if ctype == "full" and not stacked:
        return k * (d * d + 3 * d + d + d * (d + 1) + 2 * d)
    if ctype in ("full", "tied"):
        return 2 * k * d * (d + 1) + 2 * k * d + k * d + 2 * k * d * d + 2 * k * d
    return 2 * k * (2 * d + 1) + 2 * d + 4 * k * d


# --------------------------------------------------------------------------
# timing EM
# --------------------------------------------------------------------------


def em_iterations(
    Xd: da.Array,
    params: list[g.GaussianParams],
    iters: int,
    dtype: str = "float64",
    workers: list[str] | None = None,
    tasks: bool = False,
) -> dict:
    """Seconds of each of ``iters`` EM iterations (pass + M-step) of the engine.

    One more iteration runs first and is not counted: its set-up, as oneDAL's
    (``t(1 + n) - t(1)``) and scikit-learn's (an untimed ``fit(max_iter=1)``)
    are not counted. In process it is ~0.08 s slower than the next ones on this
    VM (the forked workers' first pass after being idle); on the cluster it is
    not slower. Time to a model (``time_to_model``) charges everything.

    ``workers`` pins every task of the passes to those workers (the one-worker
    comparison inside the two-worker cluster). With a distributed client, the
    chunk tasks' compute seconds of every pass are recorded too. Passes over
    persisted data go straight to the workers when short
    (``engine.ACTOR_PASS_SECONDS``); ``tasks=True`` makes every pass tasks
    through the scheduler, as before that path (and the only way the task
    stream sees the kernel's seconds).
    """
    model = GaussianModel(dtype=dtype)
    runs = [_fitloop.Run(p) for p in params]
    secs: list[float] = []
    client = engine._active_client()
    stream = contextlib.nullcontext(None)
    if client is not None:
        from distributed import get_task_stream

        stream = get_task_stream(client)
    pin = dask.annotate(workers=workers, allow_other_workers=False) if workers else contextlib.nullcontext()
    actor_seconds = engine.ACTOR_PASS_SECONDS
    if tasks:
        engine.ACTOR_PASS_SECONDS = 0.0
    # the client's M-steps with one BLAS thread, as in ``fit``
    try:
        with warnings.catch_warnings(), stream as ts, pin, _blas.single_threaded_blas():
            warnings.simplefilter("ignore", RuntimeWarning)
            _fitloop.iterate(
                _fitloop.Passes(Xd, model),
                model,
                runs,
                tol=-1.0,
                max_iter=iters + 1,
                callback=lambda info: secs.append(info.seconds),
            )
    finally:
        engine.ACTOR_PASS_SECONDS = actor_seconds
    # history[-1] is the log-likelihood of the parameters after iters M-steps
    out = {"all_s": secs[1:], "first_s": secs[0], "loglik": runs[0].history[-1], "loglik_m_steps": iters}
    if ts is not None:
        out["kernel_task_s"] = kernel_task_seconds(ts.data)[1:]
    return out


def interleaved(
    variants: dict,
    rounds: int,
    pids: dict[str, int] | None = None,
    cold: frozenset[str] = frozenset(),
    optional: frozenset[str] = frozenset({"onedal", "sklearn"}),
) -> dict:
    """Time several variants in turn, ``rounds`` times, so that a slow spell of a
    shared machine falls on all of them alike (one warm-up call of each first).

    Each variant is a callable returning :func:`em_iterations`' dict (or
    ``{"all_s": [seconds]}``). Returns, per variant, the median and best
    seconds over every sample, the samples, and the peak memory (MiB) of the
    processes in ``pids`` over its calls. Variants named in ``cold`` are not
    warmed up (a peer's iteration that takes seconds has nothing to warm).

    A peer's variant (``optional``) that raises is dropped and its error kept
    (``{"error": ...}``): oneDAL stops on a component whose covariance it
    cannot factor, and the rest of the run goes on.
    """
    samples: dict[str, dict] = {name: {"all_s": [], "kernel_task_s": [], "peak_MiB": {}} for name in variants}
    failed: dict[str, str] = {}

    def call(name: str, f) -> dict | None:
        if name in failed:
            return None
        try:
            return f()
        except Exception as exc:
            if name not in optional:
                raise
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"  {name} failed, dropped: {failed[name]}", file=sys.stderr, flush=True)
            return None

    for name, f in variants.items():
        if name not in cold:
            call(name, f)  # warm-up: caches, imports, the first graph
    for _ in range(rounds):
        for name, f in variants.items():
            mem = PeakMemory(pids) if pids else contextlib.nullcontext()
            with mem as m:
                r = call(name, f)
            if r is None:
                continue
            acc = samples[name]
            acc["all_s"] += r["all_s"]
            acc["kernel_task_s"] += r.get("kernel_task_s") or []
            if "first_s" in r:
                acc.setdefault("first_s", []).append(r["first_s"])
            for key in ("loglik", "loglik_m_steps"):
                if key in r:
                    acc[key] = r[key]
            if m is not None:
                for k, v in m.mib().items():
                    acc["peak_MiB"][k] = max(acc["peak_MiB"].get(k, 0.0), v)
    out: dict = {}
    for name, acc in samples.items():
        if name in failed or not acc["all_s"]:
            out[name] = {"error": failed.get(name, "no samples")}
            continue
        row = {
            "s_per_iter": round(statistics.median(acc["all_s"]), 6),
            "best_s_per_iter": round(min(acc["all_s"]), 6),
            "all_s": [round(x, 6) for x in acc["all_s"]],
        }
        for key in ("loglik", "loglik_m_steps"):
            if key in acc:
                row[key] = acc[key]
        if acc.get("first_s"):
            # each call's uncounted first iteration (see :func:`em_iterations`)
            row["first_iteration_s"] = round(statistics.median(acc["first_s"]), 6)
        if acc["kernel_task_s"]:
            row["kernel_task_s_per_iter"] = round(statistics.median(acc["kernel_task_s"]), 4)
        if acc["peak_MiB"]:
            row["peak_MiB"] = acc["peak_MiB"]
        out[name] = row
    return out


def kernel_task_seconds(records: list[dict]) -> list[float]:
    """Per pass, the summed compute seconds of its chunk tasks.

    A chunk task is the kernel on one chunk (with the chunk's read when the
    data are streamed, and the first level of the ``sum``, which Dask fuses
    into it); the tree-reduction levels (``sum-partial``, ``sum-aggregate``)
    and the parameter task are left out.
    """
    passes: dict[str, float] = {}
    for r in records:
        key = r["key"]
        name = key[0] if isinstance(key, tuple) else str(key)
        if name.startswith(("daskem-pass-params", "finalize")) or "partial" in name or "aggregate" in name:
            continue
        for ss in r["startstops"]:
            if ss["action"] == "compute":
                passes[name] = passes.get(name, 0.0) + ss["stop"] - ss["start"]
    return list(passes.values())


# --------------------------------------------------------------------------
# peers: oneDAL, scikit-learn in turn; daskem in process
# --------------------------------------------------------------------------


def onedal_module() -> tuple[object | None, str]:
    """``daal4py`` (oneDAL's Python API, from scikit-learn-intelex) or None, and why not."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        import daal4py

        v = "?"
        for dist in ("daal4py", "scikit-learn-intelex"):
            try:
                v = f"{dist} {version(dist)}"
                break
            except PackageNotFoundError:
                continue
        return daal4py, v
    except Exception as exc:  # noqa: BLE001 - any import failure means "not measured"
        return None, f"daal4py not importable ({type(exc).__name__}: {exc}); oneDAL not measured"


class OneDAL:
    """oneDAL's EM (``daal4py.em_gmm``) from given parameters, timed per iteration.

    Each call runs ``em_gmm`` with ``maxIterations=1`` and then ``1 + iters``
    (``accuracyThreshold=0``: every iteration is run) from the same initial
    parameters; seconds per iteration = the difference / ``iters``, so that
    oneDAL's input checks and set-up are not charged to its iterations.
    ``regularizationFactor`` is scikit-learn's ``reg_covar`` default (1e-6).
    oneDAL runs on every core (its own threads).
    """

    def __init__(self, d4p, X: np.ndarray, p: g.GaussianParams):
        self.d4p = d4p
        self.X = np.ascontiguousarray(X, dtype=np.float64)
        self.k = p.n_components
        self.storage = "full" if p.covariance_type == "full" else "diagonal"
        self.w = np.ascontiguousarray(p.weights[None, :], dtype=np.float64)
        self.means = np.ascontiguousarray(p.means, dtype=np.float64)
        cov = p.covariances
        self.covs = [np.ascontiguousarray(c if self.storage == "full" else c[None, :]) for c in cov]
        self.goal: float | None = None

    def run(self, iters: int) -> float:
        algo = self.d4p.em_gmm(
            nComponents=self.k,
            maxIterations=iters,
            accuracyThreshold=0.0,
            covarianceStorage=self.storage,
            regularizationFactor=1e-6,
        )
        t0 = time.perf_counter()
        res = algo.compute(self.X, self.w, self.means, self.covs)
        dt = time.perf_counter() - t0
        self.goal = float(np.asarray(res.goalFunction).ravel()[0]) / len(self.X)
        return dt

    def __call__(self, iters: int) -> dict:
        t1 = self.run(1)
        tn = self.run(1 + iters)
        return {"all_s": [(tn - t1) / iters], "onedal_mean_loglik": self.goal}


class Sklearn:
    """scikit-learn's EM loop body (``_e_step`` + ``_m_step``) from given parameters, timed in turn.

    Initialised with the same parameters (one ``fit`` with ``max_iter=1``,
    untimed); each call continues the same path for ``iters`` iterations.
    ``by_steps[i]`` is the mean log-likelihood after ``i`` M-steps.
    """

    def __init__(self, X: np.ndarray, p: g.GaussianParams):
        from sklearn.mixture import GaussianMixture

        self.X = X
        self.gm = GaussianMixture(
            p.n_components,
            covariance_type=p.covariance_type,
            weights_init=p.weights,
            means_init=p.means,
            precisions_init=p.precisions,
            max_iter=1,
            tol=0.0,
            random_state=0,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.gm.fit(X)
        self.by_steps = [float(self.gm.lower_bound_)]

    def __call__(self, iters: int) -> dict:
        secs = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(iters):
                t0 = time.perf_counter()
                log_prob_norm, log_resp = self.gm._e_step(self.X)
                self.gm._m_step(self.X, log_resp)
                secs.append(time.perf_counter() - t0)
                self.by_steps.append(float(log_prob_norm))
        return {"all_s": secs}


def in_process_data(X: np.ndarray, ctype: str) -> da.Array:
    """numpy input as ``GaussianMixture().fit(X)`` without a client passes over it: in process, all cores."""
    order = GaussianModel(covariance_type=ctype).chunk_order
    with dask.config.set(scheduler="threads"):
        local, _ = engine.prepare_data(engine.local_array(X), "auto", in_memory=True, order=order)
        assert engine.in_process_blocks(local) is not None
    return local


def in_process_iterations(local: da.Array, params: list[g.GaussianParams], iters: int) -> dict:
    """:func:`em_iterations` in process, as ``fit`` runs them (Dask's local scheduler setting: no graphs,
    the passes in the engine's forked worker processes, :func:`daskem._engine.local_workers`)."""
    with dask.config.set(scheduler="threads"), _blas.single_threaded_blas(), engine.local_workers(local):
        return em_iterations(local, params, iters)


def stream_bandwidth(a: np.ndarray, threads: int, seconds: float) -> float:
    """GB/s of a streaming read of the C-contiguous array ``a`` (larger than the caches), every core busy.

    Each thread sums its own part (``np.add.reduce`` releases the GIL),
    repeatedly for ``seconds``; the best of three.
    """
    parts = np.array_split(np.ascontiguousarray(a).reshape(-1), threads)

    def work(x: np.ndarray) -> int:
        n = 0
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            np.add.reduce(x)
            n += x.nbytes
        return n

    best = 0.0
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(3):
            t0 = time.perf_counter()
            done = sum(ex.map(work, parts))
            best = max(best, done / (time.perf_counter() - t0) / 1e9)
    return best


def mean_loglik(X: np.ndarray, weights: np.ndarray, means: np.ndarray, covariances: np.ndarray, ctype: str) -> float:
    """The one scorer of every library's model: mean log-likelihood of the rows (daskem's density, float64)."""
    from scipy.special import logsumexp

    p = g.GaussianParams.from_covariances(
        np.asarray(weights).ravel(), np.asarray(means), np.asarray(covariances), ctype
    )
    total = 0.0
    for s in range(0, len(X), 200_000):
        total += float(logsumexp(g.estimate_weighted_log_prob(X[s : s + 200_000], p), axis=1).sum())
    return total / len(X)


def time_to_model(X: np.ndarray, k: int, ctype: str, seeds: int, d4p, onedal_init_rows: int) -> dict:
    """``fit`` with each library's defaults (initialisation and convergence included), seed by seed in turn.

    daskem: ``GaussianMixture(k, covariance_type=ctype, random_state=seed).fit(X)`` (numpy input, no
    client: in process). scikit-learn: the same call of ``sklearn.mixture.GaussianMixture``. oneDAL:
    ``em_gmm_init(nComponents=k, engine=engines_mt19937(seed=seed))`` (its default initialisation: 20 trials of 10 EM
    iterations from random rows, the best kept) on ``onedal_init_rows`` random rows (on all 1e6 rows its
    200 EM iterations took 40 s at 2e5 rows here, minutes at 1e6), then ``em_gmm(nComponents=k)`` with its
    defaults (at most 10 iterations, accuracyThreshold 1e-4) on every row; the sampling, both calls timed.
    Every model is scored by :func:`mean_loglik` on the same rows.
    """
    from sklearn.mixture import GaussianMixture as SkGM

    import daskem

    out: dict = {"daskem": [], "sklearn": [], "onedal": []}
    storage = "full" if ctype == "full" else "diagonal"
    for seed in range(seeds):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            m = daskem.GaussianMixture(k, covariance_type=ctype, random_state=seed).fit(X)
            dt = time.perf_counter() - t0
            out["daskem"].append(
                {
                    "s": dt,
                    "loglik": mean_loglik(X, m.weights_, m.means_, m.covariances_, ctype),
                    "n_iter": int(m.n_iter_),
                    "n_passes": int(getattr(m, "n_passes_", -1)),
                }
            )
            t0 = time.perf_counter()
            s = SkGM(k, covariance_type=ctype, random_state=seed).fit(X)
            dt = time.perf_counter() - t0
            out["sklearn"].append(
                {
                    "s": dt,
                    "loglik": mean_loglik(X, s.weights_, s.means_, s.covariances_, ctype),
                    "n_iter": int(s.n_iter_),
                }
            )
        if d4p is not None:
            t0 = time.perf_counter()
            try:
                engine = d4p.engines_mt19937(seed=seed)
                Xi = X
                if len(X) > onedal_init_rows:
                    Xi = X[np.sort(np.random.default_rng(seed).choice(len(X), onedal_init_rows, replace=False))]
                init = d4p.em_gmm_init(nComponents=k, engine=engine, covarianceStorage=storage).compute(Xi)
                r = d4p.em_gmm(nComponents=k, covarianceStorage=storage).compute(
                    X, init.weights, init.means, init.covariances
                )
                dt = time.perf_counter() - t0
                covs = np.array([np.asarray(c) for c in r.covariances])
                covs = covs.reshape(k, -1) if ctype == "diag" else covs
                out["onedal"].append(
                    {
                        "s": dt,
                        "loglik": mean_loglik(X, r.weights, r.means, covs, ctype),
                        "n_iter": int(np.asarray(r.nIterations).ravel()[0]),
                    }
                )
            except RuntimeError as exc:
                out["onedal"].append({"s": time.perf_counter() - t0, "error": str(exc).splitlines()[0]})
    summary: dict = {"N": X.shape[0], "D": X.shape[1], "K": k, "covariance_type": ctype, "seeds": seeds}
    summary["onedal_init_rows"] = min(len(X), onedal_init_rows)
    summary["daskem_accelerate_default"] = daskem.GaussianMixture().accelerate
    for lib, runs in out.items():
        ok = [r for r in runs if "loglik" in r]
        if not ok:
            continue
        summary[lib] = {
            "median_s": round(statistics.median(r["s"] for r in ok), 3),
            "median_loglik": statistics.median(r["loglik"] for r in ok),
            "runs": runs,
        }
    return summary


def wide_init(centres: np.ndarray, k: int, ctype: str, seed: int) -> g.GaussianParams:
    """Means near the generating centres, the generating scale's mean variance on the diagonal.

    From random rows, D=256 components take their rows so unevenly after one
    step (a few dozen rows for some) that their full covariances are singular
    and oneDAL stops; started near the generator every component keeps about
    N/K rows and every library runs the iterations asked for.
    """
    rng = np.random.default_rng(seed)
    d = centres.shape[1]
    means = centres + rng.normal(scale=0.1, size=centres.shape)
    var = (0.5**2 + 0.5 * 1.5 + 1.5**2) / 3  # E[s^2], s ~ U(0.5, 1.5): make_store's scales
    cov = {"full": np.stack([np.eye(d) * var] * k), "diag": np.full((k, d), var)}[ctype]
    return g.GaussianParams.from_covariances(np.full(k, 1.0 / k), means, cov, ctype)


def store_centres(k: int, d: int, seed: int) -> np.ndarray:
    """The centres :func:`make_store` draws first with the same seed."""
    return np.random.default_rng(seed).normal(scale=3.0, size=(k, d))


# --------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------

SECTIONS = ("limits", "a", "b", "c", "d", "e", "f", "fit", "sweep")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latest.json"))
    ap.add_argument("--workdir", default=None, help="where the Zarr stores go (default: a temp dir)")
    ap.add_argument("--no-sklearn", action="store_true", help="skip scikit-learn (daskem only)")
    ap.add_argument("--no-onedal", action="store_true", help="skip oneDAL even if daal4py imports")
    ap.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: all)",
    )
    ap.add_argument("--rounds", type=int, default=None, help="rounds of (a)-(d) (default 3; --quick 1)")
    ap.add_argument(
        "--e-full-rows",
        type=int,
        default=None,
        help="rows of case (e) full (default 20,000: at N=2e5 one iteration of one library takes minutes)",
    )
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = sorted(set(only) - set(SECTIONS))
    if bad:
        ap.error(f"unknown sections {bad}; choose from {','.join(SECTIONS)}")
    sel = set(only)
    S = sizes(args.quick)
    if args.e_full_rows:
        S["e_full_n"] = args.e_full_rows
    if args.rounds:
        S["rounds"] = args.rounds
    cores = os.cpu_count() or 1
    from distributed import Client, LocalCluster

    d4p, d4p_note = (None, "--no-onedal") if args.no_onedal else onedal_module()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="daskem-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res: dict = {
        "meta": {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.node(),
            "cpu": platform.processor() or platform.machine(),
            "cores": cores,
            "ram_GiB": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_start": list(os.getloadavg()),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "dask": dask.__version__,
            "quick": args.quick,
            "sections": [s for s in SECTIONS if s in sel],
            "block_rows": BLOCK,
            "diag_block_rows": {
                "b": g.diag_block_rows(16, 8),
                "e": g.diag_block_rows(256, 64),
                "f": g.diag_block_rows(32, 256),
            },
            "blas_thread_limit": _blas.blas_limit_available(),
            "onedal": d4p_note,
        },
        "limits": {},
        "cases": {},
        "ratios": {},
        "targets": {},
    }
    n_a, d_a, k_a = S["a"]
    n_c, d_c, k_c = S["c"]
    d_o, k_o = S["ooc_dk"]
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    import zarr

    from daskem.cli import local_cluster_config
    from daskem.io import open_array

    # the clusters are configured as the ones daskem starts (`daskem.cli.local_cluster_config`:
    # distributed's worker profiler off unless DASKEM_WORKER_PROFILE=1)
    cluster_config = local_cluster_config()
    res["meta"]["cluster_config"] = cluster_config

    try:
        # ---- data -----------------------------------------------------------
        log("writing stores ...")
        small = args.quick
        stores: dict[str, Path] = {}
        if sel & {"a", "b", "fit"}:
            stores["a"] = work / "a.zarr"
            make_store(stores["a"], n_a, d_a, k_a, min(n_a, 262_144 if not small else 5_000))
        if "c" in sel:
            stores["c"] = work / "c.zarr"
            make_store(stores["c"], n_c, d_c, k_c, min(n_c, 65_536 if not small else 2_000), seed=1)
        if "e" in sel:
            n_e, d_e, k_e = S["e"]
            stores["e"] = work / "e.zarr"
            stores["e_full"] = work / "e_full.zarr"
            make_store(stores["e"], n_e, d_e, k_e, min(n_e, 16_384 if not small else 2_000), seed=4)
            make_store(stores["e_full"], S["e_full_n"], d_e, k_e, min(S["e_full_n"], 4_096), seed=4)
        if "f" in sel:
            n_f, d_f, k_f = S["f"]
            stores["f"] = work / "f.zarr"
            make_store(stores["f"], n_f, d_f, k_f, min(n_f, 131_072 if not small else 5_000), seed=5)
        if "d" in sel:
            stores["o"] = work / "ooc.zarr"
            stores["o4"] = work / "ooc_quarter.zarr"
            make_store(stores["o"], S["ooc_n"], d_o, k_o, S["ooc_chunk_rows"], seed=2)
            make_store(stores["o4"], S["ooc_n"] // 4, d_o, k_o, S["ooc_chunk_rows"], seed=3)
        mem = {
            name: np.asarray(zarr.open_array(str(path))[:])
            for name, path in stores.items()
            if name in ("a", "c", "e", "f")
        }
        mem.update({"e_full": np.asarray(zarr.open_array(str(stores["e_full"]))[:])} if "e_full" in stores else {})

        # ---- limits ---------------------------------------------------------
        if "limits" in sel:
            log("measuring BLAS limits and the memory bandwidth ...")
            res["limits"]["blas_gflops"] = machine_limits(
                sorted({(d_a, k_a), (d_c, k_c)}), S["limit_rows"], cores, S["blas_seconds"]
            )
            res["limits"]["blas_scaling"] = blas_scaling(d_a, k_a, S["limit_rows"], cores, S["blas_seconds"])
            big = np.random.default_rng(0).standard_normal(S["bandwidth_bytes"] // 8)
            bw = stream_bandwidth(big, cores, S["blas_seconds"])
            del big
            res["limits"]["stream_read"] = {
                "GB_per_s": round(bw, 2),
                "bytes": S["bandwidth_bytes"],
                "how": "every core sums its part of one float64 array (np.add.reduce), best of 3",
            }

        # ---- in-memory cases on a 2-worker cluster: daskem on the cluster and in
        # process, oneDAL and scikit-learn, in turn --------------------------------
        def open_persisted(path: Path, ctype: str) -> da.Array:
            """The store, cached on the workers as ``GaussianMixture(cache=True)`` does."""
            from distributed import wait

            order = "F" if ctype in ("diag", "spherical") else "C"
            x, _ = engine.prepare_data(open_array(str(path), chunk_bytes=S["chunk_bytes"]), True, order=order)
            wait(x)
            return x

        cases = []
        if "a" in sel:
            cases.append(("a_full", "a", k_a, "full", S["rounds"], S["per_call"], None))
        if "b" in sel:
            cases.append(("b_diag", "a", k_a, "diag", S["rounds"], S["per_call"], None))
        if "c" in sel:
            cases.append(("c_full_D64", "c", k_c, "full", S["rounds"], S["per_call"], None))
        if "e" in sel:
            n_e, d_e, k_e = S["e"]
            cent = store_centres(k_e, d_e, 4)
            cases.append(("e_diag_D256", "e", k_e, "diag", S["wide_rounds"], S["wide_per_call"], cent))
            cases.append(("e_full_D256", "e_full", k_e, "full", S["wide_rounds"], 1, cent))
        if "f" in sel:
            n_f, d_f, k_f = S["f"]
            cases.append(
                ("f_diag_K256", "f", k_f, "diag", S["wide_rounds"], S["wide_per_call"], store_centres(k_f, d_f, 5))
            )
        if cases:
            with (
                dask.config.set(cluster_config),
                LocalCluster(n_workers=cores, threads_per_worker=1, processes=True, dashboard_address=":0") as cl,
                Client(cl) as client,
            ):
                pids = cluster_pids(client)
                for name, data, k, ctype, rounds, per_call, centres in cases:
                    log(f"case {name}: preparing ...")
                    with section(res, name):
                        X = mem[data]
                        Xd = open_persisted(stores[data], ctype)
                        Xl = in_process_data(X, ctype)
                        p = init_params(X, k, ctype, seed=0) if centres is None else wide_init(centres, k, ctype, 0)
                        args_ = (rounds, per_call, client, pids, cores, S, args, d4p, stores[data])
                        res["cases"][name] = run_case(name, X, Xd, Xl, p, k, ctype, *args_)
                        del Xd, Xl

                if "a_full" in res["cases"]:
                    # ---- threaded scheduler: Dask threads x BLAS threads --------------
                    log("case a on the threaded scheduler ...")
                    Xn = open_array(mem["a"], chunk_bytes=S["chunk_bytes"])
                    p = init_params(mem["a"], k_a, "full", seed=0)
                    per_call = S["per_call"]

                    def threaded(workers: int, keep_blas: bool) -> dict:
                        if keep_blas:
                            os.environ["DASKEM_BLAS_THREADS"] = "keep"
                        try:
                            with dask.config.set(scheduler="threads", num_workers=workers):
                                return em_iterations(Xn, [p], per_call)
                        finally:
                            os.environ.pop("DASKEM_BLAS_THREADS", None)

                    res["cases"]["a_full"]["threaded_scheduler"] = interleaved(
                        {
                            f"{cores}_dask_x_1_blas": lambda: threaded(cores, False),
                            f"1_dask_x_{cores}_blas": lambda: threaded(1, True),
                            f"{cores}_dask_x_{cores}_blas_oversubscribed": lambda: threaded(cores, True),
                        },
                        S["rounds"],
                    )

        # ---- out of core ------------------------------------------------------
        if "d" in sel:
            with section(res, "d"):
                res["cases"]["d_out_of_core"] = out_of_core(stores, S, cores, cluster_config, res, log)

        # ---- time to a model ----------------------------------------------------
        if "fit" in sel:
            for name, ctype in (("a_full", "full"), ("b_diag", "diag")):
                log(
                    f"time to a model, {name}: daskem, scikit-learn, oneDAL defaults, {S['fit_seeds']} seeds in turn ..."
                )
                Xf = mem["a"][: S["fit_n"]]
                with section(res, f"fit_{name}"):
                    res.setdefault("time_to_model", {})[name] = time_to_model(
                        Xf, k_a, ctype, S["fit_seeds"], d4p, S["fit_onedal_init_rows"]
                    )

        # ---- chunk-count sweep ----------------------------------------------------
        if "sweep" in sel:
            import chunk_sweep

            n_s, d_s, k_s = S["sweep"]
            log(f"chunk-count sweep {S['sweep_counts']} ...")
            with section(res, "sweep"), dask.config.set(cluster_config):
                res["chunk_sweep"] = chunk_sweep.sweep(
                    n_s,
                    d_s,
                    k_s,
                    S["sweep_counts"],
                    S["sweep_rounds"],
                    S["sweep_before_rounds"],
                    S["sweep_before_max"],
                    workdir=work,
                )
                # the quiet-machine per-task cost, for the paper figure beside this run's
                res["chunk_sweep"]["paper_at_0.12ms_per_task"] = chunk_sweep.paper(0.12e-3)

        with section(res, "ratios"):
            compute_ratios(res)
        res["meta"]["load_avg_end"] = list(os.getloadavg())
        res["meta"]["total_seconds"] = round(time.perf_counter() - t_start, 1)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=float))
    print_table(res)
    print(f"\nwrote {out}")
    return res


def run_case(name, X, Xd, Xl, p, k, ctype, rounds, per_call, client, pids, cores, S, args, d4p, store) -> dict:
    """One in-memory case: every variant timed in turn (see the module docstring)."""
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    d_, k_ = X.shape[1], k
    variants = {
        "daskem": lambda: em_iterations(Xd, [p], per_call),
        "daskem_in_process": lambda: in_process_iterations(Xl, [p], per_call),
    }
    if name in ("a_full", "b_diag"):
        # the same passes as tasks through the scheduler (see :func:`em_iterations`)
        variants["daskem_tasks"] = lambda: em_iterations(Xd, [p], per_call, tasks=True)
    if ctype == "full" and d_ <= 64:
        # the BLAS limit of this case's E-step shape, measured in turn with the
        # passes (as seconds per GFLOP, so that the median is taken like the others)
        variants["blas_limit"] = lambda: {
            "all_s": [1.0 / blas_rate(S["limit_rows"], d_, k_ * d_, "float64", cores, S["blas_seconds"])]
        }
    if ctype == "diag":
        # the streaming read of the data's bytes, in turn with the passes (as
        # seconds per GB, so that the median is taken like the others)
        variants["stream_read"] = lambda: {"all_s": [1.0 / stream_bandwidth(X, cores, S["blas_seconds"] / 2)]}
    od = sk = None
    if d4p is not None:
        od = OneDAL(d4p, X, p)
        # each call runs 1 + (1 + n) oneDAL iterations: n = 1 outside (a)-(c)
        od_iters = per_call if name in ("a_full", "b_diag", "c_full_D64") else 1
        variants["onedal"] = lambda: od(od_iters)
    if not args.no_sklearn:
        sk = Sklearn(X, p)
        # scikit-learn is 4-10x slower than the others here: one iteration a
        # call outside (a) and (b) keeps the run within minutes
        sk_iters = per_call if name in ("a_full", "b_diag") else 1
        variants["sklearn"] = lambda: sk(sk_iters)
    Xd1 = Xd32 = None
    if name == "a_full":
        # float32, four restarts, and the same passes on one worker of the same
        # cluster (its own cached copy of the data, every task pinned to it),
        # each timed in turn with float64 on both workers
        from distributed import wait

        from daskem.io import open_array

        ps = [init_params(X, k, ctype, seed=s) for s in range(4)]
        w0 = sorted(client.scheduler_info()["workers"])[0]
        Xd1 = client.persist(open_array(str(store), chunk_bytes=S["chunk_bytes"]), workers=[w0])
        # GaussianMixture(dtype="float32", cache=True) caches a float32 copy
        Xd32, _ = engine.prepare_data(open_array(str(store), chunk_bytes=S["chunk_bytes"]), True, dtype="float32")
        wait([Xd1, Xd32])
        variants.update(
            {
                "daskem_float32": lambda: em_iterations(Xd32, [p], per_call, dtype="float32"),
                "daskem_n_init4": lambda: em_iterations(Xd, ps, per_call),
                "daskem_one_worker": lambda: em_iterations(Xd1, [p], per_call, workers=[w0]),
            }
        )
    log(f"case {name}: " + ", ".join(variants) + f" in turn, {rounds} rounds of {per_call} iterations ...")
    heavy = name not in ("a_full", "b_diag")
    # the in-process variant's worker processes are forked once for the case, as
    # once for a fit (the untimed warm-up call takes their first pass, which is
    # slower here: ~0.1 s more on this VM)
    with engine.local_workers(Xl):
        timed = interleaved(variants, rounds, pids, cold=frozenset({"onedal", "sklearn"}) if heavy else frozenset())
    r = timed.pop("daskem")
    mem = r.pop("peak_MiB")
    row = {
        "N": X.shape[0],
        "D": X.shape[1],
        "K": k,
        "covariance_type": ctype,
        "daskem": r,
        "daskem_peak_MiB": mem,
        "chunks": len(Xd.chunks[0]),
        "workers": cores,
        "threads_per_worker": 1,
    }
    bl = timed.pop("blas_limit", None)
    if bl is not None:
        row["blas_limit_in_turn"] = {
            "GFLOPs": round(1.0 / bl["s_per_iter"], 2),
            "all_GFLOPs": [round(1.0 / x, 2) for x in bl["all_s"]],
            "shape": f"rows x {d_} @ {d_} x {k_ * d_} float64",
        }
    sr = timed.pop("stream_read", None)
    if sr is not None:
        row["bandwidth_bound_in_turn"] = {
            "bytes": int(X.nbytes),
            "s": X.nbytes / 1e9 * sr["s_per_iter"],
            "GB_per_s": round(1.0 / sr["s_per_iter"], 2),
            "how": "a streaming read of the N x D float64 data (every core), in turn with the passes: "
            "the diag pass reads each row once; its N x K products stay in cache blocks",
        }
    for key, v in timed.items():
        v.pop("peak_MiB", None)
        row[key] = v
    if sk is not None:
        row["sklearn"]["loglik_by_m_steps"] = sk.by_steps
    if od is not None:
        row["onedal"]["how"] = " ".join(OneDAL.__doc__.split("\n\n")[1].split())
    if Xd1 is not None:
        row["daskem_peak_MiB_note"] = "the workers also hold the one-worker copy and the float32 copy of the data"
    fl = kernel_flops_per_row(ctype, X.shape[1], k) * X.shape[0]
    row["kernel_GFLOP_per_iter"] = round(fl / 1e9, 3)
    row["daskem_GFLOPs"] = round(fl / r["s_per_iter"] / 1e9, 2)
    if ctype == "full":
        # the former count (twice as many flops below D=64): comparable with runs before 2026-12-02
        fs = kernel_flops_per_row(ctype, X.shape[1], k, stacked=True) * X.shape[0]
        row["daskem_GFLOPs_stacked_count"] = round(fs / r["s_per_iter"] / 1e9, 2)
    kt = r.get("kernel_task_s_per_iter") or row.get("daskem_tasks", {}).get("kernel_task_s_per_iter")
    if kt:
        # the chunk kernel alone: its tasks' compute seconds, every worker busy
        row["kernel_GFLOPs"] = round(fl / (kt / cores) / 1e9, 2)
    return row


def out_of_core(stores, S, cores, cluster_config, res, log) -> dict:
    from distributed import Client, LocalCluster

    from daskem.io import open_array

    d_o, k_o = S["ooc_dk"]
    per_call, rounds = S["per_call"], S["rounds"]
    log("out-of-core cases ...")
    with (
        dask.config.set(cluster_config),
        LocalCluster(
            n_workers=cores,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            memory_limit=S["ooc_memory_limit"],
        ) as cl,
        Client(cl) as client,
    ):
        pids = cluster_pids(client)
        mem_total = engine._cluster_memory()
        Xo = open_array(str(stores["o"]))
        # what cache='auto' decides (the full-size store must not fit); stream either way
        auto_persist = bool(Xo.nbytes < 0.5 * mem_total)
        Xs, _ = engine.prepare_data(Xo, False)
        Xq = open_array(str(stores["o4"]))
        sample = np.asarray(Xo[: min(200_000, S["ooc_n"])].compute())
        ooc = {
            "N": S["ooc_n"],
            "D": d_o,
            "K": k_o,
            "store_bytes": int(Xo.nbytes),
            "workers_memory_limit_total": int(mem_total),
            "chunks": len(Xo.chunks[0]),
            "cache_auto_would_persist": auto_persist,
        }
        pd = init_params(sample, k_o, "diag", seed=0)
        pf = init_params(sample, k_o, "full", seed=0)
        ps = [init_params(sample, k_o, "diag", seed=s) for s in range(4)]
        log(f"out of core: the read bound, diag, diag n_init=4 and full in turn, {rounds} rounds ...")
        timed = interleaved(
            {
                "read": lambda: {"all_s": [read_seconds(stores["o"])]},
                "diag": lambda: em_iterations(Xs, [pd], per_call),
                "diag_n_init4": lambda: em_iterations(Xs, ps, per_call),
                "full": lambda: em_iterations(Xs, [pf], 1),
            },
            rounds,
            pids,
        )
        rd = timed.pop("read")
        res["limits"]["zarr_read"] = {
            "bytes": int(Xo.nbytes),
            "seconds": rd["s_per_iter"],
            "best_seconds": rd["best_s_per_iter"],
            "all_s": rd["all_s"],
            "MB_per_s": round(Xo.nbytes / rd["s_per_iter"] / 1e6, 1),
            "how": "da.from_zarr(store).sum() on the same cluster, timed in turn with the EM passes",
        }
        ooc.update(timed)
        log("out of core diag at N/4 ...")
        with PeakMemory(pids) as mem:
            r = interleaved({"q": lambda: em_iterations(Xq, [pd], per_call)}, 1)["q"]
        ooc["diag_quarter_N"] = {**r, "N": S["ooc_n"] // 4, "peak_MiB": mem.mib()}
        ooc["read_bound_s"] = round(ooc["store_bytes"] / (res["limits"]["zarr_read"]["MB_per_s"] * 1e6), 4)
    return ooc


@contextlib.contextmanager
def section(res: dict, name: str):
    """Run one part of the benchmark; an exception is recorded in ``res["errors"]`` and the run goes on."""
    try:
        yield
    except Exception as exc:
        import traceback

        traceback.print_exc()
        res.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        print(f"section {name} failed, going on: {exc}", file=sys.stderr, flush=True)


def _target(res: dict, name: str, value: float | None, op: str, bound: float) -> None:
    if value is None or not np.isfinite(value):
        return
    met = value <= bound if op == "<=" else value >= bound
    res["targets"][name] = {"value": float(f"{float(value):.4g}"), "target": f"{op} {bound}", "met": bool(met)}


def compute_ratios(res: dict) -> None:
    """Every ratio of the run, and the issue's targets with whether each is met."""
    R = res["ratios"]
    C = res["cases"]
    for name, row in C.items():
        if "daskem" not in row or name == "d_out_of_core":
            continue
        ours = {"cluster": row["daskem"]["s_per_iter"]}
        if "daskem_in_process" in row:
            ours["in_process"] = row["daskem_in_process"]["s_per_iter"]
        for where, s in ours.items():
            for peer in ("sklearn", "onedal"):
                if row.get(peer, {}).get("s_per_iter", 0) > 0:
                    R[f"{name}_daskem_{where}_over_{peer}"] = round(s / row[peer]["s_per_iter"], 3)
        if row.get("sklearn", {}).get("s_per_iter", 0) > 0:
            # the historical names (cluster)
            R[f"{name}_daskem_over_sklearn"] = R[f"{name}_daskem_cluster_over_sklearn"]
            R[f"{name}_sklearn_speedup"] = round(row["sklearn"]["s_per_iter"] / row["daskem"]["s_per_iter"], 2)
        if "blas_limit_in_turn" in row:
            limit = row["blas_limit_in_turn"]["GFLOPs"]
            R[f"{name}_GFLOPs_over_blas_limit"] = round(row["daskem_GFLOPs"] / limit, 3)
            if "in_process" in ours:
                # the same flops over the in-process iteration's seconds
                gflops = row["daskem_GFLOPs"] * ours["cluster"] / ours["in_process"]
                R[f"{name}_in_process_GFLOPs_over_blas_limit"] = round(gflops / limit, 3)
            if "kernel_GFLOPs" in row:
                R[f"{name}_kernel_GFLOPs_over_blas_limit"] = round(row["kernel_GFLOPs"] / limit, 3)
            if "daskem_GFLOPs_stacked_count" in row:
                R[f"{name}_GFLOPs_stacked_count_over_blas_limit"] = round(row["daskem_GFLOPs_stacked_count"] / limit, 3)
        if "bandwidth_bound_in_turn" in row:
            bound = row["bandwidth_bound_in_turn"]["s"]
            for where, s in ours.items():
                R[f"{name}_{where}_fraction_of_bandwidth_bound"] = round(bound / s, 3)
    for name in ("a_full", "b_diag"):
        row = C.get(name, {})
        if "daskem_tasks" in row and "s_per_iter" in row["daskem_tasks"]:
            # short passes straight to the workers (actors) / the same passes as tasks
            R[f"{name}_cluster_actors_over_tasks"] = round(
                row["daskem"]["s_per_iter"] / row["daskem_tasks"]["s_per_iter"], 3
            )
    a = C.get("a_full")
    if a and "daskem_float32" in a:
        R["a_float32_speedup_over_float64"] = round(a["daskem"]["s_per_iter"] / a["daskem_float32"]["s_per_iter"], 2)
        R["a_float32_loglik_rel_diff"] = float(
            abs(a["daskem_float32"]["loglik"] - a["daskem"]["loglik"]) / abs(a["daskem"]["loglik"])
        )
        R["a_n_init4_over_n_init1"] = round(a["daskem_n_init4"]["s_per_iter"] / a["daskem"]["s_per_iter"], 2)
        R["a_two_workers_speedup"] = round(a["daskem_one_worker"]["s_per_iter"] / a["daskem"]["s_per_iter"], 2)
        if "sklearn" in a and len(a["sklearn"]["loglik_by_m_steps"]) > a["daskem"]["loglik_m_steps"]:
            # same data, same initial parameters, same number of M-steps
            sk = a["sklearn"]["loglik_by_m_steps"][a["daskem"]["loglik_m_steps"]]
            R["a_loglik_rel_diff_vs_sklearn"] = float(abs(a["daskem"]["loglik"] - sk) / abs(sk))
    if "blas_scaling" in res["limits"]:
        R["blas_one_to_all_cores_speedup"] = res["limits"]["blas_scaling"]["speedup"]
    o = C.get("d_out_of_core")
    if o:
        read_bound = o["read_bound_s"]
        R["d_diag_over_read_bound"] = round(o["diag"]["s_per_iter"] / read_bound, 2)
        R["d_full_over_read_bound"] = round(o["full"]["s_per_iter"] / read_bound, 2)
        R["d_diag_n_init4_over_n_init1"] = round(o["diag_n_init4"]["s_per_iter"] / o["diag"]["s_per_iter"], 2)
        wq = max(v for k, v in o["diag_quarter_N"]["peak_MiB"].items() if k.startswith("worker"))
        wn = max(v for k, v in o["diag"]["peak_MiB"].items() if k.startswith("worker"))
        R["d_worker_peak_MiB_at_N_and_4N"] = [wq, wn]
    for name, t in res.get("time_to_model", {}).items():
        if "daskem" in t and "sklearn" in t:
            R[f"fit_{name}_time_daskem_over_sklearn"] = round(t["daskem"]["median_s"] / t["sklearn"]["median_s"], 3)
            R[f"fit_{name}_median_loglik_daskem_minus_sklearn"] = float(
                t["daskem"]["median_loglik"] - t["sklearn"]["median_loglik"]
            )
        if "daskem" in t and "onedal" in t:
            R[f"fit_{name}_time_daskem_over_onedal"] = round(t["daskem"]["median_s"] / t["onedal"]["median_s"], 3)
    sw = res.get("chunk_sweep")
    if sw:
        for r in sw["rows"]:
            if r["chunks"] == sw["counts"][-1] and r["variant"] in ("persisted", "streamed"):
                R[f"sweep_{r['variant']}_{r['chunks']}_over_{sw['counts'][0]}_chunks"] = r["ratio_to_first"]

    # ---- the targets (benchmark figures, not tests) ----
    for case in ("a_full", "b_diag"):
        for where in ("in_process", "cluster"):
            _target(res, f"{case}_daskem_{where}_over_onedal", R.get(f"{case}_daskem_{where}_over_onedal"), "<=", 0.67)
    for case in ("a_full", "c_full_D64"):
        _target(res, f"{case}_GFLOPs_over_blas_limit", R.get(f"{case}_GFLOPs_over_blas_limit"), ">=", 0.7)
        key = f"{case}_in_process_GFLOPs_over_blas_limit"
        _target(res, key, R.get(key), ">=", 0.7)
    for case in ("b_diag", "e_diag_D256", "f_diag_K256"):
        for where in ("in_process", "cluster"):
            key = f"{case}_{where}_fraction_of_bandwidth_bound"
            _target(res, key, R.get(key), ">=", 0.5)
    for case in ("e_diag_D256", "e_full_D256", "f_diag_K256"):
        for where in ("in_process", "cluster"):
            sk = R.get(f"{case}_daskem_{where}_over_sklearn")
            _target(res, f"{case}_{where}_speedup_over_sklearn", 1.0 / sk if sk else None, ">=", 5.0)
            _target(res, f"{case}_daskem_{where}_over_onedal", R.get(f"{case}_daskem_{where}_over_onedal"), "<=", 0.67)
    for name in res.get("time_to_model", {}):
        _target(res, f"fit_{name}_time_daskem_over_sklearn", R.get(f"fit_{name}_time_daskem_over_sklearn"), "<=", 0.5)
        _target(
            res,
            f"fit_{name}_median_loglik_daskem_minus_sklearn",
            R.get(f"fit_{name}_median_loglik_daskem_minus_sklearn"),
            ">=",
            0.0,
        )
    if sw:
        for variant in ("persisted", "streamed"):
            key = f"sweep_{variant}_{sw['counts'][-1]}_over_{sw['counts'][0]}_chunks"
            _target(res, key, R.get(key), "<=", 1.1)


def print_table(res: dict) -> None:
    m = res["meta"]
    nan = float("nan")
    print(
        f"daskem benchmark  {m['date']}  {m['machine']}  {m['cores']} cores  {m['ram_GiB']} GiB  "
        f"load {m['load_avg_start'][0]:.2f}->{m.get('load_avg_end', [0])[0]:.2f}  quick={m['quick']}  "
        f"sections {','.join(m['sections'])}  {m.get('total_seconds', nan)} s"
    )
    print(f"  oneDAL: {m['onedal']}")
    L = res["limits"]
    print("\n[1] limits")
    for k, v in L.get("blas_gflops", {}).items():
        print(f"  BLAS {k:40s} {v:8.2f} GFLOP/s")
    if "blas_scaling" in L:
        sc = L["blas_scaling"]
        print(f"  BLAS one core -> {m['cores']} cores ({sc['shape']}): {sc['speedup']}x")
    if "stream_read" in L:
        print(f"  streaming read, every core: {L['stream_read']['GB_per_s']} GB/s")
    if "zarr_read" in L:
        z = L["zarr_read"]
        print(f"  Zarr read+decompress {z['bytes'] / 1e6:.0f} MB in {z['seconds']} s = {z['MB_per_s']} MB/s")
    for name, r in res["cases"].items():
        if "blas_limit_in_turn" in r:
            b = r["blas_limit_in_turn"]
            print(f"  BLAS {b['shape']} in turn with case {name}'s passes: {b['GFLOPs']} GFLOP/s")
        if "bandwidth_bound_in_turn" in r:
            b = r["bandwidth_bound_in_turn"]
            print(
                f"  read of case {name}'s {b['bytes'] / 1e6:.0f} MB in turn with its passes: {b['s']} s ({b['GB_per_s']} GB/s)"
            )
    print("\n[2] seconds per iteration (medians, in turn; same data, same initial parameters)")
    print(
        f"  {'case':14s} {'N':>9s} {'D':>3s} {'K':>3s} {'cluster':>8s} {'in proc':>8s} {'oneDAL':>8s} {'sklearn':>8s} "
        f"{'GFLOP/s':>8s} {'kernel':>8s} {'worker MiB':>12s}"
    )
    for name, r in res["cases"].items():
        if name == "d_out_of_core" or "daskem" not in r:
            continue
        pk = r.get("daskem_peak_MiB", {})
        wk = "/".join(f"{v:.0f}" for k, v in pk.items() if k.startswith("worker"))
        g_ = lambda key, r=r: r.get(key, {}).get("s_per_iter", nan)  # noqa: E731
        print(
            f"  {name:14s} {r['N']:9d} {r['D']:3d} {r['K']:3d} {r['daskem']['s_per_iter']:8.3f} "
            f"{g_('daskem_in_process'):8.3f} {g_('onedal'):8.3f} {g_('sklearn'):8.3f} "
            f"{r['daskem_GFLOPs']:8.2f} {r.get('kernel_GFLOPs', nan):8.2f} {wk:>12s}"
        )
    for name in ("a_full", "b_diag"):
        r = res["cases"].get(name, {})
        if "s_per_iter" in r.get("daskem_tasks", {}):
            print(
                f"  {name} cluster: short passes straight to the workers {r['daskem']['s_per_iter']:.3f}, "
                f"as scheduler tasks {r['daskem_tasks']['s_per_iter']:.3f}"
            )
    a = res["cases"].get("a_full")
    if a and "daskem_float32" in a:
        print(
            f"  a float32 {a['daskem_float32']['s_per_iter']:.3f}  n_init=4 {a['daskem_n_init4']['s_per_iter']:.3f}  "
            f"one worker {a['daskem_one_worker']['s_per_iter']:.3f}"
        )
    for k, v in (a or {}).get("threaded_scheduler", {}).items():
        print(f"  a threaded scheduler {k:32s} {v['s_per_iter']:.3f}")
    o = res["cases"].get("d_out_of_core")
    if o:
        print(
            f"  out of core: N={o['N']} store {o['store_bytes'] / 1e6:.0f} MB > workers' limits "
            f"{o['workers_memory_limit_total'] / 1e6:.0f} MB, read bound {o['read_bound_s']} s"
        )
        for k in ("diag", "full", "diag_n_init4", "diag_quarter_N"):
            pk = o[k].get("peak_MiB", {})
            print(f"    {k:16s} {o[k]['s_per_iter']:8.3f} s/iter  peak MiB {pk}")
    if res.get("time_to_model"):
        print(
            "\n[3] time to a model: fit with each library's defaults (median over seeds; mean log-likelihood, one scorer)"
        )
        for name, t in res["time_to_model"].items():
            parts = []
            for lib in ("daskem", "sklearn", "onedal"):
                if lib in t:
                    parts.append(f"{lib} {t[lib]['median_s']:.2f} s at {t[lib]['median_loglik']:.4f}")
            print(f"  {name} N={t['N']} ({t['seeds']} seeds): " + ";  ".join(parts))
    sw = res.get("chunk_sweep")
    if sw:
        print("\n[4] chunk-count sweep")
        import chunk_sweep

        chunk_sweep.report(sw)
        p = sw["paper_at_0.12ms_per_task"]
        print(
            f"  at the issue's quiet-machine 0.12 ms/task: before {p['before_one_task_per_chunk_s']:.1f} s, after "
            f"{p['after_1_thread_per_worker_s']:.2f} s (1 thread/worker), {p['after_8_threads_per_worker_s']:.2f} s (8)"
        )
    print("\n[5] ratios")
    for k, v in res["ratios"].items():
        print(f"  {k:52s} {v}")
    for k, v in res.get("errors", {}).items():
        print(f"  ERROR in {k}: {v}")
    print("\n[6] targets")
    for k, t in res["targets"].items():
        print(f"  {k:52s} {t['value']:>8} {t['target']:>8}  {'met' if t['met'] else 'MISSED'}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
