"""The ``daskem`` command line (``python -m daskem`` is the same).

Subcommands: ``demo``, ``generate``, ``fit``, ``select-k``, ``predict``,
``score``, ``run``, ``submit``, ``status``, ``result``. Exit status 0 on
success, 2 on bad arguments or bad input (one line on stderr, no traceback),
1 on other failures, 130 on Ctrl-C.

Outputs follow :mod:`daskem._outputs`: checked before any work starts (a new
path, an empty folder, or a daskem output of the same kind, replaced; another
daskem kind only with ``--overwrite``; nothing else, ever), built under a
temporary name and swapped into place, so a failed or interrupted command
never leaves half a result where a good one was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__, _outputs, jobs
from ._covariance import COVARIANCE_TYPES
from ._durations import format_seconds
from .errors import InputError, InputNotFoundError

if TYPE_CHECKING:
    from .mixture import GaussianMixture

# Dask, scikit-learn and the fit are imported by the commands that use them:
# ``daskem --help``, ``--version``, ``status`` and ``result`` start in a
# fraction of a second.

#: spread of the demo's true means: overlapping enough that EM has work to do
DEMO_SEPARATION = 3.0

#: GaussianMixture options exposed as ``--name-with-dashes``
_MODEL_OPTIONS: list[tuple[str, dict]] = [
    (
        "covariance_type",
        {
            "choices": list(COVARIANCE_TYPES),
            "metavar": "TYPE",
            "help": f"covariance type: {', '.join(COVARIANCE_TYPES)} (default: full)",
        },
    ),
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
    (
        "accelerate",
        {
            "choices": ["none", "squarem"],
            "help": "squarem: SQUAREM-accelerated EM, stopping on the estimated remaining gain (fewer passes "
            "on slowly converging data); none: plain EM, scikit-learn's trajectory and tol (default: squarem)",
        },
    ),
    ("missing", {"choices": ["error", "marginalize"], "help": "what to do with NaN entries (default: error)"}),
    (
        "checkpoint",
        {
            "metavar": "PATH",
            "help": "checkpoint folder: written every iteration, resumed from when present (default: none)",
        },
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


def model_options(args: argparse.Namespace) -> dict:
    """The GaussianMixture keywords given on the command line."""
    out = {}
    for name, _ in _MODEL_OPTIONS:
        v = getattr(args, name, None)
        if v is None:
            continue
        if name == "cache":
            v = {"auto": "auto", "true": True, "false": False}[v]
        if name == "accelerate":
            v = None if v == "none" else v
        out[name] = v
    return out


def _add_model_options(p: argparse.ArgumentParser, replace: dict[str, dict] | None = None) -> None:
    """The model options; ``replace`` maps an option name to the argparse keywords a command uses instead."""
    g = p.add_argument_group("model options (GaussianMixture keywords)")
    for name, kw in _MODEL_OPTIONS:
        kw = (replace or {}).get(name, kw)
        g.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kw)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="Zarr store path or URL (s3://, gs://, ...), or a .npy file")
    p.add_argument("--array", metavar="NAME", help="the array inside a Zarr group (default: the group's only array)")


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (default: a local cluster sized to this machine)")
    x = g.add_mutually_exclusive_group()
    x.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="address of a running Dask scheduler, e.g. tcp://host:8786 (default: start a local cluster)",
    )
    x.add_argument(
        "--scheduler-file",
        metavar="FILE",
        help="scheduler file written by `dask scheduler --scheduler-file` (default: start a local cluster)",
    )
    g.add_argument(
        "--security",
        metavar="FILE",
        help="TLS: a Dask config file with the client's certificates (default: security.yaml beside "
        "--scheduler-file, as deploy/local/start-cluster.sh writes it)",
    )
    g.add_argument(
        "--n-workers",
        type=int,
        metavar="N",
        help="local cluster: worker processes (default: chosen by Dask for this machine's cores)",
    )
    g.add_argument(
        "--threads-per-worker",
        type=int,
        metavar="N",
        help="local cluster: threads per worker (default: chosen by Dask)",
    )
    g.add_argument(
        "--memory-limit", metavar="BYTES", help="local cluster: memory per worker, e.g. 4GiB (default: auto)"
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def _add_fresh(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start afresh: move the job's checkpoint aside (to checkpoint.old-<time>) instead of resuming",
    )


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a daskem output of another kind at the output path (a previous output of the same kind "
        "is always replaced; a folder daskem did not write, a file or the input never are)",
    )


def _add_output_folder(p: argparse.ArgumentParser) -> None:
    """``--out DIR`` (required) and ``--overwrite``, for the commands that write a model folder."""
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder (a previous one of the same kind is replaced atomically)",
    )
    _add_overwrite(p)


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
    import dask  # lazy: see the top
    from distributed import Client, LocalCluster  # lazy: see the top

    from .security import find_security  # lazy: see the top

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
                raise InputNotFoundError(f"no such scheduler file: {scheduler_file}")
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
# subcommands
# --------------------------------------------------------------------------


def _out_target(args: argparse.Namespace, kind: str, inputs: Sequence[str | None] = ()) -> _outputs.OutputTarget:
    """Check ``--out`` before any work: refuses what daskem may not write over (exit 2)."""
    target = _outputs.check_output(args.out, kind, inputs=inputs, overwrite=getattr(args, "overwrite", False))
    args._out_target = target
    return target


def _say_written(args: argparse.Namespace, target: _outputs.OutputTarget) -> None:
    if target.previous is not None:
        _say(args, target.describe())


def cmd_generate(args: argparse.Namespace) -> int:
    from .datasets import check_generate_target, generate_zarr, truth_path  # lazy: see the top

    target = check_generate_target(args.out, overwrite=args.overwrite)
    args._out_target = target
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
        target=target,
    )
    _say(
        args,
        f"wrote {args.n_samples:,} rows x {args.n_features:,} features in {time.perf_counter() - t0:.1f} s",
    )
    _say_written(args, target)
    print(f"{args.out}\t(true parameters: {truth_path(args.out)})")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    opts = model_options(args)
    # --out first: a refused target is answered before the slow imports below
    target = _out_target(args, "fit", [args.data, opts.get("checkpoint")])
    from .mixture import GaussianMixture  # lazy: see the top
    from .workflows import fit_and_report, open_data  # lazy: see the top

    GaussianMixture(n_components=args.k, **opts)._validate_params()
    X = open_data(args.data, args.array, opts.get("chunk_bytes"))
    with cluster_client(args):
        summary = fit_and_report(
            X,
            target,
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
    _say_written(args, target)
    print(target.path if Path(args.out).is_absolute() else args.out)
    return 0


def cmd_select_k(args: argparse.Namespace) -> int:
    opts = model_options(args)
    # --out first: a refused target is answered before the slow imports below
    target = _out_target(args, "select-k", [args.data, opts.get("checkpoint")])
    from .mixture import GaussianMixture  # lazy: see the top
    from .workflows import (  # lazy: see the top
        fit_and_report,
        open_data,
        parse_covariance_types,
        parse_k_values,
    )

    ks = parse_k_values(args.k)
    types = parse_covariance_types(opts.pop("covariance_type")) if opts.get("covariance_type") else None
    if types is not None and len(types) == 1:
        opts["covariance_type"] = types[0]
    GaussianMixture(n_components=max(ks), **opts)._validate_params()
    if args.validation_fraction is not None and not 0.0 <= args.validation_fraction < 1.0:
        raise InputError(f"--validation-fraction must be in [0, 1), got {args.validation_fraction}")
    X = open_data(args.data, args.array, opts.get("chunk_bytes"))
    with cluster_client(args):
        summary = fit_and_report(
            X,
            target,
            k_values=ks,
            criterion=args.criterion,
            validation_fraction=args.validation_fraction,
            covariance_types=types,
            options=opts,
            verbose=0 if args.quiet else 1,
            extra={"command": "select-k", "input": {"path": args.data, "array": args.array}},
        )
    if not args.quiet:
        for line in selection_table_lines(summary["select_k"]["table"]):
            print(line, file=sys.stderr)
        chosen = f"K = {summary['best_k']}"
        if types is not None and len(types) > 1:
            chosen = f"model {summary['best_covariance_type']}, {chosen}"
        print(f"best {chosen} ({args.criterion})", file=sys.stderr)
        if summary.get("at_range_edge"):
            side = "smallest" if summary["best_k"] == min(ks) else "largest"
            print(
                f"note: K = {summary['best_k']} is the {side} of the range {min(ks)}..{max(ks)}: "
                "the range was probably too narrow; try more values with --k",
                file=sys.stderr,
            )
        print(f"table: {target.path / 'select_k.csv'}", file=sys.stderr)
    _say_written(args, target)
    print(args.out)
    return 0


def _check_columns(gm: GaussianMixture, X: Any, args: argparse.Namespace) -> None:
    """The data's features (columns) against the model's, in the command's words (before any work)."""
    d, want = int(X.shape[1]), int(gm.n_features_in_)
    if d != want:
        raise InputError(
            f"{args.data} has {d:,} feature{'s' if d != 1 else ''} (columns), but the model in {args.model_dir} "
            f"was fitted on {want:,}"
        )


