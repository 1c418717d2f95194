"""daskem speed and memory benchmark: one run measures everything, side by side.

Usage::

    python benchmarks/run.py [--quick] [--out benchmarks/results/latest.json]

Sections of the JSON (and the printed table):

``limits``
    The machine's floor: BLAS GFLOP/s for the tall-skinny shapes the kernel
    uses (rows x D @ D x D and rows x D @ D x K*D, on cache-sized row blocks,
    every core busy, one BLAS thread per core), at float64 and float32; and
    the read + decompress rate of the out-of-core Zarr store through the same
    Dask cluster (``da.from_zarr(...).sum()``).
``cases``
    Seconds per EM iteration of daskem and of scikit-learn from the same
    initial parameters on the same data: (a) N=1e6 D=16 K=8 full, (b) diag,
    (c) N=2e5 D=64 K=16 full, (d) out of core (a store larger than the
    workers' memory limits), diag and full; plus daskem's achieved GFLOP/s
    (the kernel's flops, counted below) and peak memory of the client and of
    every worker.
``ratios``
    daskem / scikit-learn, GFLOP/s / BLAS limit, out-of-core s/iter / read
    bound, n_init=4 / n_init=1 per iteration, float32 / float64, worker peak
    memory at N and 4N, two workers / one worker, and Dask threads x BLAS
    threads on the threaded scheduler (2 x 1 against 1 x 2).

The machine is shared and its speed drifts by 20% or more within a minute,
so every comparison is timed *in turn*: the variants compared (float64,
float32, four restarts, one worker; the read bound and the out-of-core
passes) each run a few iterations, then the next, for several rounds, after
one untimed warm-up call of each. ``s_per_iter`` is the median over every
timed iteration, ``best_s_per_iter`` the fastest; the ratios use medians.
scikit-learn is initialised with the same parameters (an untimed
``fit(max_iter=1)``), then each timed iteration is its ``_e_step`` +
``_m_step``: the body of its EM loop, without ``fit``'s validation and final
E-step.
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
            "sklearn_iters": 1,
            "limit_rows": 20_000,
            "blas_seconds": 0.05,
            "chunk_bytes": 2**18,
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
        "rounds": 4,
        "per_call": 2,
        "sklearn_iters": 4,
        "blas_seconds": 0.4,
        "limit_rows": 1_000_000,
        "chunk_bytes": None,
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
    arr = zarr.create_array(str(path), shape=(n, d), chunks=(chunk_rows, d), dtype="f8")
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


def kernel_flops_per_row(ctype: str, d: int, k: int) -> float:
    """Useful flops of one row in the fused kernel (what a careful hand count gives).

    full: E-step ``[z,1] @ W`` (2 K D (D+1)), squares and sums (2 K D), the
    ``q``-weighted rows (K D), the scatter ``sum q z z^T`` (2 K D^2) and first
    moments (2 K D). diag/spherical: E-step ``[z*z, z, 1] @ W`` (2 K (2D+1)),
    the design (2 D) and both moments in one product (2 K 2D).
    """
    if ctype in ("full", "tied"):
        return 2 * k * d * (d + 1) + 2 * k * d + k * d + 2 * k * d * d + 2 * k * d
    return 2 * k * (2 * d + 1) + 2 * d + 4 * k * d


# --------------------------------------------------------------------------
# timing EM
# --------------------------------------------------------------------------


def em_iterations(
    Xd: da.Array, params: list[g.GaussianParams], iters: int, dtype: str = "float64", workers: list[str] | None = None
) -> dict:
    """Seconds of each of ``iters`` EM iterations (pass + M-step) of the engine.

    ``workers`` pins every task of the passes to those workers (the one-worker
    comparison inside the two-worker cluster). With a distributed client, the
    chunk tasks' compute seconds of every pass are recorded too.
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
    with warnings.catch_warnings(), stream as ts, pin:
        warnings.simplefilter("ignore", RuntimeWarning)
        _fitloop.iterate(
            _fitloop.Passes(Xd, model),
            model,
            runs,
            tol=-1.0,
            max_iter=iters,
            callback=lambda info: secs.append(info.seconds),
        )
    # history[-1] is the log-likelihood of the parameters after iters - 1 M-steps
    out = {"all_s": secs, "loglik": runs[0].history[-1], "loglik_m_steps": iters - 1}
    if ts is not None:
        out["kernel_task_s"] = kernel_task_seconds(ts.data)
    return out


