"""Reports of a fit: ``summary.json`` and PNG plots (matplotlib, Agg backend).

* ``loglik.png`` — convergence: for every run (restart, K) the mean
  log-likelihood per row still to gain after each iteration, on a log axis, the
  kept run emphasised (:func:`plot_loglik` says why this and not the raw value);
* ``select_k.png`` — the K-selection plot: train and held-out mean
  log-likelihood, BIC, AIC (and ICL) against K, each on its own axes, one curve
  per covariance model when the table has several, the chosen K marked;
* ``projection.png`` — a sample of rows projected on its first two principal
  components, coloured by predicted component, with each component's 1σ and
  2σ ellipses (its covariance projected through the same basis);
* ``classification.png`` — the pairs plot of the classification (as mclust's
  ``plot(…, what = "classification")``): every pair of features (D ≤ 10) or of
  the first four principal components, with the marginals on the diagonal.

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

from ._covariance import dense_covariances
from ._outputs import atomic_write_text

#: 20 colours for components: Okabe–Ito's six colour-blind-safe hues (without its black and yellow), then 14
#: more, each chosen greedily as the candidate farthest (CIELAB distance) from those already chosen, among colours of
#: lightness 30–75 and chroma 30–75 (none near black, white or grey). Smallest pairwise ΔE ≈ 26.
_PALETTE = [
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#5A4B0F", "#5A2DA5", "#78A500", "#D2004B",
    "#E1A578", "#B40087", "#A596FF", "#873C3C", "#0F5A00", "#3CD269", "#5A3C69", "#FF87FF", "#A5B469", "#FF7869",
]  # fmt: skip


def _plt() -> Any:
    import matplotlib  # matplotlib is slow to import: only when drawing

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # matplotlib is slow to import: only when drawing

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


def component_colors(k: int) -> list[str]:
    """K colours: 20 distinct ones (:data:`_PALETTE`), repeated past 20 (:func:`component_markers` then differs)."""
    return [_PALETTE[j % len(_PALETTE)] for j in range(k)]


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
        # every read of the data that fit made: initialisation, EM and scoring passes
        "n_passes": int(getattr(gm, "n_passes_", 0)),
        "accelerate": getattr(gm, "accelerate", None),
        "weights": np.asarray(gm.weights_).tolist(),
        "means": np.asarray(gm.means_).tolist(),
        "runs": [
            {
                **({"covariance_type": r["tag"]["covariance_type"]} if "covariance_type" in r["tag"] else {}),
                "k": r["tag"].get("k"),
                "init": r["tag"].get("init"),
                "n_iter": r["n_iter"],
                "converged": r["converged"],
                "dominated": r.get("dominated", False),
                "lower_bound": r["lower_bound"],
                "n_reseeds": r.get("n_reseeds", 0),
                "n_extrapolations": r.get("n_extrapolations", 0),
                "n_rejected": r.get("n_rejected", 0),
            }
            for r in getattr(gm, "runs_", [])
        ],
    }


# --------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------


def _group_key(tag: dict) -> tuple:
    """Runs that share a reference value: same K (and covariance model, when tagged)."""
    return (str(tag.get("covariance_type") or ""), tag.get("k"))


def plot_loglik(
    runs: Sequence[dict],
    path: str | Path,
    *,
    title: str | None = None,
    kept_k: int | None = None,
    kept_covariance_type: str | None = None,
) -> Path:
    """Convergence of every run (restart, K): the gap to the best final log-likelihood, on a log axis.

    The y value of run ``r`` after iteration ``t`` is ``ℓ* − ℓ_r(t)``, the mean
    log-likelihood per row still to gain, where ``ℓ*`` is the best value any
    run of the same K (and covariance model) reached. Why this and not ``ℓ``
    itself: EM gains most of the log-likelihood in its first iterations and then
    creeps by 1e-4…1e-8 per iteration, so on a linear axis either the first
    iterates or the last ones are flat lines (a single run's plot was blank).
    On a log axis every iterate of every run shows, EM's linear convergence is a
    straight line, and a restart that stopped in a worse local optimum is a
    plateau whose height is what it lost. Gaps at round-off level (the best run's
    last iterate, restarts that reached the same optimum) are drawn on the
    bottom line, labelled ``≈ 0``.

    With one K the kept run is coloured and the other restarts grey; with
    several K each K has a colour of a sequential map (K is ordered) with a
    colour bar, and the kept run is drawn thick with a dark outline.

    Parameters
    ----------
    runs : list of dict
        ``GaussianMixture.runs_``: each with ``tag`` (``k``, ``init``, optionally
        ``covariance_type``), ``history`` and ``lower_bound``.
    path : path
        The PNG to write.
    title : str, optional
        Replaces the first title line.
    kept_k, kept_covariance_type : optional
        The K (and model) kept after a selection; its best run is emphasised.
    """
    from matplotlib import patheffects  # matplotlib is slow to import: only when drawing
    from matplotlib.colors import BoundaryNorm, ListedColormap  # matplotlib is slow to import: only when drawing

    plt = _plt()
    runs = [r for r in runs if r.get("history") is not None and len(r["history"]) > 0]
    fig, ax = plt.subplots(figsize=(7.2, 4.4), layout="constrained")
    hist = [np.asarray(r["history"], dtype=float) for r in runs]
    keys = [_group_key(r.get("tag") or {}) for r in runs]
    ref: dict[tuple, float] = {}
    for key, h in zip(keys, hist):
        if np.isfinite(h).any():
            ref[key] = max(ref.get(key, -np.inf), float(np.nanmax(h[np.isfinite(h)])))

    def kept_pool(i: int) -> bool:
        cov, k = keys[i]
        return (kept_k is None or k == kept_k) and (not kept_covariance_type or not cov or cov == kept_covariance_type)

    pool = [i for i in range(len(runs)) if kept_pool(i)] or list(range(len(runs)))
    best = max(pool, key=lambda i: _finite_or(runs[i].get("lower_bound"), hist[i][-1]), default=None)

    gaps = [ref.get(key, np.nan) - h for key, h in zip(keys, hist)]
    scale = max([1.0] + [abs(v) for v in ref.values() if math.isfinite(v)])
    tiny = 1e-12 * scale  # below this a gap is round-off
    pos = np.concatenate([g[np.isfinite(g) & (g > tiny)] for g in gaps]) if gaps else np.empty(0)
    floor = 10.0 ** math.floor(math.log10(pos.min() / 3.0)) if pos.size else 1e-8
    floor = max(floor, 10.0 ** math.floor(math.log10(tiny)))

    ks = sorted({k for _, k in keys if k is not None})
    several_k = len(ks) > 1
    if several_k:  # K is ordered: a sequential map, one band per K, stopping before viridis' pale yellow
        base = plt.get_cmap("viridis")
        cmap = ListedColormap([base(0.92 * i / (len(ks) - 1)) for i in range(len(ks))])
        norm = BoundaryNorm(np.arange(len(ks) + 1) - 0.5, len(ks))
        kpos = {k: i for i, k in enumerate(ks)}

        def color_of(i: int) -> Any:
            return cmap.colors[kpos[keys[i][1]]]

    n_iter_max = max((h.size for h in hist), default=1)
    order = [i for i in range(len(runs)) if i != best] + ([best] if best is not None else [])
    for i in order:
        g = np.clip(gaps[i], floor, None)
        it = np.arange(1, g.size + 1)
        kept = i == best
        if several_k:
            color = color_of(i)
        else:
            color = _PALETTE[0] if kept else "0.62"
        style = {
            "color": color,
            "lw": 2.4 if kept else 1.0,
            "alpha": 1.0 if (kept or several_k) else 0.75,
            "zorder": 4 if kept else 2,
            "marker": "o" if (kept and g.size <= 60) else None,
            "ms": 3.5,
        }
        if kept and several_k:
            style["path_effects"] = [patheffects.withStroke(linewidth=4.2, foreground="0.1")]
        ax.plot(it, g, **style)
    ax.set_yscale("log")
    lo = floor / 1.6
    top = max([floor * 10] + [float(np.max(g[np.isfinite(g)])) for g in gaps if np.isfinite(g).any()])
    ax.set_ylim(lo, top * 2.0)
    ax.set_xlim(0.5, n_iter_max + 0.5)
    ax.axhline(floor, color="0.5", lw=0.7, ls=":", zorder=1)
    # the bottom line is "reached the best value": say so on its tick
    ticks = [t for t in ax.get_yticks() if floor * 3 <= t <= top * 2.0]
    ax.set_yticks([floor, *ticks])
    ax.set_yticklabels(["≈ 0"] + [f"$10^{{{round(math.log10(t))}}}$" for t in ticks])
    ax.minorticks_off()
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("log-likelihood per row still to gain\n(best final value − current value)")

    # legend and titles
    from matplotlib.lines import Line2D  # matplotlib is slow to import: only when drawing

    n_r = len(runs)
    if best is None:
        ax.text(0.5, 0.5, "no iterations recorded", transform=ax.transAxes, ha="center", va="center")
        head = title or "Convergence"
        sub = ""
    else:
        h = hist[best]
        r = runs[best]
        cov, k = keys[best]
        what = ", ".join(x for x in (f"K = {k}" if k is not None else "", cov) if x)
        conv = r.get("converged")
        state = "" if conv is None else (", converged" if conv else ", not converged")
        head = title or (
            f"Convergence of {n_r} run{'s' if n_r != 1 else ''}" + (f" over {len(ks)} values of K" if several_k else "")
        )
        sub = (
            f"kept run{f' ({what})' if what else ''}: mean log-likelihood {h[-1]:.6g} per row "
            f"after {h.size} iteration{'s' if h.size != 1 else ''}{state}"
        )
        kept_color = color_of(best) if several_k else _PALETTE[0]
        outline = [patheffects.withStroke(linewidth=4.2, foreground="0.1")] if several_k else None
        handles = [
            Line2D([], [], color=kept_color, lw=2.4, marker="o" if h.size <= 60 else None, ms=3.5, path_effects=outline)
        ]
        labels = ["kept run"]
        if n_r > 1:
            handles.append(Line2D([], [], color="0.45" if several_k else "0.62", lw=1.0))
            labels.append("other runs" + (" (colour: K)" if several_k else " (restarts)"))
        ax.legend(handles, labels, loc="upper right", frameon=True, framealpha=0.85, edgecolor="none")
    ax.set_title(f"{head}\n{sub}" if sub else head, fontsize=10)
    if several_k:
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=norm)
        cb = fig.colorbar(sm, ax=ax, pad=0.01, aspect=30)
        step = max(1, math.ceil(len(ks) / 12))
        cb.set_ticks(list(range(0, len(ks), step)))
        cb.set_ticklabels([str(ks[i]) for i in range(0, len(ks), step)])
        cb.set_label("K (number of components)")
        cb.outline.set_visible(False)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _finite_or(v: Any, default: float) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float(default)
    return f if math.isfinite(f) else float(default)


def _plain_formatter() -> Any:
    """Tick labels as plain numbers with thousands separators and as many decimals as the tick step needs.

    (matplotlib's default puts a shared ``1e6`` offset on a BIC axis, which hides the differences.)
    """
    from matplotlib.ticker import Formatter  # matplotlib is slow to import: only when drawing

    class Plain(Formatter):
        ticks: Sequence[float] = ()

        def set_locs(self, locs: Sequence[float]) -> None:
            self.ticks = list(locs)

        def __call__(self, x: float, pos: int | None = None) -> str:
            locs = np.sort(np.asarray(self.ticks, dtype=float))
            step = float(np.min(np.diff(locs))) if locs.size > 1 else (abs(x) or 1.0)
            dec = int(max(0, -math.floor(math.log10(step) + 1e-9))) if step > 0 else 0
            return f"{x:,.{dec}f}".replace("-", "\u2212")

    return Plain()


#: the information criteria a table may carry, as (key, panel title)
_CRITERIA = (
    ("bic", "BIC = −2 log L + p log n"),
    ("icl", "ICL"),
    ("aic", "AIC = −2 log L + 2p"),
)


def plot_select_k(
    table: Sequence[dict],
    path: str | Path,
    *,
    best_k: int | None = None,
    criterion: str = "validation",
    best_covariance_type: str | None = None,
) -> Path:
    """The K-selection plot: log-likelihoods and each information criterion against K, one panel each.

    BIC, AIC (and ICL when the table has it) get a panel of their own with
    plain tick labels, so that their differences between K show (on a shared
    axis they sit ~p·log n apart under a common 1e6 offset). The likelihood
    panel shows the training and, when rows were held out, the held-out mean
    log-likelihood per row. When the rows carry ``covariance_type`` (a choice
    of model and K together), every panel has one curve per covariance model,
    as mclust's ``plot(…, what = "BIC")`` does (mclust plots −BIC: higher is
    better there, lower here). The chosen K is a dashed line on every panel and
    a ring on the curve of the criterion that chose it; rows marked
    ``degenerate`` get a grey cross; failed rows (no value) leave a gap.

    Parameters
    ----------
    table : list of dict
        Rows with ``k``, ``train_loglik``, ``validation_loglik``, ``bic``,
        ``aic`` (optionally ``icl``, ``covariance_type``, ``degenerate``).
    path : path
        The PNG to write.
    best_k, criterion : optional
        The chosen K and the criterion that chose it.
    best_covariance_type : str, optional
        The chosen model, when rows carry ``covariance_type`` (default: the
        best row at ``best_k`` by ``criterion``).
    """
    from matplotlib.lines import Line2D  # matplotlib is slow to import: only when drawing

    plt = _plt()
    rows = list(table)
    has_models = any(r.get("covariance_type") is not None for r in rows)
    models = list(dict.fromkeys(str(r.get("covariance_type")) for r in rows)) if has_models else [None]

    def col(sub: list[dict], name: str) -> np.ndarray:
        return np.array([_finite_or(r.get(name), np.nan) for r in sub])

    by_model = {
        m: sorted((r for r in rows if not has_models or str(r.get("covariance_type")) == m), key=lambda r: r["k"])
        for m in models
    }
    has_val = np.isfinite(col(rows, "validation_loglik")).any()
    crits = [(key, name) for key, name in _CRITERIA if np.isfinite(col(rows, key)).any()]
    icl_lower = True
    if any(key == "icl" for key, _ in crits):  # ICL's sign: the same convention as BIC's, or mclust's (negated)?
        bic, icl = col(rows, "bic"), col(rows, "icl")
        icl_lower = not (np.nanmean(np.abs(icl + bic)) < np.nanmean(np.abs(icl - bic)))
    lower = {"bic": True, "aic": True, "icl": icl_lower}

    n_panels = 1 + len(crits)
    ncols = n_panels if n_panels <= 3 else 2
    nrows = math.ceil(n_panels / ncols)
    legend_w = 1.6 if has_models else 0.0
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.5 * ncols + legend_w, 3.3 * nrows + 0.3), layout="constrained", squeeze=False
    )
    axes = list(axes.ravel())
    for ax in axes[n_panels:]:
        ax.remove()
    ax_ll, ax_crit = axes[0], dict(zip((key for key, _ in crits), axes[1:n_panels]))

    colors = component_colors(len(models))
    markers = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*", "d", "H"]
    style = {
        m: {"color": colors[i], "marker": markers[i % len(markers)] if has_models else "o", "ms": 4.5}
        for i, m in enumerate(models)
    }

    # chosen model at the chosen K
    chosen_model = None
    if has_models and best_k is not None:
        at_k = [r for r in rows if r["k"] == best_k]
        names = [str(r.get("covariance_type")) for r in at_k]
        if best_covariance_type is not None and str(best_covariance_type) in names:
            chosen_model = str(best_covariance_type)
        elif at_k:
            if criterion in lower:
                sign = 1.0 if lower[criterion] else -1.0
                key = lambda r: sign * _finite_or(r.get(criterion), np.inf)  # noqa: E731
            else:
                key = lambda r: -_finite_or(r.get("validation_loglik"), -np.inf)  # noqa: E731
            chosen_model = str(min(at_k, key=key).get("covariance_type"))

    # likelihood panel
    for m in models:
        sub = by_model[m]
        k = np.array([r["k"] for r in sub])
        if has_models:
            st = style[m]
            if has_val:
                ax_ll.plot(k, col(sub, "validation_loglik"), "-", lw=1.4, **st)
                ax_ll.plot(k, col(sub, "train_loglik"), ":", lw=1.0, color=st["color"], alpha=0.8)
            else:
                ax_ll.plot(k, col(sub, "train_loglik"), "-", lw=1.4, **st)
        else:
            ax_ll.plot(k, col(sub, "train_loglik"), "o-", color=_PALETTE[0], lw=1.5, ms=4.5, label="train rows")
            if has_val:
                ax_ll.plot(
                    k, col(sub, "validation_loglik"), "s--", color=_PALETTE[3], lw=1.5, ms=4.5, label="held-out rows"
                )
                se = col(sub, "validation_se")
                if np.isfinite(se).any():
                    # validation's one-standard-error rule: the smallest K whose bar reaches the highest
                    ax_ll.errorbar(
                        k,
                        col(sub, "validation_loglik"),
                        yerr=np.where(np.isfinite(se), se, 0.0),
                        fmt="none",
                        ecolor=_PALETTE[3],
                        elinewidth=1.0,
                        capsize=3,
                        label="± 1 s.e. (paired) from the highest",
                    )
    ax_ll.set_ylabel("mean log-likelihood per row")
    ax_ll.set_title(
        "Likelihood (higher is better)" + ("\nheld out: solid, train: dotted" if has_models and has_val else "")
    )
    if not has_models:
        ax_ll.legend(frameon=False, loc="best")

    # criterion panels
    for key, name in crits:
        ax = ax_crit[key]
        for m in models:
            sub = by_model[m]
            ax.plot(
                [r["k"] for r in sub],
                col(sub, key),
                "-",
                lw=1.4,
                **(
                    style[m]
                    if has_models
                    else {
                        "color": {"bic": _PALETTE[2], "icl": _PALETTE[4], "aic": _PALETTE[7]}[key],
                        "marker": "o",
                        "ms": 4.5,
                    }
                ),
            )
            deg = [r for r in sub if r.get("degenerate")]
            if deg:
                ax.plot([r["k"] for r in deg], col(deg, key), "x", color="0.3", ms=7, mew=1.5, zorder=5)
        ax.set_title(f"{name}\n({'lower' if lower[key] else 'higher'} is better)")
        ax.set_ylabel(key.upper())
        ax.yaxis.set_major_formatter(_plain_formatter())

    # the chosen K
    for ax in axes[:n_panels]:
        ks = sorted({r["k"] for r in rows})
        ax.set_xlabel("number of components K")
        if len(ks) <= 10:
            ax.set_xticks(ks)
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
        if best_k is not None:
            ax.axvline(best_k, color="0.35", ls="--", lw=1.0, zorder=1)
    if best_k is not None:
        target = ax_crit.get(criterion, ax_ll)
        field = criterion if criterion in ax_crit else "validation_loglik" if has_val else "train_loglik"
        pick = [
            r
            for r in rows
            if r["k"] == best_k and (chosen_model is None or str(r.get("covariance_type")) == chosen_model)
        ]
        if pick:
            y = _finite_or(pick[0].get(field), np.nan)
            target.plot([best_k], [y], "o", ms=13, mfc="none", mec="0.1", mew=1.6, zorder=6)
        what = {
            "validation": "held-out log-likelihood, the fewest parameters within 1 s.e. of the highest",
            "bic": "BIC",
            "aic": "AIC",
            "icl": "ICL",
        }.get(criterion, criterion)
        fig.suptitle(
            f"chosen: K = {best_k}" + (f", {chosen_model}" if chosen_model else "") + f" (by {what}; ring)",
            fontsize=10,
        )
    if has_models:
        handles = [Line2D([], [], lw=1.4, **style[m]) for m in models]
        labels = list(models)
        if any(r.get("degenerate") for r in rows):
            handles.append(Line2D([], [], ls="none", marker="x", color="0.3", ms=7, mew=1.5))
            labels.append("degenerate")
        fig.legend(
            handles,
            labels,
            loc="outside right upper",
            frameon=False,
            title="covariance model",
            ncols=1 if len(models) <= 16 else 2,
        )
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _full_covariances(gm: Any) -> np.ndarray:
    """Every component's covariance as a (K, D, D) array, whatever the covariance type stores."""
    k, d = np.asarray(gm.means_).shape
    return np.asarray(dense_covariances(np.asarray(gm.covariances_, dtype=np.float64), gm.covariance_type, k, d))


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


def _draw_ellipses(
    ax: Any, mu: np.ndarray, covs: np.ndarray, colors: Sequence[Any], *, lw: float = 1.6, halo: bool = True
) -> None:
    """Every component's 1σ (solid) and 2σ (dashed) contour in 2-D, as two line collections.

    Contour ``c`` of ``N(μ, Σ)`` is ``μ + c·L·(cos t, sin t)`` with ``L Lᵀ = Σ``
    (``L = V Λ^½`` from the eigendecomposition): points in data coordinates, so
    the contours stay exact on axes of unequal scale. One artist per contour
    level keeps the drawing fast for hundreds of components.
    """
    from matplotlib import patheffects  # matplotlib is slow to import: only when drawing
    from matplotlib.collections import LineCollection  # matplotlib is slow to import: only when drawing

    t = np.linspace(0.0, 2.0 * np.pi, 73)
    circle = np.stack([np.cos(t), np.sin(t)])  # (2, T)
    vals, vecs = np.linalg.eigh(np.asarray(covs, dtype=np.float64))
    factor = vecs * np.sqrt(np.clip(vals, 0.0, None))[:, None, :]  # (K, 2, 2): L = V Λ^½
    unit = np.einsum("kij,jt->kti", factor, circle)  # (K, T, 2)
    for nsig, ls, width in ((1, "-", lw), (2, (0, (4, 2.5)), 0.75 * lw)):
        lines = LineCollection(
            list(np.asarray(mu)[:, None, :] + nsig * unit),
            colors=list(colors),
            linewidths=width,
            linestyles=ls,
            zorder=4,
        )
        if halo:
            lines.set_path_effects([patheffects.withStroke(linewidth=width + 1.8, foreground="white")])
        ax.add_collection(lines, autolim=False)


def _mean_markers(
    ax: Any, mu: np.ndarray, colors: Sequence[Any], markers: Sequence[str], *, size: float = 60.0, outline: bool = True
) -> None:
    """The components' means: their colour, a white ring and a dark outline (visible on any colour and on the points)."""
    from matplotlib import patheffects  # matplotlib is slow to import: only when drawing

    colors = np.array(list(colors), dtype=object)
    for shape in sorted(set(markers)):
        sel = np.array([mk == shape for mk in markers])
        art = ax.scatter(
            mu[sel, 0],
            mu[sel, 1],
            s=size,
            marker=shape,
            c=list(colors[sel]),
            edgecolors="white" if outline else "0.1",
            linewidths=1.0 if outline else 0.6,
            zorder=6,
        )
        if outline:
            art.set_path_effects([patheffects.Stroke(linewidth=1.8, foreground="0.1"), patheffects.Normal()])


def _view_limits(z: np.ndarray, extra: np.ndarray | None = None, q: float = 0.002, pad: float = 0.06) -> tuple:
    """Axis limits from the bulk of the points (quantiles ``q``, ``1 − q``), the ``extra`` points, and a margin."""
    lo, hi = np.quantile(z, q), np.quantile(z, 1 - q)
    if extra is not None and extra.size:
        lo, hi = min(lo, float(np.min(extra))), max(hi, float(np.max(extra)))
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    return lo - pad * span, hi + pad * span


def _place_labels(
    ax: Any, anchors: np.ndarray, texts: Sequence[str], colors: Sequence[Any], *, order: Sequence[int] | None = None
) -> list:
    """Put each text next to its anchor (data coordinates) where it overlaps no other label and no anchor.

    Candidate spots at three distances in eight directions around the anchor
    are tried in turn (display pixels, after the figure's layout is final); a
    label with no free spot inside the axes is left out (the legend names every
    component). Returns the Text artists placed.
    """
    from matplotlib.transforms import Bbox  # matplotlib is slow to import: only when drawing

    fig = ax.figure
    fig.draw_without_rendering()  # fix the layout: the positions below are final
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    px = ax.transData.transform(np.asarray(anchors, dtype=np.float64))
    scale = fig.dpi / 72.0
    mark = 6.0 * scale  # half the size of an anchor's marker
    blocked = [Bbox.from_extents(x - mark, y - mark, x + mark, y + mark) for x, y in px]
    placed = []
    directions = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
    for j in order if order is not None else range(len(texts)):
        x0, y0 = px[j]
        if not (np.isfinite(x0) and np.isfinite(y0)):
            continue
        t = ax.text(
            0,
            0,
            texts[j],
            fontsize=8,
            fontweight="bold",
            color=colors[j],
            ha="center",
            va="center",
            zorder=7,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
        )
        t.set_in_layout(False)
        t.set_transform(None)  # display pixels
        t.set_position((x0, y0))
        ext = t.get_window_extent(renderer)
        w, h = ext.width + 2 * scale, ext.height + 2 * scale
        spot = None
        for ring in (0.0, 1.0, 2.0):
            for dx, dy in directions:
                cx = x0 + dx * (mark + w / 2 + ring * 0.6 * w)
                cy = y0 + dy * (mark + h / 2 + ring * 0.9 * h)
                box = Bbox.from_extents(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
                inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                if inside and not any(box.overlaps(b) for b in blocked):
                    spot = (cx, cy, box)
                    break
            if spot:
                break
        if spot is None:
            t.remove()
            continue
        # keep the label attached to the data (pixels → offset from the anchor)
        t.remove()
        t = ax.annotate(
            texts[j],
            xy=tuple(anchors[j]),
            xytext=(spot[0] - x0, spot[1] - y0),
            textcoords="offset pixels",
            fontsize=8,
            fontweight="bold",
            color=colors[j],
            ha="center",
            va="center",
            zorder=7,
            annotation_clip=False,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
        )
        t.set_in_layout(False)
        blocked.append(spot[2])
        placed.append(t)
    return placed


def component_markers(k: int) -> list[str]:
    """A marker per component: circles for the first 20 (one colour each), then another shape per 20."""
    shapes = ["o", "s", "^", "D", "v", "P", "X", "<", ">"]
    return [shapes[(j // len(_PALETTE)) % len(shapes)] for j in range(k)]


def _scatter_by_component(ax: Any, z: np.ndarray, labels: np.ndarray, k: int, size: float, alpha: float) -> None:
    """Rows coloured by component, in a random order (no colour drawn entirely on top of another)."""
    colors = np.array(component_colors(k), dtype=object)
    markers = component_markers(k)
    order = np.random.default_rng(0).permutation(len(z))
    groups = sorted(set(markers))
    for shape in groups:  # one scatter per marker shape (all of them when K <= 20)
        sel = order[[markers[j] == shape for j in labels[order]]] if len(groups) > 1 else order
        ax.scatter(
            z[sel, 0],
            z[sel, 1],
            c=list(colors[labels[sel]]),
            s=size,
            marker=shape,
            alpha=alpha,
            linewidths=0,
            rasterized=True,
        )


#: past this many components the plots have no legend (it would not fit)
_LEGEND_MAX = 60


def plot_projection(
    gm: Any, sample: np.ndarray, path: str | Path, *, max_points: int = 20_000, max_labels: int = 20
) -> Path:
    """A sample on its first two principal components, coloured by predicted component.

    Component ellipses are the 1σ and 2σ contours of each Gaussian projected
    through the same (orthonormal) basis: mean ``Vᵀ(μ − m)``, covariance
    ``Vᵀ Σ V``. Colours: 20 distinct ones (:func:`component_colors`), repeated
    with another marker shape past 20 components. Every component is named in
    the legend (with its weight); the first ``max_labels`` (by weight) also get
    their number next to their mean where it overlaps nothing. The axes take
    the data's own ranges (no equal aspect: the contours are exact either way).
    """
    from matplotlib.lines import Line2D  # matplotlib is slow to import: only when drawing

    plt = _plt()
    sample = np.asarray(sample, dtype=np.float64)[:max_points]
    labels = np.asarray(gm.predict(sample))
    mean, basis, explained = pca_basis(sample)
    z = (sample - mean) @ basis
    mu = (np.asarray(gm.means_) - mean) @ basis
    covs = np.einsum("di,kde,ej->kij", basis, _full_covariances(gm), basis)
    weights = np.asarray(gm.weights_, dtype=np.float64)
    k = mu.shape[0]
    colors = component_colors(k)
    markers = component_markers(k)
    ncol = 1 if k <= 24 else 2 if k <= 48 else 3 if k <= _LEGEND_MAX else 0
    fig, ax = plt.subplots(figsize=(6.6 + 1.1 * ncol, 5.0), layout="constrained")
    ax.grid(False)
    n = len(z)
    _scatter_by_component(ax, z, labels, k, size=2.5 if n > 5000 else 6, alpha=0.3 if n > 5000 else 0.45)
    _draw_ellipses(ax, mu, covs, colors)
    _mean_markers(ax, mu, colors, markers, size=60.0 if k <= 20 else 36.0 if k <= 60 else 16.0)
    ax.set_xlim(*_view_limits(z[:, 0], mu[:, 0]))
    ax.set_ylim(*_view_limits(z[:, 1], mu[:, 1]))
    ax.set_xlabel(f"PC 1 ({100 * explained[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * explained[1]:.1f}% of variance)")
    ax.set_title(
        f"{n:,} sampled rows, K = {k} ({gm.covariance_type} covariances)\n"
        "coloured by most likely component; ellipses: 1σ (solid), 2σ (dashed)"
    )
    if k <= _LEGEND_MAX:  # past that a legend would not fit: the heaviest components are labelled in the plot
        handles = [
            Line2D([], [], ls="none", marker=markers[j], ms=6, mfc=colors[j], mec="white", mew=0.6) for j in range(k)
        ]
        fig.legend(
            handles,
            [f"{j}  (π = {weights[j]:.2f})" for j in range(k)],
            loc="outside right upper",
            ncols=ncol,
            frameon=False,
            title="component (weight)",
            fontsize=7 if k > 12 else 8,
            handletextpad=0.3,
            columnspacing=0.8,
            labelspacing=0.35 if k > 12 else 0.5,
        )
    by_weight = list(np.argsort(-weights, kind="stable")[:max_labels])
    _place_labels(ax, mu, [str(j) for j in range(k)], colors, order=by_weight)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _classification_coords(gm: Any, sample: np.ndarray, max_features: int, n_pcs: int) -> tuple:
    """The coordinates of the classification plot: the features (D ≤ max_features) or the top principal components.

    Returns ``(z, mu, covs, names, how)``: the rows, component means and
    covariances in those coordinates, the axis names, and a phrase for the title.
    """
    means = np.asarray(gm.means_, dtype=np.float64)
    full = _full_covariances(gm)
    d = sample.shape[1]
    if d <= max_features:
        names = [f"x{i}" for i in range(d)]
        return sample, means, np.asarray(full), names, "features"
    m = min(n_pcs, d)
    centre, basis, explained = pca_basis(sample, m)
    z = (sample - centre) @ basis
    mu = (means - centre) @ basis
    covs = np.einsum("di,kde,ej->kij", basis, full, basis)
    names = [f"PC {i + 1} ({100 * explained[i]:.0f}%)" for i in range(m)]
    return (
        z,
        mu,
        covs,
        names,
        f"first {m} principal components of {d} features ({100 * explained.sum():.0f}% of variance)",
    )


def plot_classification(
    gm: Any,
    sample: np.ndarray,
    path: str | Path,
    *,
    max_points: int = 5000,
    max_features: int = 10,
    n_pcs: int = 4,
) -> Path:
    """Pairs plot of the classification, as mclust's ``plot(…, what = "classification")``.

    One panel per pair of coordinates (lower triangle): the sampled rows
    coloured by their most likely component, with each component's 1σ and 2σ
    ellipses (its mean and covariance restricted to the pair). The diagonal
    shows each coordinate's marginal: a histogram of the rows, the mixture's
    marginal density (black) and each component's weighted density (its colour).
    The coordinates are the D features when D ≤ ``max_features``, otherwise the
    first ``n_pcs`` principal components of the sample (the covariances
    projected as ``Vᵀ Σ V``). So the figure has m(m + 1)/2 panels, m the number
    of coordinates.
    """
    from matplotlib.lines import Line2D  # matplotlib is slow to import: only when drawing

    plt = _plt()
    sample = np.asarray(sample, dtype=np.float64)[:max_points]
    if sample.ndim == 1:
        sample = sample[:, None]
    labels = np.asarray(gm.predict(sample))
    z, mu, covs, names, how = _classification_coords(gm, sample, max_features, n_pcs)
    weights = np.asarray(gm.weights_, dtype=np.float64)
    k, m = mu.shape
    colors = component_colors(k)
    markers = component_markers(k)
    cell = 3.0 if m == 1 else 2.6 if m == 2 else 2.1 if m <= 3 else 1.75 if m <= 6 else 1.4
    fig, axes = plt.subplots(
        m, m, figsize=(cell * m + (3.2 if m == 1 else 0.4), cell * m + 0.8), layout="constrained", squeeze=False
    )
    limits = [_view_limits(z[:, i], mu[:, i]) for i in range(m)]
    n = len(z)
    size = 2.0 if n > 2000 else 5.0
    for i in range(m):
        for j in range(m):
            ax = axes[i, j]
            if j > i:
                ax.remove()
                continue
            ax.grid(False)
            for side in ("top", "right", "bottom", "left"):
                ax.spines[side].set_visible(True)
                ax.spines[side].set_color("0.25")
                ax.spines[side].set_linewidth(0.8)
            ax.tick_params(labelsize=7, length=2.5, pad=1.5)
            ax.set_xlim(*limits[j])
            if i == j:
                _marginal(ax, z[:, i], mu[:, i], covs[:, i, i], weights, colors, limits[i])
            else:
                _scatter_by_component(ax, z[:, [j, i]], labels, k, size=size, alpha=0.4)
                pair = np.ix_(range(k), [j, i], [j, i])
                _draw_ellipses(ax, mu[:, [j, i]], covs[pair], colors, lw=1.2, halo=k <= 20)
                _mean_markers(ax, mu[:, [j, i]], colors, markers, size=16.0, outline=False)
                ax.set_ylim(*limits[i])
            if i == m - 1:
                ax.set_xlabel(names[j], fontsize=8)
            else:
                ax.tick_params(labelbottom=False)
            if j == 0 and i > 0:
                ax.set_ylabel(names[i], fontsize=8)
            elif j == 0:
                ax.set_ylabel("density", fontsize=8)
            elif i != j:
                ax.tick_params(labelleft=False)
            if i == j:
                ax.set_title(names[i], fontsize=8, pad=2)
    keys = "ellipses: 1σ (solid), 2σ (dashed); diagonal: " if m > 1 else ""
    fig.suptitle(
        f"Classification of {n:,} sampled rows, K = {k} ({gm.covariance_type} covariances)\n"
        f"on the {how}\n{keys}mixture (black), weighted components (colours)",
        fontsize=9 if m > 2 else 8,
    )
    if k <= _LEGEND_MAX:  # past that a legend would not fit
        handles = [
            Line2D([], [], ls="none", marker=markers[c], ms=6, mfc=colors[c], mec="white", mew=0.6) for c in range(k)
        ]
        fig.legend(
            handles,
            [f"{c}  (π = {weights[c]:.2f})" for c in range(k)],
            loc="outside right center" if m == 1 else "upper right",
            bbox_to_anchor=None if m == 1 else (0.98, 0.86 if m == 2 else 0.9),
            ncols=1 if k <= 12 else 2 if k <= 30 else 3,
            frameon=False,
            title="component (weight)",
            fontsize=7,
        )
    path = Path(path)
    fig.savefig(path, dpi=150 if m <= 6 else 110)
    plt.close(fig)
    return path


def _marginal(
    ax: Any, x: np.ndarray, mu: np.ndarray, var: np.ndarray, weights: np.ndarray, colors: Sequence[Any], lim: tuple
) -> None:
    """One coordinate's marginal: histogram of the rows, the mixture's density and each weighted component."""
    grid = np.linspace(lim[0], lim[1], 300)
    sd = np.sqrt(np.clip(var, 1e-300, None))
    dens = (
        weights[:, None]
        * np.exp(-0.5 * ((grid[None, :] - mu[:, None]) / sd[:, None]) ** 2)
        / (sd[:, None] * math.sqrt(2 * math.pi))
    )
    ax.hist(x, bins=40, range=lim, density=True, color="0.82", edgecolor="none", zorder=1)
    for c in range(len(mu)):
        ax.plot(grid, dens[c], color=colors[c], lw=1.0, zorder=2)
    ax.plot(grid, dens.sum(axis=0), color="0.1", lw=1.3, zorder=3)
    ax.set_ylim(0, None)


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
    best_covariance_type: str | None = None,
    at_range_edge: bool | None = None,
) -> dict:
    """Write model, ``summary.json`` and plots into ``folder`` (which exists).

    Parameters
    ----------
    folder : path
        Usually a temporary folder that the caller renames into place.
    gm : fitted GaussianMixture
    sample : ndarray of shape (n_rows, n_features)
        Training rows for the projection, the classification pairs plot and
        the log-density quantiles.
    extra : dict, optional
        Merged into the summary (input, options, timings...).
    table, best_k, criterion : optional
        The K-selection table; adds ``select_k.png`` and these keys.
    runs : list of dict, optional
        The runs to draw in ``loglik.png`` (default: ``gm.runs_``); with K
        selection, the runs of every K.
    best_covariance_type, at_range_edge : optional
        With a selection table: the chosen covariance model (the one fitted
        when only K was chosen) and whether the chosen K is at the edge of
        the range; recorded in the summary (``best_covariance_type``,
        ``at_range_edge``, top level and under ``select_k``).

    Returns
    -------
    dict
        The summary written.
    """
    folder = Path(folder)
    gm.save(folder / "model")
    if not runs:
        runs = getattr(gm, "runs_", None) or [{"tag": {}, "history": gm.history_, "lower_bound": gm.lower_bound_}]
    kept_cov = str(gm.covariance_type)
    plots = {"loglik": plot_loglik(runs, folder / "loglik.png", kept_k=best_k, kept_covariance_type=kept_cov).name}
    if table:
        plots["select_k"] = plot_select_k(
            table,
            folder / "select_k.png",
            best_k=best_k,
            criterion=criterion or "validation",
            best_covariance_type=kept_cov,
        ).name
    plots["projection"] = plot_projection(gm, sample, folder / "projection.png").name
    plots["classification"] = plot_classification(gm, sample, folder / "classification.png").name
    summary: dict = {
        "model": model_summary(gm),
        "model_dir": "model",
        "plots": plots,
        "training_log_density_quantiles": log_density_quantiles(gm, sample),
    }
    if table is not None:
        best_type = str(best_covariance_type or gm.covariance_type)
        summary["select_k"] = {
            "best_k": best_k,
            "best_covariance_type": best_type,
            "criterion": criterion,
            "at_range_edge": bool(at_range_edge),
            "table": list(table),
        }
        summary["best_k"] = best_k
        summary["best_covariance_type"] = best_type
        summary["at_range_edge"] = bool(at_range_edge)
    if extra:
        summary.update(extra)
    write_summary(folder / "summary.json", summary)
    return summary