def selection_table_lines(table: Sequence[dict]) -> list[str]:
    """The K (or model and K) selection table as aligned text lines: one row per K or (model, K).

    Columns: the model (when the rows have one), K, the log-likelihood
    (total when the rows have it, else the mean per row), df, BIC, ICL, AIC,
    the validation mean log-likelihood and the standard error of its
    difference from the highest (when rows were held out),
    iterations, converged, and what is wrong with the row (degenerate, failed).
    """

    def num(v: Any, fmt: str) -> str:
        return "nan" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)

    has_model = any("covariance_type" in r for r in table)
    total = any("loglik" in r for r in table)
    validation = any(r.get("validation_loglik") is not None and np.isfinite(r["validation_loglik"]) for r in table)
    cols: list[tuple[str, int, Any]] = []
    if has_model:
        cols.append(("model", 9, lambda r: str(r["covariance_type"])))
    cols.append(("K", 4, lambda r: str(r["k"])))
    if total:
        cols.append(("loglik", 14, lambda r: num(r.get("loglik"), ".3f")))
    else:
        cols.append(("train", 12, lambda r: num(r.get("train_loglik"), ".5f")))
    cols += [
        ("df", 5, lambda r: str(r.get("df", ""))),
        ("BIC", 14, lambda r: num(r.get("bic"), ".2f")),
        ("ICL", 14, lambda r: num(r.get("icl"), ".2f")),
        ("AIC", 14, lambda r: num(r.get("aic"), ".2f")),
    ]
    if validation:
        cols.append(("validation", 12, lambda r: num(r.get("validation_loglik"), ".5f")))
        cols.append(("se", 9, lambda r: num(r.get("validation_se"), ".5f")))
    cols += [
        ("iter", 5, lambda r: str(r.get("n_iter", ""))),
        ("conv", 5, lambda r: "yes" if r.get("converged") else "no"),
    ]

    def note(r: dict) -> str:
        if r.get("failed"):
            return "failed"
        return f"degenerate: {r['degenerate']}" if r.get("degenerate") else ""

    lines = [" ".join(f"{name:>{w}}" for name, w, _ in cols) + "  note"]
    for r in table:
        lines.append((" ".join(f"{get(r):>{w}}" for _, w, get in cols) + "  " + note(r)).rstrip())
    return lines