def interleaved(variants: dict, rounds: int, pids: dict[str, int] | None = None) -> dict:
    """Time several variants in turn, ``rounds`` times, so that a slow spell of a
    shared machine falls on all of them alike (one warm-up call of each first).

    Each variant is a callable returning :func:`em_iterations`' dict (or
    ``{"all_s": [seconds]}``). Returns, per variant, the median and best
    seconds over every sample, the samples, and the peak memory (MiB) of the
    processes in ``pids`` over its calls.
    """
    samples: dict[str, dict] = {name: {"all_s": [], "kernel_task_s": [], "peak_MiB": {}} for name in variants}
    for f in variants.values():
        f()  # warm-up: caches, imports, the first graph
    for _ in range(rounds):
        for name, f in variants.items():
            mem = PeakMemory(pids) if pids else contextlib.nullcontext()
            with mem as m:
                r = f()
            acc = samples[name]
            acc["all_s"] += r["all_s"]
            acc["kernel_task_s"] += r.get("kernel_task_s") or []
            for key in ("loglik", "loglik_m_steps"):
                if key in r:
                    acc[key] = r[key]
            if m is not None:
                for k, v in m.mib().items():
                    acc["peak_MiB"][k] = max(acc["peak_MiB"].get(k, 0.0), v)
    out = {}
    for name, acc in samples.items():
        row = {
            "s_per_iter": round(statistics.median(acc["all_s"]), 4),
            "best_s_per_iter": round(min(acc["all_s"]), 4),
            "all_s": [round(x, 4) for x in acc["all_s"]],
        }
        for key in ("loglik", "loglik_m_steps"):
            if key in acc:
                row[key] = acc[key]
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


def sklearn_s_per_iter(X: np.ndarray, p: g.GaussianParams, iters: int) -> dict:
    """Seconds of one iteration of scikit-learn's EM loop: its ``_e_step`` and ``_m_step``.

    The estimator is initialised with the same parameters (one ``fit`` with
    ``max_iter=1``, untimed); each timed iteration is exactly what the body of
    its ``fit`` loop runs, without the input validation, the initialisation
    and the final E-step of ``fit`` (which would be charged to the iterations
    if ``fit`` itself were timed).
    """
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(
        p.n_components,
        covariance_type=p.covariance_type,
        weights_init=p.weights,
        means_init=p.means,
        precisions_init=p.precisions,
        max_iter=1,
        tol=0.0,
        random_state=0,
    )
    secs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(X)
        # the mean log-likelihood of the parameters after 0, 1, 2, ... M-steps
        by_steps = [float(gm.lower_bound_)]
        for _ in range(iters):
            t0 = time.perf_counter()
            log_prob_norm, log_resp = gm._e_step(X)
            gm._m_step(X, log_resp)
            secs.append(time.perf_counter() - t0)
            by_steps.append(float(log_prob_norm))
    return {
        "s_per_iter": round(statistics.median(secs), 4),
        "best_s_per_iter": round(min(secs), 4),
        "all_s": [round(x, 4) for x in secs],
        "loglik_by_m_steps": by_steps,
    }


