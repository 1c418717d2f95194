"""Reports of a fit: ``summary.json`` and PNG plots (matplotlib, Agg backend).

* ``loglik.png`` — mean log-likelihood per row after each iteration, one line
  per restart (and per K), the kept run emphasised;
* ``select_k.png`` — the K-selection curve: train and validation mean
  log-likelihood, BIC and AIC against K, the chosen K marked;
* ``projection.png`` — a sample of rows projected on its first two principal
  components, coloured by predicted component, with each component's 1σ and
  2σ ellipses (its covariance projected through the same basis).

Everything here works on small, client-side things: fitted parameters, the
per-iteration history, and a sample of rows (never the whole data).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import atomic_write_text

#: colours for components (colour-blind friendly, Okabe–Ito then tab20)
_OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 150,
            "savefig.dpi": 150,
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 8,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "grid.linewidth": 0.6,
        }
    )
    return plt


def component_colors(k: int) -> list:
    """K distinct colours."""
    if k <= len(_OKABE_ITO):
        return _OKABE_ITO[:k]
    plt = _plt()
    cmap = plt.get_cmap("tab20")
    return [cmap(i % 20) for i in range(k)]


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """Replace non-finite floats by None so the JSON is standard."""
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (float, np.floating)) and not math.isfinite(float(o)):
        return None
    return o


def write_summary(path: str | Path, summary: dict) -> None:
    """Write ``summary`` as standard JSON (NaN/inf become null), atomically."""
    atomic_write_text(path, json.dumps(_clean(summary), indent=2, default=_json_default, allow_nan=False) + "\n")


def model_summary(gm: Any) -> dict:
    """The fitted model as plain data (parameters and convergence)."""
    return {
        "n_components": int(gm.n_components),
        "covariance_type": gm.covariance_type,
        "n_features": int(gm.n_features_in_),
        "converged": bool(gm.converged_),
        "n_iter": int(gm.n_iter_),
        "lower_bound": float(gm.lower_bound_),
        "weights": np.asarray(gm.weights_).tolist(),
        "means": np.asarray(gm.means_).tolist(),
        "runs": [
            {
                "k": r["tag"].get("k"),
                "init": r["tag"].get("init"),
                "n_iter": r["n_iter"],
                "converged": r["converged"],
                "lower_bound": r["lower_bound"],
                "n_reseeds": r.get("n_reseeds", 0),
            }
            for r in getattr(gm, "runs_", [])
        ],
    }


# --------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------


def plot_loglik(runs: Sequence[dict], path: str | Path, *, title: str | None = None, kept_k: int | None = None) -> Path:
    """Mean log-likelihood per iteration for every run (restart, K).

    Parameters
    ----------
    runs : list of dict
        ``GaussianMixture.runs_``: each with ``tag`` (``k``, ``init``),
        ``history`` and ``lower_bound``.
    kept_k : int, optional
        The K of the model kept (with K selection); its best run is emphasised.
    """
    plt = _plt()
    runs = [r for r in runs if r.get("history")]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    ks = sorted({r["tag"].get("k") for r in runs}, key=lambda v: (v is None, v))
    colors = dict(zip(ks, component_colors(max(len(ks), 1))))
    pool = [r for r in runs if kept_k is None or r["tag"].get("k") == kept_k] or runs
    best = max(pool, key=lambda r: r["lower_bound"], default=None)
    seen = set()
    for r in sorted(runs, key=lambda r: r is best):  # the kept run drawn last
        k = r["tag"].get("k")
        h = np.asarray(r["history"], dtype=float)
        it = np.arange(1, h.size + 1)
        is_best = r is best
        if len(ks) > 1:
            color = colors[k]
            label = f"K = {k}" if k not in seen else None
            seen.add(k)
        else:
            color = _OKABE_ITO[0] if is_best else "0.55"
            label = "kept run" if is_best else ("other restarts" if "other" not in seen else None)
            if not is_best:
                seen.add("other")
        ax.plot(
            it,
            h,
            color=color,
            lw=2.2 if is_best else 1.0,
            alpha=1.0 if is_best else 0.7,
            marker="o" if h.size <= 30 else None,
            ms=3.5 if is_best else 2,
            label=label,
            zorder=3 if is_best else 2,
        )
    if best is not None:
        h = best["history"]
        k = best["tag"].get("k")
        ax.annotate(
            f"kept run{f' (K = {k})' if len(ks) > 1 else ''}: {h[-1]:.4f}",
            xy=(len(h), h[-1]),
            xytext=(4, -16),
            textcoords="offset points",
            ha="left",
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
            zorder=6,
        )
    # the first iterations often sit far below: zoom on the informative range
    if runs:
        finals = [r["history"][-1] for r in runs]
        allv = np.concatenate([np.asarray(r["history"], float) for r in runs])
        lo, hi = float(np.min(allv)), float(np.max(finals))
        spread = max(hi - float(np.min(finals)), 1e-6)
        floor = hi - 25 * spread
        if lo < floor:
            ax.set_ylim(floor, hi + 0.05 * (hi - floor))
    ax.ticklabel_format(axis="y", useOffset=False)
    lo, hi = ax.get_ylim()
    if hi - lo < 1e-3:  # flat curves: show a sensible span instead of round-off
        mid = 0.5 * (lo + hi)
        ax.set_ylim(mid - 5e-4, mid + 5e-4)
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("mean log-likelihood per row")
    n_k = len(ks)
    n_r = len(runs)
    ax.set_title(
        title or f"Convergence of {n_r} run{'s' if n_r != 1 else ''}" + (f" over {n_k} values of K" if n_k > 1 else "")
    )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="lower right", ncols=2 if len(ks) > 6 else 1, frameon=False)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_select_k(
    table: Sequence[dict], path: str | Path, *, best_k: int | None = None, criterion: str = "validation"
) -> Path:
    """The K-selection curve: log-likelihoods (left) and BIC/AIC (right) against K."""
    plt = _plt()
    rows = sorted(table, key=lambda r: r["k"])
    k = np.array([r["k"] for r in rows])

    def col(name: str) -> np.ndarray:
        return np.array([np.nan if r.get(name) is None else float(r[name]) for r in rows])

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.6), layout="constrained")
    ax1.plot(k, col("train_loglik"), "o-", color=_OKABE_ITO[0], label="train")
    if np.isfinite(col("validation_loglik")).any():
        ax1.plot(k, col("validation_loglik"), "s-", color=_OKABE_ITO[3], label="validation (held out)")
    ax1.set_xlabel("number of components K")
    ax1.set_ylabel("mean log-likelihood per row")
    ax1.set_title("Likelihood (higher is better)")
    ax1.legend(frameon=False, loc="lower right")
    ax2.plot(k, col("bic"), "o-", color=_OKABE_ITO[2], label="BIC")
    ax2.plot(k, col("aic"), "^-", color=_OKABE_ITO[4], label="AIC")
    ax2.set_xlabel("number of components K")
    ax2.set_ylabel("information criterion")
    ax2.set_title("BIC and AIC (lower is better)")
    ax2.legend(frameon=False, loc="upper right")
    ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    for ax in (ax1, ax2):
        ax.set_xticks(k)
        if best_k is not None:
            ax.axvline(best_k, color="0.35", ls="--", lw=1.0, zorder=1)
    if best_k is not None:
        ax1.annotate(
            f"chosen K = {best_k}\n({criterion})",
            xy=(best_k, 0.5),
            xycoords=("data", "axes fraction"),
            xytext=(6, 0),
            textcoords="offset points",
            fontsize=8,
            color="0.25",
        )
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _full_covariances(gm: Any) -> np.ndarray:
    ct = gm.covariance_type
    k, d = gm.means_.shape
    c = np.asarray(gm.covariances_)
    if ct == "full":
        return c
    if ct == "tied":
        return np.broadcast_to(c, (k, d, d))
    if ct == "diag":
        return np.stack([np.diag(v) for v in c])
    return np.stack([v * np.eye(d) for v in c])


def pca_basis(sample: np.ndarray, n: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre and the first ``n`` principal axes of ``sample``.

    Returns
    -------
    mean : (D,), basis : (D, n) with orthonormal columns, explained : (n,) fraction of variance
    """
    mean = sample.mean(axis=0)
    xc = sample - mean
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    var = s**2
    basis = vt[:n].T
    if basis.shape[1] < n:  # D = 1: pad with a zero axis
        basis = np.hstack([basis, np.zeros((basis.shape[0], n - basis.shape[1]))])
        var = np.concatenate([var, np.zeros(n - var.size)])
    # a deterministic sign: the largest loading of each axis is positive
    signs = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(n)])
    signs[signs == 0] = 1
    basis = basis * signs
    explained = var[:n] / max(var.sum(), 1e-300)
    return mean, basis, explained