def cmd_predict(args: argparse.Namespace) -> int:
    # --out first: a refused target is answered before the slow imports below
    target = _out_target(args, "predictions", [args.data, args.model_dir])
    from .workflows import (  # lazy: see the top
        anomaly_threshold,
        load_model_dir,
        open_data,
        store_chunk_rows,
        write_predictions,
    )

    gm, summary = load_model_dir(args.model_dir)
    threshold = None
    if args.anomaly_quantile is not None:
        threshold = anomaly_threshold(summary, args.anomaly_quantile)
    X = open_data(args.data, args.array)
    _check_columns(gm, X, args)
    with cluster_client(args):
        t0 = time.perf_counter()
        res = write_predictions(
            gm,
            X,
            target,
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
    _say_written(args, target)
    print(args.out)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .workflows import load_model_dir, open_data  # lazy: see the top

    gm, _ = load_model_dir(args.model_dir)
    X = open_data(args.data, args.array)
    _check_columns(gm, X, args)
    with cluster_client(args):
        # one formula for BIC and AIC, on the rows actually used (with
        # --missing marginalize, rows with every entry missing are not counted)
        scores = gm.information_criteria(X)
    print(json.dumps(scores, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    # --out first: a refused target is answered before the slow imports below
    target = _out_target(args, "demo")
    import zarr  # slow import, only to check the demo's labels

    from .datasets import generate_zarr, sample_chunk  # lazy: see the top
    from .report import write_summary  # lazy: see the top
    from .workflows import (  # lazy: see the top
        fit_and_report,
        load_model_dir,
        open_data,
        parse_k_values,
        write_predictions,
    )

    ks = parse_k_values(args.k)
    with _outputs.atomic_output(target) as tmp:
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
                # BIC on every row, as mclust chooses: converged fits of a K above the truth score within
                # noise (4e-5 per row) of it on held-out rows, so held-out log-likelihood alone may pick it
                criterion="bic",
                options=opts,
                verbose=0 if args.quiet else 1,
                extra={"command": "demo", "truth": truth.to_json()},
            )
            gm, _ = load_model_dir(tmp / "report")
            write_predictions(gm, X, tmp / "labels.zarr", store_rows=max(1, args.n_samples // 8))
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
        write_summary(tmp / "report" / "summary.json", summary)
        assert zarr.open_group(str(tmp / "labels.zarr"), mode="r")["labels"].shape[0] == args.n_samples
    _say(
        args,
        f"true K = {args.n_components}, chosen K = {summary['best_k']}, "
        f"label agreement with the truth {100 * agreement:.1f}% ({elapsed:.0f} s)",
    )
    _say(args, f"report: {target.path / 'report'} (summary.json, loglik.png, select_k.png, projection.png)")
    _say_written(args, target)
    print(args.out)
    return 0


def _matched_agreement(truth: Any, pred: Any) -> float:
    """Fraction of rows whose predicted component matches the true one under the best matching."""
    from scipy.optimize import linear_sum_assignment  # lazy: see the top

    kt, kp = int(truth.max()) + 1, int(pred.max()) + 1
    c = np.zeros((kt, kp))
    np.add.at(c, (truth, pred), 1)
    r, col = linear_sum_assignment(-c)
    return float(c[r, col].sum() / len(truth))


def cmd_run(args: argparse.Namespace) -> int:
    # the output first: a refused target is answered before the model options' slow imports
    target = jobs.check_job_output(jobs.job_paths(args.job), overwrite=args.overwrite)
    job = jobs.load_job(args.job)
    args._checkpoint = job["model"].get("checkpoint") or str(Path(job["output"]["path"]) / "checkpoint")
    with jobs.job_output(job, "run", target=target):
        job_id = jobs.new_job_id()
        jobs.register(job_id, job, mode="run")
        with cluster_client(args, defaults=job["cluster"]):
            _say(args, f"job {job_id}: output {job['output']['path']}")
            result = jobs.run_job(job, job_id, verbose=0 if args.quiet else 1, fresh=args.fresh)
    _say_written(args, target)
    print(json.dumps({"id": job_id, **result}, indent=2))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    job = jobs.load_job(args.job)
    if args.scheduler:
        job["cluster"]["scheduler"] = args.scheduler
    if args.scheduler_file:
        job["cluster"]["scheduler_file"] = args.scheduler_file
    job_id = jobs.submit(job, overwrite=args.overwrite, fresh=args.fresh)
    _say(args, f"submitted job {job_id}; follow it with `daskem status {job_id}`")
    print(job_id)
    return 0


def _status_columns(s: dict) -> tuple[str, str, str]:
    """ITERATION, LOGLIK and UPDATED of a job for ``daskem status`` (``-`` where there is none)."""
    p = s.get("progress")
    if not p:
        return "-", "-", s.get("updated") or s.get("submitted") or "-"
    it = f"{p.get('iteration', '?')}/{p.get('max_iter', '?')}"
    ll = "-" if p.get("loglik") is None else f"{p['loglik']:.6f}"
    return it, ll, p.get("updated", "-")


def _status_line(s: dict) -> str:
    """One sentence on a job's progress (stderr of ``daskem status JOB_ID``)."""
    p = s.get("progress")
    line = f"job {s['id']}: {s['state']}"
    if not p:
        return line + ("" if s["state"] != "running" else " (no iteration finished yet)")
    line += f"; iteration {p.get('iteration', '?')}/{p.get('max_iter', '?')} of run {p.get('run', '?')}"
    if p.get("loglik") is not None:
        line += f", log-likelihood {p['loglik']:.6f}"
    if p.get("finished"):
        line += "; EM finished"
    elif s["state"] == "running":
        eta = format_seconds(p["eta_seconds"])
        line += f"; {p['n_running']} of {p['n_runs']} run(s) running, ETA <= {eta} (max_iter)"
    return line + f"; updated {p['updated']}"


def cmd_status(args: argparse.Namespace) -> int:
    if args.job_id:
        s = jobs.job_status(args.job_id)
        _say(args, _status_line(s))
        print(json.dumps(s, indent=2))
        return 0
    rows = jobs.list_jobs()
    if not rows:
        _say(args, f"no jobs recorded in {jobs.registry_dir()}")
        return 0
    print("JOB ID\tSTATE\tITERATION\tLOGLIK\tUPDATED\tOUTPUT")
    for s in rows:
        print("\t".join([s["id"], s["state"], *_status_columns(s), s.get("output", "")]))
    return 0


def cmd_result(args: argparse.Namespace) -> int:
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
    _add_overwrite(p)
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
    p.add_argument("out", metavar="OUT.zarr", help="the Zarr store to write (true parameters go to OUT.truth.json)")
    _add_overwrite(p)
    p.add_argument("--n-samples", type=int, required=True, metavar="N", help="rows to write (required)")
    p.add_argument("--n-features", type=int, required=True, metavar="D", help="columns (required)")
    p.add_argument("--n-components", type=int, required=True, metavar="K", help="true mixture components (required)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the parameters and the rows (default: 0)")
    p.add_argument("--chunk-rows", type=int, default=100_000, metavar="N", help="rows per Zarr chunk (default: 100000)")
    p.add_argument(
        "--dtype", choices=["float64", "float32"], default="float64", help="dtype of the stored rows (default: float64)"
    )
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
    _add_output_folder(p)
    _add_model_options(p)
    _add_cluster_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser(
        "select-k",
        help="choose the number of components",
        description="Fit every K (sharing passes "
        "over the data) and keep the best by held-out log-likelihood, BIC, ICL or AIC. With several "
        "covariance models (--covariance-type VVV,EEE,VII or all), choose the model and K together, every "
        "(model, K) pair in the same passes. Writes DIR/summary.json, DIR/select_k.csv (one row per K or "
        "(model, K)), the model of the choice and the plots.",
    )
    _add_data_options(p)
    p.add_argument("--k", required=True, metavar="RANGE", help="K values: a range 2:12 (inclusive) or a list 2,4,8")
    p.add_argument(
        "--criterion",
        choices=["validation", "bic", "icl", "aic"],
        default="validation",
        help="how K is chosen: 'validation' the smallest K whose mean log-likelihood on held-out rows is within "
        "one standard error of the highest; 'bic', 'icl' or 'aic' the lowest criterion on every row "
        "(default: validation)",
    )
    p.add_argument(
        "--validation-fraction",
        type=float,
        default=None,
        metavar="F",
        help="fraction of rows held out (default: 0.1 with --criterion validation, none with bic and aic)",
    )
    _add_output_folder(p)
    _add_model_options(
        p,
        replace={
            "covariance_type": {
                "metavar": "TYPES",
                "help": f"covariance model: one of {', '.join(COVARIANCE_TYPES)}; or several, a comma list "
                "(VVV,EEE,VII) or 'all' (mclust's fourteen), to choose the model and K together (default: full)",
            }
        },
    )
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
    p.add_argument(
        "--out", required=True, metavar="LABELS.zarr", help="output store (a previous predictions store is replaced)"
    )
    _add_overwrite(p)
    p.add_argument("--proba", action="store_true", help="also write responsibilities")
    p.add_argument(
        "--anomaly-quantile",
        type=float,
        metavar="Q",
        help="flag rows below quantile Q of the training log-density, e.g. 0.01 (default: no flags)",
    )
    _add_cluster_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "score",
        help="mean log-likelihood, BIC and AIC of a model on data",
        description="Print the mean log-likelihood per row, BIC and AIC of a model on DATA as JSON.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by `daskem fit --out` (or its model/)")
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
    p.add_argument(
        "job",
        metavar="JOB.toml",
        help="the job file: TOML with [input], [model] or [select], [output] and optional [cluster] tables",
    )
    _add_fresh(p)
    _add_overwrite(p)
    _add_cluster_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "submit",
        help="hand a job file to a running cluster",
        description="Hand a TOML job file to a "
        "running Dask cluster: it keeps running after this command exits. Prints the job id.",
    )
    p.add_argument(
        "job",
        metavar="JOB.toml",
        help="the job file: TOML with [input], [model] or [select], [output] and optional [cluster] tables",
    )
    x = p.add_mutually_exclusive_group()
    x.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="address of a running Dask scheduler (default: the job file's [cluster] scheduler)",
    )
    x.add_argument(
        "--scheduler-file",
        metavar="FILE",
        help="scheduler file of a running Dask scheduler (default: the job file's [cluster] scheduler_file)",
    )
    _add_fresh(p)
    _add_overwrite(p)
    _add_common(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "status",
        help="state of a job, or of all recorded jobs",
        description="State of a job, or a list of all recorded jobs (registry: $DASKEM_HOME/jobs, default "
        "~/.daskem/jobs): one line per job with its state, the iteration out of max_iter and the log-likelihood "
        "of the run its progress follows, and the time of the last update. States: queued (submitted, not "
        "started), running, done, failed (with the error), and superseded (the job's output folder now holds a "
        "later job of the same file). With JOB_ID: a sentence on stderr, and the job's record as JSON "
        "(its progress under 'progress').",
    )
    p.add_argument("job_id", nargs="?", metavar="JOB_ID", help="a job id (default: list every recorded job)")
    _add_common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "result",
        help="the result of a finished job",
        description="Print the result of a finished job "
        "(output folder, summary). Exit 1 if it failed or has not finished.",
    )
    p.add_argument("job_id", metavar="JOB_ID", help="the id `daskem run` or `daskem submit` printed")
    p.add_argument("--wait", action="store_true", help="wait until the job has finished")
    p.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="with --wait: give up after this long (default: never)"
    )
    _add_common(p)
    p.set_defaults(func=cmd_result)
    for command in sub.choices.values():
        # messages in this command's words (cli_message)
        command.set_defaults(_flags=command_flags(command))
    return parser