# --------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latest.json"))
    ap.add_argument("--workdir", default=None, help="where the Zarr stores go (default: a temp dir)")
    ap.add_argument("--no-sklearn", action="store_true", help="skip scikit-learn (daskem only)")
    args = ap.parse_args(argv)
    S = sizes(args.quick)
    cores = os.cpu_count() or 1
    from distributed import Client, LocalCluster

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
            "block_rows": BLOCK,
            "blas_thread_limit": _blas.blas_limit_available(),
        },
        "limits": {},
        "cases": {},
        "ratios": {},
    }
    n_a, d_a, k_a = S["a"]
    n_c, d_c, k_c = S["c"]
    d_o, k_o = S["ooc_dk"]
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    try:
        # ---- data -----------------------------------------------------------
        log("writing stores ...")
        store_a = work / "a.zarr"
        store_c = work / "c.zarr"
        store_o = work / "ooc.zarr"
        store_o4 = work / "ooc_quarter.zarr"
        make_store(store_a, n_a, d_a, k_a, min(n_a, 262_144 if not args.quick else 5_000))
        make_store(store_c, n_c, d_c, k_c, min(n_c, 65_536 if not args.quick else 2_000), seed=1)
        make_store(store_o, S["ooc_n"], d_o, k_o, S["ooc_chunk_rows"], seed=2)
        make_store(store_o4, S["ooc_n"] // 4, d_o, k_o, S["ooc_chunk_rows"], seed=3)

        import zarr

        Xa = np.asarray(zarr.open_array(str(store_a))[:])
        Xc = np.asarray(zarr.open_array(str(store_c))[:])

        # ---- limits ---------------------------------------------------------
        log("measuring BLAS limits ...")
        res["limits"]["blas_gflops"] = machine_limits(
            sorted({(d_a, k_a), (d_c, k_c)}), S["limit_rows"], cores, S["blas_seconds"]
        )
        res["limits"]["blas_scaling"] = blas_scaling(d_a, k_a, S["limit_rows"], cores, S["blas_seconds"])

        # ---- in-memory cases on a 2-worker cluster ---------------------------
        def open_persisted(path: Path, client, ctype: str) -> da.Array:
            """The store, cached on the workers as ``GaussianMixture(cache=True)`` does."""
            from distributed import wait

            from daskem.io import open_array

            order = "F" if ctype in ("diag", "spherical") else "C"
            x, _ = engine.prepare_data(open_array(str(path), chunk_bytes=S["chunk_bytes"]), True, order=order)
            wait(x)
            return x

        cases = [
            ("a_full", store_a, Xa, k_a, "full"),
            ("b_diag", store_a, Xa, k_a, "diag"),
            ("c_full_D64", store_c, Xc, k_c, "full"),
        ]
        rounds, per_call = S["rounds"], S["per_call"]
        # the clusters are configured as the ones daskem starts (`daskem.cli.local_cluster_config`:
        # distributed's worker profiler off unless DASKEM_WORKER_PROFILE=1)
        from daskem.cli import local_cluster_config

        cluster_config = local_cluster_config()
        res["meta"]["cluster_config"] = cluster_config
        with (
            dask.config.set(cluster_config),
            LocalCluster(n_workers=cores, threads_per_worker=1, processes=True, dashboard_address=":0") as cl,
            Client(cl) as client,
        ):
            pids = cluster_pids(client)
            for name, store, X, k, ctype in cases:
                log(f"case {name}: daskem ...")
                Xd = open_persisted(store, client, ctype)
                p = init_params(X, k, ctype, seed=0)
                d_, k_ = X.shape[1], k
                variants = {
                    "daskem": lambda Xd=Xd, p=p: em_iterations(Xd, [p], per_call),
                    # the BLAS limit of this case's E-step shape, measured in turn with the
                    # passes (as seconds per GFLOP, so that the median is taken like the others)
                    "blas_limit": lambda d_=d_, k_=k_: {
                        "all_s": [1.0 / blas_rate(S["limit_rows"], d_, k_ * d_, "float64", cores, S["blas_seconds"])]
                    },
                }
                Xd1 = Xd32 = None
                if name == "a_full":
                    # float32, four restarts, and the same passes on one worker of the same
                    # cluster (its own cached copy of the data, every task pinned to it),
                    # each timed in turn with float64 on both workers
                    ps = [init_params(X, k, ctype, seed=s) for s in range(4)]
                    w0 = sorted(client.scheduler_info()["workers"])[0]
                    from distributed import wait

                    from daskem.io import open_array

                    Xd1 = client.persist(open_array(str(store), chunk_bytes=S["chunk_bytes"]), workers=[w0])
                    # GaussianMixture(dtype="float32", cache=True) caches a float32 copy
                    Xd32, _ = engine.prepare_data(
                        open_array(str(store), chunk_bytes=S["chunk_bytes"]), True, dtype="float32"
                    )
                    wait([Xd1, Xd32])
                    variants.update(
                        {
                            "daskem_float32": lambda Xd32=Xd32, p=p: em_iterations(
                                Xd32, [p], per_call, dtype="float32"
                            ),
                            "daskem_n_init4": lambda Xd=Xd, ps=ps: em_iterations(Xd, ps, per_call),
                            "daskem_one_worker": lambda Xd1=Xd1, p=p, w0=w0: em_iterations(
                                Xd1, [p], per_call, workers=[w0]
                            ),
                        }
                    )
                log(f"case {name}: " + ", ".join(variants) + f" in turn, {rounds} rounds ...")
                timed = interleaved(variants, rounds, pids)
                r = timed.pop("daskem")
                mem = r.pop("peak_MiB")
                bl = timed.pop("blas_limit")
                blas_in_turn = {
                    "GFLOPs": round(1.0 / bl["s_per_iter"], 2),
                    "all_GFLOPs": [round(1.0 / x, 2) for x in bl["all_s"]],
                    "shape": f"rows x {d_} @ {d_} x {k_ * d_} float64",
                }
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
                    "blas_limit_in_turn": blas_in_turn,
                    **timed,
                }
                if Xd1 is not None:
                    row["daskem_peak_MiB_note"] = (
                        "the workers also hold the one-worker copy and the float32 copy of the data"
                    )
                fl = kernel_flops_per_row(ctype, X.shape[1], k) * X.shape[0]
                row["kernel_GFLOP_per_iter"] = round(fl / 1e9, 3)
                row["daskem_GFLOPs"] = round(fl / r["s_per_iter"] / 1e9, 2)
                # the chunk kernel alone: its tasks' compute seconds, every worker busy
                # (sum over tasks / workers), against the same flops
                kt = r.get("kernel_task_s_per_iter")
                if kt:
                    row["kernel_GFLOPs"] = round(fl / (kt / cores) / 1e9, 2)
                if not args.no_sklearn:
                    log(f"case {name}: scikit-learn ...")
                    with PeakMemory({"client": os.getpid()}) as mem_sk:
                        row["sklearn"] = sklearn_s_per_iter(X, p, S["sklearn_iters"])
                    row["sklearn_peak_MiB"] = mem_sk.mib()["client"]
                res["cases"][name] = row
                del Xd, Xd1, Xd32

        # ---- threaded scheduler: Dask threads x BLAS threads --------------------
        log("case a on the threaded scheduler ...")
        from daskem.io import open_array

        Xn = open_array(Xa, chunk_bytes=S["chunk_bytes"])
        p = init_params(Xa, k_a, "full", seed=0)

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
            rounds,
        )

        # ---- out of core ------------------------------------------------------
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
            Xo = open_array(str(store_o))
            # what cache='auto' decides (the full-size store must not fit); stream either way
            auto_persist = bool(Xo.nbytes < 0.5 * mem_total)
            Xs, _ = engine.prepare_data(Xo, False)
            Xq = open_array(str(store_o4))
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
                    "read": lambda: {"all_s": [read_seconds(store_o)]},
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
            res["cases"]["d_out_of_core"] = ooc

        # ---- ratios -----------------------------------------------------------
        R = res["ratios"]
        C = res["cases"]
        for name, row in C.items():
            if "sklearn" in row:
                R[f"{name}_daskem_over_sklearn"] = round(row["daskem"]["s_per_iter"] / row["sklearn"]["s_per_iter"], 3)
                R[f"{name}_sklearn_speedup"] = round(row["sklearn"]["s_per_iter"] / row["daskem"]["s_per_iter"], 2)
        for name in ("a_full", "c_full_D64", "b_diag"):
            # against the limit measured in turn with the passes (the start-of-run
            # figure in `limits` is measured minutes earlier)
            row = C[name]
            limit = row["blas_limit_in_turn"]["GFLOPs"]
            R[f"{name}_GFLOPs_over_blas_limit"] = round(row["daskem_GFLOPs"] / limit, 3)
            if "kernel_GFLOPs" in row:
                R[f"{name}_kernel_GFLOPs_over_blas_limit"] = round(row["kernel_GFLOPs"] / limit, 3)
        a = C["a_full"]
        R["a_float32_speedup_over_float64"] = round(a["daskem"]["s_per_iter"] / a["daskem_float32"]["s_per_iter"], 2)
        if "sklearn" in a:
            # same data, same initial parameters, same number of M-steps
            sk = a["sklearn"]["loglik_by_m_steps"][a["daskem"]["loglik_m_steps"]]
            R["a_loglik_rel_diff_vs_sklearn"] = float(abs(a["daskem"]["loglik"] - sk) / abs(sk))
        R["a_float32_loglik_rel_diff"] = float(
            abs(a["daskem_float32"]["loglik"] - a["daskem"]["loglik"]) / abs(a["daskem"]["loglik"])
        )
        R["a_n_init4_over_n_init1"] = round(a["daskem_n_init4"]["s_per_iter"] / a["daskem"]["s_per_iter"], 2)
        R["a_two_workers_speedup"] = round(a["daskem_one_worker"]["s_per_iter"] / a["daskem"]["s_per_iter"], 2)
        R["blas_one_to_all_cores_speedup"] = res["limits"]["blas_scaling"]["speedup"]
        o = C["d_out_of_core"]
        read_bound = o["store_bytes"] / (res["limits"]["zarr_read"]["MB_per_s"] * 1e6)
        o["read_bound_s"] = round(read_bound, 4)
        R["d_diag_over_read_bound"] = round(o["diag"]["s_per_iter"] / read_bound, 2)
        R["d_full_over_read_bound"] = round(o["full"]["s_per_iter"] / read_bound, 2)
        R["d_diag_n_init4_over_n_init1"] = round(o["diag_n_init4"]["s_per_iter"] / o["diag"]["s_per_iter"], 2)
        wq = max(v for k, v in o["diag_quarter_N"]["peak_MiB"].items() if k.startswith("worker"))
        wn = max(v for k, v in o["diag"]["peak_MiB"].items() if k.startswith("worker"))
        R["d_worker_peak_MiB_at_N_and_4N"] = [wq, wn]
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