def plot_projection(gm: Any, sample: np.ndarray, path: str | Path, *, max_points: int = 20_000) -> Path:
    """A sample on its first two principal components, coloured by predicted component.

    Component ellipses are the 1σ and 2σ contours of each Gaussian projected
    through the same (orthonormal) basis: mean ``Vᵀ(μ − m)``, covariance ``Vᵀ Σ V``.
    """
    from matplotlib import patheffects
    from matplotlib.patches import Ellipse

    plt = _plt()
    sample = np.asarray(sample, dtype=np.float64)[:max_points]
    labels = gm.predict(sample)
    mean, basis, explained = pca_basis(sample)
    z = (sample - mean) @ basis
    mu = (np.asarray(gm.means_) - mean) @ basis
    covs = np.einsum("di,kde,ej->kij", basis, _full_covariances(gm), basis)
    k = gm.means_.shape[0]
    colors = component_colors(k)
    fig, ax = plt.subplots(figsize=(6.0, 5.2), layout="constrained")
    ax.grid(False)
    size = 3 if len(z) > 5000 else 6
    order = np.random.default_rng(0).permutation(len(z))  # no colour drawn entirely on top
    ax.scatter(
        z[order, 0],
        z[order, 1],
        c=[colors[i] for i in labels[order]],
        s=size,
        alpha=0.25,
        linewidths=0,
        rasterized=True,
    )
    for j in range(k):
        vals, vecs = np.linalg.eigh(covs[j])
        vals = np.clip(vals, 0, None)
        angle = math.degrees(math.atan2(vecs[1, -1], vecs[0, -1]))
        for nsig, ls in ((1, "-"), (2, "--")):
            ax.add_patch(
                Ellipse(
                    mu[j],
                    2 * nsig * math.sqrt(vals[-1]),
                    2 * nsig * math.sqrt(vals[0]),
                    angle=angle,
                    fill=False,
                    ec=colors[j],
                    lw=1.8 if nsig == 1 else 1.3,
                    ls=ls,
                    zorder=4,
                    path_effects=[patheffects.withStroke(linewidth=3.6 if nsig == 1 else 3.0, foreground="white")],
                )
            )
        ax.plot(*mu[j], marker="x", color="k", ms=7, mew=1.8, zorder=5)
        ax.annotate(
            f"{j}  (π={gm.weights_[j]:.2f})",
            mu[j],
            xytext=(6, 6),
            textcoords="offset points",
            fontsize=8,
            zorder=6,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.75},
        )
    ax.set_xlabel(f"PC 1 ({100 * explained[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * explained[1]:.1f}% of variance)")
    ax.set_title(
        f"{len(z):,} sampled rows, K = {k} ({gm.covariance_type} covariances)\nellipses: 1σ (solid), 2σ (dashed)"
    )
    ax.set_aspect("equal", adjustable="datalim")
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------
# a whole report
# --------------------------------------------------------------------------