#: Python keyword → command-line flag, for messages (``reg_covar`` → ``--reg-covar``): ``fit``'s and ``select-k``'s
_FLAGS = {name: "--" + name.replace("_", "-") for name, _ in _MODEL_OPTIONS} | {
    "n_components": "--k",
    "k": "--k",
    "k_values": "--k",
    "validation_fraction": "--validation-fraction",
    "anomaly_quantile": "--anomaly-quantile",
}

#: a command-line option → the Python keywords it is given as (``--k`` is ``n_components`` of GaussianMixture and
#: ``k_values`` of select_k)
_PYTHON_KEYWORDS = {"k": ("n_components", "k_values")}

#: Python names that are no option of the command, in words (``n_samples=150`` → ``the number of rows (150)``)
_WORDS = {"n_samples": "the number of rows", "n_features": "the number of columns"}


def command_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Python keyword → flag, for the messages of one command: every ``--option`` of its parser.

    ``generate --n-components`` is ``n_components``; in ``fit`` and
    ``select-k`` ``n_components`` is ``--k`` (:data:`_PYTHON_KEYWORDS`). The
    model options keep their ``fit`` flags in every command (``predict``:
    "refit with ``--missing marginalize``").
    """
    flags: dict[str, str] = dict(_FLAGS)
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest in ("help", "version"):
            continue
        flags[action.dest] = longs[0]
        for keyword in _PYTHON_KEYWORDS.get(action.dest, ()):
            flags[keyword] = longs[0]
    return flags


def _keyword_patterns(flags: dict[str, str]) -> tuple[re.Pattern, re.Pattern, re.Pattern]:
    names = "|".join(sorted(flags, key=len, reverse=True))
    with_value = re.compile(r"\b(" + names + r")=(['\"]?)([^\s,;)'\"]+)\2")
    bare = "|".join(sorted((n for n in flags if "_" in n), key=len, reverse=True)) or "(?!)"
    bare_name = re.compile(r"(?<![-\w/.])(" + bare + r")(?![\w/.])")
    subject = re.compile(r"(?<![-\w/.'\"])(" + names + r")(?= must be )")
    return with_value, bare_name, subject


def cli_message(text: str, flags: dict[str, str] | None = None) -> str:
    """A message of the Python API in the command line's words: ``reg_covar=0`` → ``--reg-covar 0``.

    Only keyword names are translated (``flags``: :func:`command_flags` of
    the command; default: ``fit``'s): ``name=value`` for every option, the
    bare name for names with an underscore (never part of a path), a name
    that is the subject of "must be" (``tol must be`` → ``--tol must be``);
    ``n_samples`` and ``n_features`` when they are no option of the command
    (:data:`_WORDS`). scikit-learn's own wording, kept in parentheses for
    Python callers (``(Expected n_samples >= n_components ...)``), and the
    ``None`` a command line cannot give, are left out.
    """
    flags = _FLAGS if flags is None else flags
    text = re.sub(r" \(Expected [^()]*\)", "", text)
    text = re.sub(r"must be None(,| or) ", "must be ", text)
    text = text.replace(", a numpy RandomState or Generator,", ",")
    for name, words in _WORDS.items():
        if name not in flags:
            text = re.sub(rf"\b{name}=(\d[\d,]*)", lambda m, w=words: f"{w} ({int(m[1].replace(',', '')):,})", text)
    with_value, bare_name, subject = _keyword_patterns(flags)
    text = with_value.sub(lambda m: f"{flags[m[1]]} {m[3]}", text)
    text = subject.sub(lambda m: flags[m[1]], text)
    text = bare_name.sub(lambda m: flags[m[1]], text)
    # a run's tag as the progress lines name it: {'k': 8, 'init': 3} -> k=8 init=3
    return re.sub(r"\{'k': (\d+), 'init': (\d+)\}", r"k=\1 init=\2", text)


def _warning_printer(flags: dict[str, str] | None) -> Any:
    """``warnings.showwarning`` for the command: ``daskem: warning: ...`` in its words, no source line."""

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        print(f"daskem: warning: {cli_message(str(message), flags)}", file=sys.stderr, flush=True)

    return show


def _names_an_option(text: str, flags: dict[str, str] | None) -> bool:
    """Whether a message names an option of the command by its Python keyword (``reg_covar``)."""
    return bool(_keyword_patterns(_FLAGS if flags is None else flags)[1].search(text))


def _interrupted_message(args: argparse.Namespace) -> str:
    ck = getattr(args, "_checkpoint", None) or getattr(args, "checkpoint", None)
    if ck and (Path(ck) / "checkpoint.json").is_file():
        return f"interrupted; the checkpoint at {ck} is intact; rerun the same command to resume"
    target = getattr(args, "_out_target", None)
    if target is not None and target.path.exists():
        return f"interrupted; nothing was written, {target.path} is as it was"
    return "interrupted; nothing was written"


def _on_interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C: silence the logs of the closing cluster, then unwind (outputs are discarded).

    Python ignores an exception raised in a ``__del__`` (it prints "Exception
    ignored in ..."): a Ctrl-C that lands while a finalizer runs (a Dask
    ``Future`` released between passes) would be lost and the command would
    go on. It is then delivered again a moment later, outside the finalizer.
    """
    f = frame
    while f is not None:
        if f.f_code.co_name == "__del__":
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
            return
        f = f.f_back
    logging.disable(logging.CRITICAL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C still stops the cleanup
    raise KeyboardInterrupt


#: run in each worker process of a local cluster: Ctrl-C (sent to the whole process group)
#: only silences the worker's logs; the command stops the workers itself, instead of every
#: worker printing a traceback and its cancelled tasks. The workers' own log lines share the
#: command's terminal: only critical ones show (unless DASKEM_DEBUG=1), since every failure
#: that matters reaches the command as an exception and is reported in one line (a loaded
#: machine otherwise shows a worker's heartbeat traceback when the cluster closes).
_WORKER_QUIET_ON_SIGINT = (
    "import logging, os, signal\n"
    "signal.signal(signal.SIGINT, lambda signum, frame: logging.disable(logging.CRITICAL))\n"
    "if os.environ.get('DASKEM_DEBUG', '') in ('', '0'):\n"
    "    logging.getLogger('distributed').setLevel(logging.CRITICAL)\n"
)


@contextlib.contextmanager
def _quiet_interrupts(args: argparse.Namespace) -> Iterator[None]:
    if not hasattr(args, "n_workers"):  # commands that start no cluster
        yield
        return
    import dask  # lazy: see the top

    preload = dask.config.get("distributed.worker.preload", None) or []
    preload = [preload] if isinstance(preload, str) else list(preload)
    previous = signal.getsignal(signal.SIGINT)
    in_main = previous is signal.default_int_handler
    if in_main:
        signal.signal(signal.SIGINT, _on_interrupt)
    try:
        with dask.config.set({"distributed.worker.preload": [*preload, _WORKER_QUIET_ON_SIGINT]}):
            yield
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def progress_to_stderr() -> Iterator[None]:
    """The command's progress lines: the ``daskem`` logger at INFO, to stderr, the message alone.

    The fit loop writes its lines (``verbose``, :func:`daskem._fitloop.say`)
    to the ``daskem.fit`` logger; the command shows them as the Python API
    prints them, and puts the logger back as it was afterwards.
    """
    log = logging.getLogger("daskem")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``daskem`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = os.environ.get("DASKEM_DEBUG", "") not in ("", "0")
    try:
        with warnings.catch_warnings(), _quiet_interrupts(args), progress_to_stderr():
            if args.quiet:
                warnings.simplefilter("ignore")
            warnings.showwarning = _warning_printer(getattr(args, "_flags", None))
            return int(args.func(args) or 0)
    except InputError as exc:
        if debug:
            traceback.print_exc()
        print(f"daskem: error: {cli_message(str(exc), getattr(args, '_flags', None))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"daskem: {_interrupted_message(args)}", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if isinstance(exc, ValueError) and _names_an_option(msg, getattr(args, "_flags", None)):
            # a numerical failure that names the option to change (singular data with --reg-covar 0): bad input
            print(f"daskem: error: {cli_message(msg, getattr(args, '_flags', None))}", file=sys.stderr)
            return 2
        print(f"daskem: error: {type(exc).__name__}: {msg} (set DASKEM_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    finally:
        logging.disable(logging.NOTSET)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
