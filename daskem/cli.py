"""The ``daskem`` command line (``python -m daskem`` is the same).

Subcommands: ``demo``, ``generate``, ``fit``, ``select-k``, ``predict``,
``score``, ``run``, ``submit``, ``status``, ``result``. Exit status 0 on
success, 2 on bad arguments or bad input (one line on stderr, no traceback),
1 on other failures. Every output is built under a temporary name and renamed
into place, so a failed command never leaves half a result where a good one was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .io import InputError

#: rows gathered on the client for plots and the training log-density quantiles
REPORT_SAMPLE_ROWS = 20_000

#: spread of the demo's true means: overlapping enough that EM has work to do
DEMO_SEPARATION = 3.0

#: GaussianMixture options exposed as ``--name-with-dashes``
_MODEL_OPTIONS: list[tuple[str, dict]] = [
    ("covariance_type", {"choices": ["full", "tied", "diag", "spherical"], "help": "covariance type (default: full)"}),
    ("algorithm", {"choices": ["soft", "hard"], "help": "soft EM or hard (classification) EM (default: soft)"}),
    ("n_init", {"type": int, "metavar": "N", "help": "restarts, sharing passes over the data (default: 1)"}),
    ("max_iter", {"type": int, "metavar": "N", "help": "maximum EM iterations (default: 100)"}),
    (
        "tol",
        {"type": float, "metavar": "TOL", "help": "convergence threshold on the mean log-likelihood (default: 1e-3)"},
    ),
    ("reg_covar", {"type": float, "metavar": "R", "help": "added to covariance diagonals (default: 1e-6)"}),
    ("random_state", {"type": int, "metavar": "SEED", "help": "random seed (default: none)"}),
    (
        "init_params",
        {"choices": ["kmeans", "k-means++", "random_from_data", "random"], "help": "initialisation (default: kmeans)"},
    ),
    ("missing", {"choices": ["error", "marginalize"], "help": "what to do with NaN entries (default: error)"}),
    (
        "checkpoint",
        {"metavar": "PATH", "help": "checkpoint folder: written every iteration, resumed from when present"},
    ),
    ("cache", {"choices": ["auto", "true", "false"], "help": "persist the data in cluster memory (default: auto)"}),
    ("dtype", {"choices": ["float64", "float32"], "help": "compute dtype of the chunk kernel (default: float64)"}),
    ("split_every", {"type": int, "metavar": "N", "help": "fan-in of the tree reduction (default: 8)"}),
    ("chunk_bytes", {"type": int, "metavar": "BYTES", "help": "target bytes per row chunk (default: 32 MiB)"}),
]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2, as argparse does)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# --------------------------------------------------------------------------
# argument helpers
# --------------------------------------------------------------------------


def parse_k_values(text: str) -> list[int]:
    """``"2:12"`` (inclusive), ``"2:12:2"``, ``"2,4,8"`` or ``"5"`` → list of K."""
    text = str(text).strip()
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            start, stop = parts[0], parts[1]
            step = parts[2] if len(parts) == 3 else 1
            if step < 1 or stop < start:
                raise ValueError
            values = list(range(start, stop + 1, step))
        else:
            values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise InputError(
            f"cannot read K values from {text!r}; write a range 2:12 (or 2:12:2) or a list 2,4,8"
        ) from None
    if not values or min(values) < 1:
        raise InputError(f"K values must be integers >= 1, got {text!r}")
    return sorted(set(values))


def model_options(args: argparse.Namespace) -> dict:
    """The GaussianMixture keywords given on the command line."""
    out = {}
    for name, _ in _MODEL_OPTIONS:
        v = getattr(args, name, None)
        if v is None:
            continue
        if name == "cache":
            v = {"auto": "auto", "true": True, "false": False}[v]
        out[name] = v
    return out


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model options (GaussianMixture keywords)")
    for name, kw in _MODEL_OPTIONS:
        g.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kw)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="Zarr store path or URL (s3://, gs://, ...), or a .npy file")
    p.add_argument("--array", metavar="NAME", help="the array inside a Zarr group")


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (default: a local cluster sized to this machine)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--scheduler", metavar="ADDRESS", help="address of a running Dask scheduler, e.g. tcp://host:8786")
    x.add_argument(
        "--scheduler-file", metavar="FILE", help="scheduler file written by `dask scheduler --scheduler-file`"
    )
    g.add_argument(
        "--security",
        metavar="FILE",
        help="TLS: a Dask config file with the client's certificates (default: security.yaml beside "
        "--scheduler-file, as deploy/local/start-cluster.sh writes it)",
    )
    g.add_argument("--n-workers", type=int, metavar="N", help="local cluster: worker processes")
    g.add_argument("--threads-per-worker", type=int, metavar="N", help="local cluster: threads per worker")
    g.add_argument(
        "--memory-limit", metavar="BYTES", help="local cluster: memory per worker, e.g. 4GiB (default: auto)"
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


# --------------------------------------------------------------------------
# cluster
# --------------------------------------------------------------------------


def _say(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def local_cluster_config() -> dict:
    """Dask settings of the clusters daskem starts (``LocalCluster``, ``deploy/``).

    distributed's statistical profiler samples every thread every 10 ms; on
    the chunk kernel (many short numpy calls, each giving up the GIL) it made
    the chunk tasks 8-15% slower (``benchmarks/README.md``). It is off unless
    ``DASKEM_WORKER_PROFILE=1``.
    """
    if os.environ.get("DASKEM_WORKER_PROFILE", "") not in ("", "0"):
        return {}
    return {"distributed.worker.profile.enabled": False}


@contextlib.contextmanager
def cluster_client(args: argparse.Namespace, defaults: dict | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` for the command: an existing cluster, or a local one.

    ``defaults`` (e.g. a job file's ``[cluster]`` table) fill in what the
    command line did not give. A TLS cluster's certificates come from
    ``--security FILE`` or the ``security.yaml`` beside the scheduler file
    (:func:`daskem.security.find_security`). The local cluster listens on
    127.0.0.1 only, its dashboard too.
    """
    import dask
    from distributed import Client, LocalCluster

    from .security import find_security

    defaults = defaults or {}
    scheduler = getattr(args, "scheduler", None) or (
        None if getattr(args, "scheduler_file", None) else defaults.get("scheduler")
    )
    scheduler_file = getattr(args, "scheduler_file", None) or (None if scheduler else defaults.get("scheduler_file"))
    logging.getLogger("distributed").setLevel(logging.ERROR if getattr(args, "quiet", False) else logging.WARNING)
    cluster = None
    try:
        if scheduler or scheduler_file:
            target = scheduler or f"scheduler file {scheduler_file}"
            if scheduler_file and not Path(scheduler_file).exists():
                raise InputError(f"no such scheduler file: {scheduler_file}")
            security = find_security(scheduler, scheduler_file, getattr(args, "security", None))
            try:
                client = Client(
                    scheduler,
                    scheduler_file=scheduler_file,
                    security=security,
                    timeout=os.environ.get("DASKEM_CONNECT_TIMEOUT", "20s"),
                )
            except (OSError, TimeoutError) as exc:
                raise InputError(f"cannot connect to the Dask scheduler at {target}: {exc}") from exc
        else:
            if getattr(args, "security", None):
                raise InputError("--security is for a running cluster: give --scheduler or --scheduler-file too")
            # this host only: anyone who reaches a scheduler can run code on its workers
            kw: dict = {"processes": True, "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}
            for name in ("n_workers", "threads_per_worker", "memory_limit"):
                v = getattr(args, name, None)
                v = defaults.get(name) if v is None else v
                if v is not None:
                    kw[name] = v
            with warnings.catch_warnings(), dask.config.set(local_cluster_config()):
                warnings.simplefilter("ignore")
                cluster = LocalCluster(**kw)
            client = Client(cluster)
        try:
            n = len(client.scheduler_info().get("workers", {}))
            where = "local cluster" if cluster is not None else f"cluster at {client.scheduler.address}"
            _say(args, f"dask: {where}, {n} worker(s); dashboard {client.dashboard_link}")
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


# --------------------------------------------------------------------------
# shared steps
# --------------------------------------------------------------------------


def open_data(path: str, array: str | None = None, chunk_bytes: int | None = None) -> Any:
    """Open the input lazily; refuse a missing/unreadable store before any cluster starts."""
    from .io import open_array

    return open_array(path, array=array, chunk_bytes=chunk_bytes)


def check_output(path: str | Path, what: str = "output folder") -> Path:
    """Refuse an output path that is an existing file (a folder is replaced atomically)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"the {what} {p} exists and is not a folder")
    return p


def report_sample(X: Any, seed: int | None) -> Any:
    from . import _engine as engine

    return engine.sample_rows(X, REPORT_SAMPLE_ROWS, 0 if seed is None else int(seed))


def load_model_dir(path: str | Path) -> tuple[Any, dict | None]:
    """A fitted model and its summary from ``fit --out DIR`` (or a bare model folder)."""
    from .mixture import load

    p = Path(path)
    if not p.exists():
        raise InputError(f"no such model folder: {p}")
    if (p / "model" / "model.json").exists():
        gm = load(p / "model")
        summary_file = p / "summary.json"
    else:
        gm = load(p)
        summary_file = p.parent / "summary.json"
    summary = None
    if summary_file.exists():
        try:
            summary = json.loads(summary_file.read_text())
        except json.JSONDecodeError:
            summary = None
    return gm, summary


def fit_and_report(
    X: Any,
    out: Path,
    *,
    k: int | None = None,
    k_values: Sequence[int] | None = None,
    criterion: str = "validation",
    validation_fraction: float = 0.1,
    options: dict,
    verbose: int,
    extra: dict | None = None,
) -> dict:
    """Fit one K (``k``) or choose among ``k_values``; write the report into ``out`` atomically."""
    from .io import atomic_dir
    from .mixture import GaussianMixture
    from .report import write_report

    t0 = time.perf_counter()
    table = best_k = runs = None
    if k_values is not None:
        try:
            from .select import select_k
        except ImportError as exc:  # pragma: no cover - select.py ships with daskem
            raise RuntimeError(f"daskem.select_k is not available in this installation: {exc}") from exc
        res = select_k(
            X, list(k_values), criterion=criterion, validation_fraction=validation_fraction, **options, verbose=verbose
        )
        gm, table, best_k = res.best_model, [dict(r) for r in res.table], int(res.best_k)
        models = getattr(res, "models", None) or {best_k: gm}
        runs = [r for k in sorted(models) for r in getattr(models[k], "runs_", [])]
    else:
        gm = GaussianMixture(n_components=k, **options, verbose=verbose)
        gm.fit(X)
    seconds = time.perf_counter() - t0
    sample = report_sample(X, options.get("random_state"))
    tmp, commit = atomic_dir(out)
    try:
        summary = write_report(
            tmp,
            gm,
            sample,
            table=table,
            best_k=best_k,
            criterion=criterion if table is not None else None,
            runs=runs,
            extra={"fit_seconds": seconds, "n_samples": int(X.shape[0]), **(extra or {})},
        )
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def write_predictions(
    gm: Any,
    X: Any,
    out: Path,
    *,
    proba: bool = False,
    anomaly_threshold: float | None = None,
    store_rows: int | None = None,
    attrs: dict | None = None,
) -> dict:
    """Write labels (and responsibilities, log-density and anomaly flags) as a Zarr group.

    All outputs are lazy Dask arrays of the same row chunks as ``X``, stored
    together in one graph (each input chunk is read once) with ``da.store``
    into Zarr arrays whose row chunks match the input's; nothing is gathered
    on the client. The group is built under a temporary name and renamed.
    """
    import dask.array as da
    import numpy as np
    import zarr

    from .io import atomic_dir

    rows = X.chunks[0]
    # output chunks: the store's chunk rows when the dask chunks are whole
    # multiples of them (no two tasks write one zarr chunk), else the dask chunks
    chunk = rows[0]
    if store_rows and all(r % store_rows == 0 for r in rows[:-1]):
        chunk = store_rows
    # one scoring of each chunk serves every output
    outputs = gm.predict_outputs(X, proba=proba, log_density=anomaly_threshold is not None)
    if anomaly_threshold is not None:
        outputs["anomaly"] = outputs["log_density"] < anomaly_threshold
    tmp, commit = atomic_dir(out)
    try:
        root = zarr.open_group(str(tmp), mode="w")
        targets, sources = [], []
        for name, arr in outputs.items():
            shape = arr.shape
            z = root.create_array(name, shape=shape, chunks=(chunk,) + shape[1:], dtype=arr.dtype)
            targets.append(z)
            sources.append(arr)
        root.attrs.update({"daskem": {"outputs": list(outputs), **(attrs or {})}})
        da.store(sources, targets, lock=False)
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_anom = None
    if anomaly_threshold is not None:
        n_anom = (
            int(np.asarray(zarr.open_group(str(out), mode="r")["anomaly"][:]).sum())
            if X.shape[0] <= 10_000_000
            else None
        )
    return {"path": str(out), "arrays": list(outputs), "chunk_rows": int(chunk), "n_anomalies": n_anom}


def store_chunk_rows(path: str, array: str | None) -> int | None:
    """Row chunk length of a Zarr input (None for .npy or unreadable metadata)."""
    if str(path).endswith(".npy"):
        return None
    try:
        import zarr

        node = zarr.open(path, mode="r")
        if isinstance(node, zarr.Group):
            names = [n for n, _ in node.arrays()]
            node = node[array or names[0]]
        return int(node.chunks[0])
    except Exception:
        return None


def anomaly_threshold(summary: dict | None, q: float) -> float:
    """The log-density threshold at training quantile ``q`` stored by ``fit``."""
    from .report import threshold_from_quantiles

    if not 0.0 < q < 1.0:
        raise InputError(f"--anomaly-quantile must be between 0 and 1, got {q}")
    quant = (summary or {}).get("training_log_density_quantiles")
    if not quant:
        raise InputError(
            "the model folder has no training log-density quantiles (summary.json from `daskem fit`); "
            "refit with `daskem fit`, or pass the folder that `fit --out` wrote"
        )
    return threshold_from_quantiles(quant, q)


# --------------------------------------------------------------------------
# subcommands
# --------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from .datasets import generate_zarr, truth_path

    check_output(args.out, "output store")
    t0 = time.perf_counter()
    generate_zarr(
        args.out,
        args.n_samples,
        args.n_features,
        args.n_components,
        seed=args.seed,
        chunk_rows=args.chunk_rows,
        dtype=args.dtype,
        separation=args.separation,
    )
    _say(args, f"wrote {args.n_samples:,} x {args.n_features} rows in {time.perf_counter() - t0:.1f} s")
    print(f"{args.out}\t(true parameters: {truth_path(args.out)})")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from .mixture import GaussianMixture

    opts = model_options(args)
    GaussianMixture(n_components=args.k, **opts)._validate_params()
    out = check_output(args.out)
    X = open_data(args.data, args.array, opts.get("chunk_bytes"))
    with cluster_client(args):
        summary = fit_and_report(
            X,
            out,
            k=args.k,
            options=opts,
            verbose=0 if args.quiet else 1,
            extra={"command": "fit", "input": {"path": args.data, "array": args.array}},
        )
    m = summary["model"]
    _say(
        args,
        f"K={m['n_components']}: mean log-likelihood {m['lower_bound']:.6f} after {m['n_iter']} iterations"
        f" ({'converged' if m['converged'] else 'NOT converged'})",
    )
    print(out)
    return 0


def cmd_select_k(args: argparse.Namespace) -> int:
    from .mixture import GaussianMixture

    ks = parse_k_values(args.k)
    opts = model_options(args)
    GaussianMixture(n_components=max(ks), **opts)._validate_params()
    if not 0.0 < args.validation_fraction < 1.0:
        raise InputError(f"--validation-fraction must be between 0 and 1, got {args.validation_fraction}")
    out = check_output(args.out)
    X = open_data(args.data, args.array, opts.get("chunk_bytes"))
    with cluster_client(args):
        summary = fit_and_report(
            X,
            out,
            k_values=ks,
            criterion=args.criterion,
            validation_fraction=args.validation_fraction,
            options=opts,
            verbose=0 if args.quiet else 1,
            extra={"command": "select-k", "input": {"path": args.data, "array": args.array}},
        )
    if not args.quiet:
        print(f"{'K':>4} {'train':>12} {'validation':>12} {'BIC':>14} {'AIC':>14} {'iter':>5}", file=sys.stderr)
        for r in summary["select_k"]["table"]:
            v = r.get("validation_loglik")
            print(
                f"{r['k']:>4} {r['train_loglik']:>12.5f} {(v if v is not None else float('nan')):>12.5f} "
                f"{r['bic']:>14.1f} {r['aic']:>14.1f} {r['n_iter']:>5}",
                file=sys.stderr,
            )
        print(f"best K = {summary['best_k']} ({args.criterion})", file=sys.stderr)
    print(out)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    gm, summary = load_model_dir(args.model_dir)
    threshold = None
    if args.anomaly_quantile is not None:
        threshold = anomaly_threshold(summary, args.anomaly_quantile)
    out = check_output(args.out, "output store")
    X = open_data(args.data, args.array)
    gm._check_features(X.shape[1])
    with cluster_client(args):
        t0 = time.perf_counter()
        res = write_predictions(
            gm,
            X,
            out,
            proba=args.proba,
            anomaly_threshold=threshold,
            store_rows=store_chunk_rows(args.data, args.array),
            attrs={
                "model": str(args.model_dir),
                "input": args.data,
                "anomaly_quantile": args.anomaly_quantile,
                "anomaly_threshold": threshold,
            },
        )
    _say(args, f"wrote {', '.join(res['arrays'])} for {X.shape[0]:,} rows in {time.perf_counter() - t0:.1f} s")
    if threshold is not None and res["n_anomalies"] is not None:
        _say(
            args,
            f"{res['n_anomalies']:,} rows below the training log-density quantile {args.anomaly_quantile}"
            f" (log p(x) < {threshold:.4f})",
        )
    print(out)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import math

    gm, _ = load_model_dir(args.model_dir)
    X = open_data(args.data, args.array)
    gm._check_features(X.shape[1])
    with cluster_client(args):
        mean = gm.score(X)
    n = int(X.shape[0])
    p = gm.params_.n_parameters()
    total = mean * n
    print(
        json.dumps(
            {
                "n_samples": n,
                "mean_loglik": mean,
                "total_loglik": total,
                "bic": -2.0 * total + p * math.log(n),
                "aic": -2.0 * total + 2.0 * p,
                "n_parameters": p,
            },
            indent=2,
        )
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from .datasets import generate_zarr
    from .io import atomic_dir

    out = check_output(args.out)
    ks = parse_k_values(args.k)
    tmp, commit = atomic_dir(out)
    try:
        data = tmp / "data.zarr"
        _say(args, f"generating {args.n_samples:,} rows, {args.n_features} features, {args.n_components} components")
        truth = generate_zarr(
            data,
            args.n_samples,
            args.n_features,
            args.n_components,
            seed=args.seed,
            chunk_rows=max(1, args.n_samples // 8),
            separation=args.separation,
        )
        X = open_data(str(data), chunk_bytes=max(4096, args.n_samples * args.n_features * 8 // 8))
        opts = {
            "covariance_type": "full",
            "n_init": args.n_init,
            "random_state": args.seed,
            "max_iter": 200,
            "init_params": "k-means++",
        }
        t0 = time.perf_counter()
        with cluster_client(args):
            summary = fit_and_report(
                X,
                tmp / "report",
                k_values=ks,
                criterion="validation",
                options=opts,
                verbose=0 if args.quiet else 1,
                extra={"command": "demo", "truth": truth.to_json()},
            )
            gm, _ = load_model_dir(tmp / "report")
            write_predictions(gm, X, tmp / "labels.zarr", store_rows=max(1, args.n_samples // 8))
        import zarr

        from .datasets import sample_chunk

        # agreement with the true labels on fresh rows (best one-to-one matching of components)
        xs, ys = sample_chunk(truth, 20_000, np.random.default_rng([args.seed, 99]))
        pred = gm.predict(xs)
        agreement = _matched_agreement(ys, pred)
        elapsed = time.perf_counter() - t0
        summary["demo"] = {
            "true_k": args.n_components,
            "chosen_k": summary["best_k"],
            "label_agreement": agreement,
            "seconds": elapsed,
        }
        from .report import write_summary

        write_summary(tmp / "report" / "summary.json", summary)
        assert zarr.open_group(str(tmp / "labels.zarr"), mode="r")["labels"].shape[0] == args.n_samples
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(
        args,
        f"true K = {args.n_components}, chosen K = {summary['best_k']}, "
        f"label agreement with the truth {100 * agreement:.1f}% ({elapsed:.0f} s)",
    )
    _say(args, f"report: {out / 'report'} (summary.json, loglik.png, select_k.png, projection.png)")
    print(out)
    return 0


def _matched_agreement(truth: Any, pred: Any) -> float:
    """Fraction of rows whose predicted component matches the true one under the best matching."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    kt, kp = int(truth.max()) + 1, int(pred.max()) + 1
    c = np.zeros((kt, kp))
    np.add.at(c, (truth, pred), 1)
    r, col = linear_sum_assignment(-c)
    return float(c[r, col].sum() / len(truth))


def cmd_run(args: argparse.Namespace) -> int:
    from . import jobs

    job = jobs.load_job(args.job)
    job_id = jobs.new_job_id()
    jobs.register(job_id, job, mode="run")
    with cluster_client(args, defaults=job["cluster"]):
        _say(args, f"job {job_id}: output {job['output']['path']}")
        result = jobs.run_job(job, job_id, verbose=0 if args.quiet else 1)
    print(json.dumps({"id": job_id, **result}, indent=2))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from . import jobs

    job = jobs.load_job(args.job)
    if args.scheduler:
        job["cluster"]["scheduler"] = args.scheduler
    if args.scheduler_file:
        job["cluster"]["scheduler_file"] = args.scheduler_file
    job_id = jobs.submit(job)
    _say(args, f"submitted job {job_id}; follow it with `daskem status {job_id}`")
    print(job_id)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from . import jobs

    if args.job_id:
        print(json.dumps(jobs.job_status(args.job_id), indent=2))
        return 0
    rows = jobs.list_jobs()
    if not rows:
        _say(args, f"no jobs recorded in {jobs.registry_dir()}")
    for s in rows:
        print(f"{s['id']}\t{s['state']}\t{s.get('output', '')}")
    return 0


def cmd_result(args: argparse.Namespace) -> int:
    from . import jobs

    s = jobs.job_status(args.job_id)
    deadline = time.monotonic() + (args.timeout or 0)
    while args.wait and s["state"] in ("queued", "running") and (not args.timeout or time.monotonic() < deadline):
        time.sleep(1.0)
        s = jobs.job_status(args.job_id)
    if s["state"] == "failed":
        print(f"daskem: job {args.job_id} failed: {s.get('error')}", file=sys.stderr)
        return 1
    if s["state"] != "done":
        print(f"daskem: job {args.job_id} is {s['state']}; no result yet (use --wait)", file=sys.stderr)
        return 1
    print(json.dumps(jobs.job_result(args.job_id), indent=2))
    return 0


# --------------------------------------------------------------------------
# parser and entry point
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="daskem",
        description="Gaussian mixture models fitted by EM on chunked, larger-than-memory data, on a Dask cluster.",
        epilog="Run `daskem COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"daskem {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "demo",
        help="generate data, choose K, fit and report, on embedded defaults",
        description="The main job on embedded defaults: generate a synthetic mixture, choose K by "
        "held-out log-likelihood, fit, predict, and write a report.",
    )
    p.add_argument("--out", default="daskem-demo", metavar="DIR", help="output folder (default: ./daskem-demo)")
    p.add_argument("--n-samples", type=int, default=300_000, metavar="N", help="rows (default: 300000)")
    p.add_argument("--n-features", type=int, default=4, metavar="D", help="features (default: 4)")
    p.add_argument("--n-components", type=int, default=5, metavar="K", help="true components (default: 5)")
    p.add_argument("--k", default="2:8", metavar="RANGE", help="candidate K values (default: 2:8)")
    p.add_argument("--n-init", type=int, default=2, metavar="N", help="restarts per K (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--separation",
        type=float,
        default=DEMO_SEPARATION,
        metavar="S",
        help=f"spread of the true means relative to the component widths (default: {DEMO_SEPARATION})",
    )
    _add_cluster_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "generate",
        help="write a synthetic Gaussian mixture to a Zarr store",
        description="Write rows of a random Gaussian mixture to a Zarr array, chunk by chunk "
        "(out-of-core); the true parameters go to OUT.truth.json.",
    )
    p.add_argument("out", metavar="OUT.zarr")
    p.add_argument("--n-samples", type=int, required=True, metavar="N")
    p.add_argument("--n-features", type=int, required=True, metavar="D")
    p.add_argument("--n-components", type=int, required=True, metavar="K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-rows", type=int, default=100_000, metavar="N", help="rows per Zarr chunk (default: 100000)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument(
        "--separation",
        type=float,
        default=6.0,
        metavar="S",
        help="spread of the means relative to the component widths (default: 6)",
    )
    _add_common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "fit",
        help="fit a mixture with K components",
        description="Fit a Gaussian mixture by EM and write DIR/model/, DIR/summary.json and plots.",
    )
    _add_data_options(p)
    p.add_argument("--k", type=int, required=True, metavar="K", help="number of components (n_components)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (replaced atomically)")
    _add_model_options(p)
    _add_cluster_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser(
        "select-k",
        help="choose the number of components",
        description="Fit every K (sharing passes "
        "over the data) and keep the best by held-out log-likelihood, BIC or AIC.",
    )
    _add_data_options(p)
    p.add_argument("--k", required=True, metavar="RANGE", help="K values: a range 2:12 (inclusive) or a list 2,4,8")
    p.add_argument("--criterion", choices=["validation", "bic", "aic"], default="validation")
    p.add_argument("--validation-fraction", type=float, default=0.1, metavar="F", help="held-out rows (default: 0.1)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (replaced atomically)")
    _add_model_options(p)
    _add_cluster_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_select_k)

    p = sub.add_parser(
        "predict",
        help="write labels (and responsibilities, anomaly flags) to Zarr",
        description="Write per-row outputs as a Zarr group chunked like the input: `labels`; with "
        "--proba `proba`; with --anomaly-quantile `log_density` and `anomaly` (log p(x) "
        "below that quantile of the training log-density).",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by `daskem fit --out` (or its model/)")
    _add_data_options(p)
    p.add_argument("--out", required=True, metavar="LABELS.zarr")
    p.add_argument("--proba", action="store_true", help="also write responsibilities")
    p.add_argument(
        "--anomaly-quantile", type=float, metavar="Q", help="flag rows below quantile Q of the training log-density"
    )
    _add_cluster_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "score",
        help="mean log-likelihood, BIC and AIC of a model on data",
        description="Print the mean log-likelihood per row, BIC and AIC of a model on DATA as JSON.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR")
    _add_data_options(p)
    _add_cluster_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "run",
        help="run a batch job file in the foreground",
        description="Run a TOML job file in the "
        "foreground, with checkpoints in its output folder (a job run again resumes).",
    )
    p.add_argument("job", metavar="JOB.toml")
    _add_cluster_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "submit",
        help="hand a job file to a running cluster",
        description="Hand a TOML job file to a "
        "running Dask cluster: it keeps running after this command exits. Prints the job id.",
    )
    p.add_argument("job", metavar="JOB.toml")
    x = p.add_mutually_exclusive_group()
    x.add_argument("--scheduler", metavar="ADDRESS", help="address of a running Dask scheduler")
    x.add_argument("--scheduler-file", metavar="FILE", help="scheduler file of a running Dask scheduler")
    _add_common(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "status",
        help="state of a job, or of all recorded jobs",
        description="State (queued, running, done, failed) of a job, or a list of all recorded jobs "
        "(registry: $DASKEM_HOME/jobs, default ~/.daskem/jobs).",
    )
    p.add_argument("job_id", nargs="?", metavar="JOB_ID")
    _add_common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "result",
        help="the result of a finished job",
        description="Print the result of a finished job "
        "(output folder, summary). Exit 1 if it failed or has not finished.",
    )
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--wait", action="store_true", help="wait until the job has finished")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="with --wait: give up after this long")
    _add_common(p)
    p.set_defaults(func=cmd_result)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``daskem`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            if args.quiet:
                warnings.simplefilter("ignore")
            return int(args.func(args) or 0)
    except InputError as exc:
        print(f"daskem: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("daskem: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("DASKEM_DEBUG"):
            traceback.print_exc()
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"daskem: error: {type(exc).__name__}: {msg} (set DASKEM_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