#: quantiles of the training log-density stored with every fit (for anomaly flags)
QUANTILE_GRID = np.round(np.linspace(0.0, 1.0, 1001), 6)


def log_density_quantiles(gm: Any, sample: np.ndarray) -> dict:
    """Quantiles of ``log p(x)`` on a training sample, on a 0.001 grid."""
    s = gm.score_samples(np.asarray(sample))
    return {
        "n_rows": int(s.size),
        "q": QUANTILE_GRID.tolist(),
        "value": np.quantile(s, QUANTILE_GRID).tolist(),
    }


def threshold_from_quantiles(quantiles: dict, q: float) -> float:
    """The log-density threshold at quantile ``q`` (linear between grid points)."""
    return float(np.interp(q, quantiles["q"], quantiles["value"]))


def write_report(
    folder: str | Path,
    gm: Any,
    sample: np.ndarray,
    *,
    extra: dict | None = None,
    table: Sequence[dict] | None = None,
    best_k: int | None = None,
    criterion: str | None = None,
    runs: Sequence[dict] | None = None,
) -> dict:
    """Write model, ``summary.json`` and plots into ``folder`` (which exists).

    Parameters
    ----------
    folder : path
        Usually a temporary folder that the caller renames into place.
    gm : fitted GaussianMixture
    sample : ndarray of shape (n_rows, n_features)
        Training rows for the projection and the log-density quantiles.
    extra : dict, optional
        Merged into the summary (input, options, timings...).
    table, best_k, criterion : optional
        The K-selection table; adds ``select_k.png`` and these keys.
    runs : list of dict, optional
        The runs to draw in ``loglik.png`` (default: ``gm.runs_``); with K
        selection, the runs of every K.

    Returns
    -------
    dict
        The summary written.
    """
    folder = Path(folder)
    gm.save(folder / "model")
    if not runs:
        runs = getattr(gm, "runs_", None) or [{"tag": {}, "history": gm.history_, "lower_bound": gm.lower_bound_}]
    plots = {"loglik": plot_loglik(runs, folder / "loglik.png", kept_k=best_k).name}
    if table:
        plots["select_k"] = plot_select_k(
            table, folder / "select_k.png", best_k=best_k, criterion=criterion or "validation"
        ).name
    plots["projection"] = plot_projection(gm, sample, folder / "projection.png").name
    summary: dict = {
        "model": model_summary(gm),
        "model_dir": "model",
        "plots": plots,
        "training_log_density_quantiles": log_density_quantiles(gm, sample),
    }
    if table is not None:
        summary["select_k"] = {"best_k": best_k, "criterion": criterion, "table": list(table)}
        summary["best_k"] = best_k
    if extra:
        summary.update(extra)
    write_summary(folder / "summary.json", summary)
    return summary