def print_table(res: dict) -> None:
    m = res["meta"]
    print(
        f"daskem benchmark  {m['date']}  {m['machine']}  {m['cores']} cores  {m['ram_GiB']} GiB  "
        f"load {m['load_avg_start'][0]:.2f}->{m.get('load_avg_end', [0])[0]:.2f}  quick={m['quick']}"
    )
    print("\n[1] limits")
    for k, v in res["limits"]["blas_gflops"].items():
        print(f"  BLAS {k:40s} {v:8.2f} GFLOP/s")
    sc = res["limits"]["blas_scaling"]
    print(f"  BLAS one core -> {m['cores']} cores ({sc['shape']}): {sc['speedup']}x")
    z = res["limits"]["zarr_read"]
    print(f"  Zarr read+decompress {z['bytes'] / 1e6:.0f} MB in {z['seconds']} s = {z['MB_per_s']} MB/s")
    for name, r in res["cases"].items():
        if "blas_limit_in_turn" in r:
            b = r["blas_limit_in_turn"]
            print(f"  BLAS {b['shape']} in turn with case {name}'s passes: {b['GFLOPs']} GFLOP/s")
    print("\n[2] seconds per iteration")
    print(
        f"  {'case':14s} {'N':>9s} {'D':>3s} {'K':>3s} {'daskem':>9s} {'sklearn':>9s} {'GFLOP/s':>8s} {'kernel':>8s} "
        f"{'client MiB':>10s} {'worker MiB':>14s} {'sklearn MiB':>11s}"
    )
    for name, r in res["cases"].items():
        if name == "d_out_of_core":
            continue
        pk = r["daskem_peak_MiB"]
        wk = "/".join(f"{v:.0f}" for k, v in pk.items() if k.startswith("worker"))
        sk = r.get("sklearn", {}).get("s_per_iter", float("nan"))
        print(
            f"  {name:14s} {r['N']:9d} {r['D']:3d} {r['K']:3d} {r['daskem']['s_per_iter']:9.3f} {sk:9.3f} "
            f"{r['daskem_GFLOPs']:8.2f} {r.get('kernel_GFLOPs', float('nan')):8.2f} {pk['client']:10.0f} {wk:>14s} {r.get('sklearn_peak_MiB', float('nan')):11.0f}"
        )
    a = res["cases"]["a_full"]
    print(
        f"  a float32 {a['daskem_float32']['s_per_iter']:.3f}  n_init=4 {a['daskem_n_init4']['s_per_iter']:.3f}  "
        f"one worker {a['daskem_one_worker']['s_per_iter']:.3f}"
    )
    for k, v in a["threaded_scheduler"].items():
        print(f"  a threaded scheduler {k:32s} {v['s_per_iter']:.3f}")
    o = res["cases"]["d_out_of_core"]
    print(
        f"  out of core: N={o['N']} store {o['store_bytes'] / 1e6:.0f} MB > workers' limits "
        f"{o['workers_memory_limit_total'] / 1e6:.0f} MB, read bound {o['read_bound_s']} s"
    )
    for k in ("diag", "full", "diag_n_init4", "diag_quarter_N"):
        pk = o[k].get("peak_MiB", {})
        print(f"    {k:16s} {o[k]['s_per_iter']:8.3f} s/iter  peak MiB {pk}")
    print("\n[3] ratios")
    for k, v in res["ratios"].items():
        print(f"  {k:40s} {v}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
