"""Application workflows shared by the command line and batch jobs.

Opening the input, fitting and writing the report, writing predictions,
loading a fit folder: the steps that ``daskem fit``/``select-k``/``predict``
(:mod:`daskem.cli`) and ``daskem run``/``submit`` (:mod:`daskem.jobs`) have
in common. Neither of those modules imports the other for them.

Every output goes through :mod:`daskem._outputs`: checked before any work
starts, built in a temporary folder, swapped into place when complete.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from . import _covariance as cov_
from . import _engine as engine
from . import _fitloop, _outputs
from .errors import InputError
from .io import model_folder, open_array
from .mixture import GaussianMixture, load
from .report import threshold_from_quantiles, write_report
from .select import select_k, select_model

#: rows gathered on the client for plots and the training log-density quantiles
REPORT_SAMPLE_ROWS = 20_000


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


def parse_covariance_types(value: str | Sequence[str], option: str = "--covariance-type") -> list[str]:
    """``"VVV"``, ``"VVV,EEE,VII"``, ``"all"`` (mclust's fourteen) or a list of names → list of names.

    ``option`` names the setting in the error message (``--covariance-type``
    on the command line, ``[model] covariance_type`` in a job file).

    Raises
    ------
    InputError
        For an unknown name or an empty list, before any work.
    """
    if isinstance(value, str):
        names = [t.strip() for t in value.split(",") if t.strip()]
    elif isinstance(value, Sequence) and all(isinstance(t, str) for t in value):
        names = [t.strip() for t in value]
    else:
        raise InputError(f"{option} must be a covariance model name, a list of names or 'all', got {value!r}")
    if "all" in names:
        if len(names) > 1:
            raise InputError(f"{option}: 'all' stands alone (it means mclust's fourteen models), got {value!r}")
        return list(cov_.MCLUST_MODELS)
    bad = [t for t in names if t not in cov_.COVARIANCE_TYPES]
    if bad or not names:
        raise InputError(
            f"{option}: unknown covariance model(s) {', '.join(map(repr, bad)) or repr(value)}; "
            f"choose from {', '.join(cov_.COVARIANCE_TYPES)}, a comma list of them, or 'all'"
        )
    return list(dict.fromkeys(names))


def open_data(path: str, array: str | None = None, chunk_bytes: int | None = None) -> da.Array:
    """Open the input lazily; refuse a missing/unreadable store before any cluster starts."""
    return open_array(path, array=array, chunk_bytes=chunk_bytes)


def report_sample(X: da.Array, seed: int | None, kept: Sequence[np.ndarray] = ()) -> np.ndarray:
    """The rows for the plots and the training log-density quantiles.

    The last of ``kept`` (the training rows the fit drew for its
    initialisation, :func:`daskem._fitloop.keep_sample`), at most
    :data:`REPORT_SAMPLE_ROWS` of them picked at random, when there is one:
    drawing anew would read the data once more, up to a whole pass over a
    large store. Else :data:`REPORT_SAMPLE_ROWS` rows drawn from ``X``.
    """
    seed = 0 if seed is None else int(seed)
    if kept:
        rows = kept[-1]
        if rows.shape[0] > REPORT_SAMPLE_ROWS:
            pick = np.random.default_rng(seed).choice(rows.shape[0], size=REPORT_SAMPLE_ROWS, replace=False)
            rows = rows[np.sort(pick)]
        return rows
    return engine.sample_rows(X, REPORT_SAMPLE_ROWS, seed)


def load_model_dir(path: str | os.PathLike) -> tuple[GaussianMixture, dict | None]:
    """A fitted model and its summary from ``fit --out DIR`` (or a bare model folder).

    Raises
    ------
    InputNotFoundError
        When the folder does not exist (a ``FileNotFoundError``).
    """
    p = Path(path)
    folder = model_folder(p)
    gm = load(folder)
    summary_file = (p if folder != p else p.parent) / "summary.json"
    summary = None
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
        except json.JSONDecodeError:
            summary = None
    return gm, summary


def _target(out: str | os.PathLike | _outputs.OutputTarget, kind: str) -> _outputs.OutputTarget:
    if isinstance(out, _outputs.OutputTarget):
        return out
    return _outputs.check_output(out, kind, option=None)


def fit_and_report(
    X: da.Array,
    out: str | os.PathLike | _outputs.OutputTarget,
    *,
    k: int | None = None,
    k_values: Sequence[int] | None = None,
    criterion: str = "validation",
    validation_fraction: float | None = None,
    covariance_types: Sequence[str] | None = None,
    options: dict,
    verbose: int,
    extra: dict | None = None,
) -> dict:
    """Fit one K (``k``) or choose among ``k_values``; write the report into ``out`` atomically.

    With several ``covariance_types`` (and ``k_values``), the covariance model
    and K are chosen together (:func:`daskem.select_model`, every pair in
    shared passes); ``options`` then holds no ``covariance_type``. The
    selection table is also written as ``select_k.csv``.

    ``out`` is a path (checked here, before the fit) or an
    :class:`~daskem._outputs.OutputTarget` the caller checked already.
    """
    target = _target(out, "select-k" if k_values is not None else "fit")
    t0 = time.perf_counter()
    table = best_k = runs = best_type = at_edge = None
    with _fitloop.keep_sample() as kept:
        if k_values is not None and covariance_types is not None and len(covariance_types) > 1:
            opts = {name: v for name, v in options.items() if name != "covariance_type"}
            res = select_model(
                X,
                list(k_values),
                list(covariance_types),
                criterion=criterion,
                validation_fraction=validation_fraction,
                **opts,
                verbose=verbose,
            )
            gm, table, best_k = res.best_model, [dict(r) for r in res.table], int(res.best_k)
            best_type, at_edge = res.best_covariance_type, bool(res.at_range_edge)
            runs = [r for pair in res.models for r in getattr(res.models[pair], "runs_", [])]
        elif k_values is not None:
            if covariance_types:
                options = {**options, "covariance_type": covariance_types[0]}
            res = select_k(
                X,
                list(k_values),
                criterion=criterion,
                validation_fraction=validation_fraction,
                **options,
                verbose=verbose,
            )
            gm, table, best_k = res.best_model, [dict(r) for r in res.table], int(res.best_k)
            best_type, at_edge = str(gm.covariance_type), bool(res.at_range_edge)
            models = getattr(res, "models", None) or {best_k: gm}
            runs = [r for k in sorted(models) for r in getattr(models[k], "runs_", [])]
        else:
            gm = GaussianMixture(n_components=k, **options, verbose=verbose)
            gm.fit(X)
    seconds = time.perf_counter() - t0
    sample = report_sample(X, options.get("random_state"), kept)
    with _outputs.atomic_output(target) as tmp:
        summary = write_report(
            tmp,
            gm,
            sample,
            table=table,
            best_k=best_k,
            criterion=criterion if table is not None else None,
            runs=runs,
            best_covariance_type=best_type,
            at_range_edge=at_edge,
            extra={"fit_seconds": seconds, "n_samples": int(X.shape[0]), **(extra or {})},
        )
        if table is not None:
            write_table_csv(tmp / "select_k.csv", table)
    return summary


def write_table_csv(path: str | os.PathLike, table: Sequence[dict]) -> None:
    """The selection table as CSV: a header of its keys, one line per row (NaN as ``nan``)."""
    import csv  # small; only where a table is written

    keys = list(dict.fromkeys(key for row in table for key in row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in table:
            w.writerow({key: row.get(key, "") for key in keys})


def _bad_rows(gm: GaussianMixture, X: da.Array) -> tuple[da.Array, str]:
    """Lazy count of the rows the model cannot score, and what is wrong with them."""
    if gm.missing == "error":
        return (~da.isfinite(X)).any(
            axis=1
        ).sum(), "NaN or infinite values, and the model was fitted with missing='error'"
    return da.isinf(X).any(axis=1).sum(), "infinite values"


def write_predictions(
    gm: GaussianMixture,
    X: da.Array,
    out: str | os.PathLike | _outputs.OutputTarget,
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
    on the client. The group is built in a temporary folder and swapped into
    place.

    The same pass counts the rows the model cannot score (NaN or inf with a
    model fitted with ``missing='error'``; inf otherwise). When there are any,
    the temporary store is discarded and nothing is written.

    Raises
    ------
    InputError
        With the count of bad rows; nothing is written.
    OutputRefusedError
        For a target daskem will not write over (before any work).
    """
    import zarr  # slow import, only where a store is written

    target = _target(out, "predictions")
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
    n_bad, why = _bad_rows(gm, X)
    n_anom = outputs["anomaly"].sum() if anomaly_threshold is not None else None
    with _outputs.atomic_output(target) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        targets, sources = [], []
        for name, arr in outputs.items():
            shape = arr.shape
            z = root.create_array(name, shape=shape, chunks=(chunk,) + shape[1:], dtype=arr.dtype)
            targets.append(z)
            sources.append(arr)
        root.attrs.update({"daskem": {"outputs": list(outputs), **(attrs or {})}})
        stored = da.store(sources, targets, lock=False, compute=False)
        _, n_bad, n_anom = dask.compute(stored, n_bad, n_anom)
        if int(n_bad):
            raise InputError(
                f"{int(n_bad):,} of {int(X.shape[0]):,} rows hold {why}; nothing was written"
                + (" (refit with missing='marginalize' to use the observed entries)" if gm.missing == "error" else "")
            )
    return {
        "path": str(target.path),
        "arrays": list(outputs),
        "chunk_rows": int(chunk),
        "n_anomalies": None if n_anom is None else int(n_anom),
        "replaced": target.previous,
    }


def store_chunk_rows(path: str, array: str | None) -> int | None:
    """Row chunk length of a Zarr input (None for .npy or unreadable metadata)."""
    if str(path).endswith(".npy"):
        return None
    try:
        import zarr  # slow import, only for Zarr inputs

        node = zarr.open(path, mode="r")
        if isinstance(node, zarr.Group):
            names = [n for n, _ in node.arrays()]
            node = node[array or names[0]]
        return int(node.chunks[0])
    except Exception:
        return None


def anomaly_threshold(summary: dict | None, q: float) -> float:
    """The log-density threshold at training quantile ``q`` stored by ``fit``."""
    if not 0.0 < q < 1.0:
        raise InputError(f"--anomaly-quantile must be between 0 and 1, got {q}")
    quant = (summary or {}).get("training_log_density_quantiles")
    if not quant:
        raise InputError(
            "the model folder has no training log-density quantiles (summary.json from `daskem fit`); "
            "refit with `daskem fit`, or pass the folder that `fit --out` wrote"
        )
    return threshold_from_quantiles(quant, q)


__all__ = [
    "REPORT_SAMPLE_ROWS",
    "anomaly_threshold",
    "fit_and_report",
    "load_model_dir",
    "open_data",
    "parse_covariance_types",
    "parse_k_values",
    "report_sample",
    "store_chunk_rows",
    "write_predictions",
    "write_table_csv",
]
