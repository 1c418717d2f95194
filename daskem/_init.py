"""Initial parameters: every method ends in sufficient statistics and one M-step.

Every method but ``kmeans-full`` reads the data at most twice, whatever the
number of restarts and candidate Ks: one pass draws the fit's sample of the
training rows (:meth:`daskem._model.DataPasses.sample`, sized by the fit loop
for the largest K and D with :func:`daskem._kmeans.sample_size`, held-out
rows excluded, cached and reused to re-seed empty components), and one hard
pass over all the data assigns each row to its nearest centre and gives the
statistics of the target covariance type.

* ``kmeans`` (default): :data:`KMEANS_CANDIDATES` per restart on the
  sample -- k-means solutions (k-means++ seeds and Lloyd's iterations to
  convergence), bare k-means++ seeds and random rows, some on whitened rows;
  the one whose model (hard M-step to the target type, then
  :data:`SCORE_EM_ITER` EM iterations on the sample) explains the sample best
  is kept, and each run starts where that EM ended (no hard pass: 1 pass in
  all; with hard EM, explicit weights or precisions, or NaN filled in, the
  hard pass from its centres instead);
* ``k-means++``: k-means++ seeds on the sample, then the hard pass;
* ``random_from_data``: random sample rows as centres, then the hard pass;
* ``random``: random responsibilities on the sample (no hard pass);
* ``kmeans-full`` (the former ``kmeans``, kept for benchmarks): k-means++
  seeds on the raw sample, up to :data:`KMEANS_MAX_ITER` distributed Lloyd
  iterations over all the data, then the hard pass -- up to 22 passes.

Seeding and Lloyd measure distances between *standardised* sample rows
(column mean and standard deviation of the sample), and the hard pass
assigns by the same distance (its parameters have the sample's per-column
variances), so that the start does not depend on the units of the columns
(``kmeans`` also tries whitened rows for ``full`` and ``tied``, and for
``spherical`` centred rows under one common scale, the model's own metric:
spherical EM is equivariant to a common scale of the columns only; see
:func:`_best_kmeans`). A restart whose hard-pass M-step is ill-defined (a
component with too few distinct rows, possible with ``reg_covar=0``) is
dropped, unless it is its K's last.
Each restart has its own random stream (a ``SeedSequence`` child keyed by K
and the restart's index), so the first restart of a fit with ``n_init=10`` is
the restart of the same fit with ``n_init=1``.

All restarts share every pass. Explicit ``weights_init``, ``means_init`` and
``precisions_init`` override what the method gives; ``means_init`` alone
costs the hard pass only (nearest given mean, plain distances); with all
three the data are not read at all.

The passes go through the fit loop's :class:`daskem._model.DataPasses`
(counted, shared by every run): this module never touches Dask.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import numpy as np

from . import _covariance as cov_
from . import _kmeans
from ._gaussian import GaussianParams, Stats, chunk_statistics, estimate_weighted_log_prob, m_step
from ._kmeans import kmeans_plusplus
from ._model import DataPasses, MixtureModel
from ._numeric import logsumexp_rows
from ._squarem import EMAccelerator, drive
from .errors import InputError

__all__ = ["INIT_METHODS", "initialize", "kmeans_plusplus", "lloyd", "responsibility_statistics"]

INIT_METHODS = ("kmeans", "k-means++", "random_from_data", "random", "kmeans-full")

#: Lloyd iterations over all the data run by the ``kmeans-full`` initialisation at most.
KMEANS_MAX_ITER = 20

#: ``kmeans``: the candidates each restart draws on the sample, per layout of the
#: target covariance type, as (seeding, space): k-means solutions (k-means++
#: seeds, then Lloyd), bare k-means++ seeds or random rows, on standardised rows
#: (``std``), whitened rows (``white``: the sample's correlation removed too;
#: the full and tied models are invariant to any linear map of the data) or
#: centred rows under one common scale (``iso``: the spherical model's own
#: metric: it is not invariant to the units of single columns). The one whose
#: hard M-step to the target type, then :data:`SCORE_EM_ITER` EM iterations,
#: explains the sample best (log-likelihood) is kept.
#: Measured with ``benchmarks/mclust_init.py`` (best of ``n_init=10`` within 0.01
#: nats of mclust or above, 288 cases): four k-means candidates met 260 cases;
#: Lloyd from different seeds mostly ends at one partition, so those restarts
#: explored little (wdbc VVV G=2: all ten at one optimum 256 nats below mclust's);
#: this mix met 282. With ``benchmarks/init_quality.py``: on digits (full, K=10)
#: the median final log-likelihood over 5 seeds rose from -12.8 to -9.4 per row
#: with 4 k-means candidates against 1.
KMEANS_CANDIDATES: dict[str, tuple[tuple[str, str], ...]] = {
    "full": (
        ("kmeans", "std"),
        ("k-means++", "std"),
        ("kmeans", "std"),
        ("k-means++", "white"),
        ("random_from_data", "std"),
        ("k-means++", "std"),
    ),
    "tied": (
        ("kmeans", "std"),
        ("k-means++", "std"),
        ("kmeans", "white"),
        ("kmeans", "std"),
        ("k-means++", "white"),
        ("kmeans", "white"),
    ),
    "diag": (
        ("kmeans", "std"),
        ("k-means++", "std"),
        ("kmeans", "std"),
        ("k-means++", "std"),
        ("random_from_data", "std"),
        ("k-means++", "std"),
    ),
    "spherical": (
        ("kmeans", "std"),
        ("k-means++", "std"),
        ("kmeans", "iso"),
        ("k-means++", "iso"),
        ("random_from_data", "std"),
        ("k-means++", "iso"),
    ),
}
#: further candidates a restart draws at most when none of the first gives a
#: well-defined model on the sample
EXTRA_CANDIDATES = 8
#: sample rows at most on which the candidates are scored
SCORE_ROWS = 10_000
#: EM iterations on those rows before a candidate's log-likelihood is taken
SCORE_EM_ITER = 15
#: ... fewer when EM on them reaches its fixed point to round-off: an iteration
#: that changed no weight, mean or covariance by more than this much of the
#: component's own spread (standard deviations; variances for the covariances)
#: leaves nothing for the rest to change (:func:`_em_step_size`). Well-separated
#: components get there in a few iterations: on the 1e6 x 16 store of
#: ``benchmarks/passes.py``'s out-of-core case (K=8, diag), the candidates'
#: scoring took 0.22 s of the fit's 1.1 s.
SCORE_FIXED_POINT = 1e-11
#: ... fewer (down to :data:`SCORE_MIN_EM_ITER`) when scoring one restart's candidates
#: would take more than this many multiply-adds (rows x K x D^2 for full and tied
#: covariances, rows x K x D otherwise, per iteration and candidate): many
#: components in many dimensions. Measured with ``benchmarks/mclust_init.py`` and
#: ``benchmarks/init_quality.py``: 15 iterations chose better than 5 (iris K=3 full:
#: median final log-likelihood over 10 seeds -1.232 with 5, -1.201 with 15).
SCORE_WORK = 10**10
SCORE_MIN_EM_ITER = 5
#: A restart's candidates are scored side by side (:meth:`daskem._model.DataPasses.map`)
#: when each candidate's EM on the sample is at least this many multiply-adds
#: (as in :data:`SCORE_WORK`); the scores do not change. On threads (a fit on a
#: cluster scores on the client's threads; ``DASKEM_FORK=0``) only in at least
#: :data:`PARALLEL_SCORE_MIN_D` columns (``holds_gil`` below). Measured on 2
#: cores (6 candidates, threads / one thread): D=64 K=10 full on digits 0.67,
#: D=64 K=10 diag 10,000 rows 0.57, D=32 K=8 full 0.85; at D=16 the kernel is
#: mostly element-wise numpy holding the GIL, and threads were 0.91-1.46x. On
#: the forked workers of an in-process fit at every D: 1e6 x 16 rows, K=8 full,
#: 3 seeds in turn, the initialisation's candidates took 0.33-0.39 s one after
#: another and 0.20-0.26 s side by side, the fit 0.83-0.86 s and 0.71-0.73 s,
#: with the same log-likelihood and passes.
PARALLEL_SCORE_WORK = 5 * 10**7
PARALLEL_SCORE_MIN_D = 32
#: The chosen candidate's EM then goes on, accelerated, on the same scored rows (in
#: memory: no pass over the data) until SQUAREM's rule says it converged there at
#: ``tol * POLISH_TOL``, for at most :data:`POLISH_MAX_ITER` iterations and
#: :data:`POLISH_WORK` multiply-adds a run (as in :data:`SCORE_WORK`). A start at the
#: sample's optimum leaves the data only the sample's estimation error to close
#: instead of EM's slow modes (a tiny component, components trading rows), which
#: every pass over all rows would otherwise pay for. Measured with
#: ``benchmarks/passes.py`` (60 cases, passes of the default fit): 1,614 -> 812 in
#: all, within 1e-4 of the optimum 53 -> 59; the very unequal weights, which
#: reached ``max_iter`` in 5 of 10 cases from the 15-iteration start, 793 -> 245
#: passes, none at ``max_iter``. The polish itself took 2-4 ms on the 1e6 x 16 store
#: of ``benchmarks/run.py``'s case (d), where the start was already converged.
POLISH_TOL = 0.1
POLISH_MAX_ITER = 200
POLISH_WORK = 4 * 10**9


def _assign_params(centers: np.ndarray, covariance_type: str, metric: np.ndarray | None = None) -> GaussianParams:
    """Equal weights and one shared covariance: hard assignment = nearest centre.

    ``metric`` is that covariance: per-column variances (shape ``(D,)``: the
    standardised distance), a ``(D, D)`` matrix (``full`` and ``tied`` only:
    the distance of whitened rows), or None (plain Euclidean distance).
    ``spherical`` with per-column variances is assigned with ``diag``
    parameters (the two share one layout of statistics; :func:`_as_type`
    makes the M-step ``spherical``).
    """
    k, d = centers.shape
    m = np.ones(d) if metric is None else np.asarray(metric, dtype=np.float64)
    # the assignment needs only the storage layout of the target structure
    # (``VEV`` is assigned as ``full``, ``EEI`` as ``diag``, ...): :func:`_as_type`
    # hands the statistics to the target's own M-step
    lay = covariance_type if covariance_type == "kmeans" else cov_.layout(covariance_type)
    if m.ndim == 2 and lay not in ("full", "tied"):
        raise ValueError("a full metric is for the full and tied layouts only")
    mat = m if m.ndim == 2 else np.diag(m)
    if lay == "spherical" and metric is not None:
        lay = "diag"
    cov = {
        "full": lambda: np.broadcast_to(mat, (k, d, d)).copy(),
        "tied": lambda: mat,
        "diag": lambda: np.broadcast_to(m, (k, d)).copy(),
        "spherical": lambda: np.ones(k),
        "kmeans": lambda: np.ones(k),
    }[lay]()
    covariance_type = lay
    return GaussianParams.from_covariances(np.full(k, 1.0 / k), centers, cov, covariance_type)


def _identity_params(centers: np.ndarray, covariance_type: str) -> GaussianParams:
    """Equal weights and unit covariances: hard assignment = nearest centre."""
    return _assign_params(centers, covariance_type)


def responsibility_statistics(
    sample: np.ndarray, resp: np.ndarray, covariance_type: str
) -> tuple[Stats, GaussianParams]:
    """Statistics of in-memory rows under given responsibilities, and the parameters they refer to.

    The reference point of every component is the sample mean (the returned
    parameters have all their means there), so :func:`daskem._gaussian.m_step`
    turns the statistics into parameters exactly as after an E-step.
    """
    n, d = sample.shape
    k = resp.shape[1]
    centre = sample.mean(axis=0)
    z = sample - centre
    layout = cov_.layout(covariance_type)
    if layout == "full":
        s2 = np.einsum("nk,ni,nj->kij", resp, z, z, optimize=True)
    elif layout == "tied":
        s2 = z.T @ z
    else:
        s2 = resp.T @ (z * z)
    stats = Stats(float(n), 0.0, resp.sum(axis=0), resp.T @ z, s2)
    at = GaussianParams.from_covariances(
        np.full(k, 1.0 / k),
        np.broadcast_to(centre, (k, d)).copy(),
        cov_.unit_covariances(covariance_type, k, d),
        covariance_type,
    )
    return stats, at


def _random_resp_params(
    sample: np.ndarray, k: int, covariance_type: str, reg_covar: float, rng: np.random.Generator
) -> GaussianParams:
    """scikit-learn's ``random`` init, on the sample: random responsibilities, then the M-step."""
    resp = rng.uniform(size=(sample.shape[0], k))
    resp /= resp.sum(axis=1, keepdims=True)
    stats, at = responsibility_statistics(sample, resp, covariance_type)
    params, _ = m_step(stats, at, reg_covar, empty_threshold=0.0)
    return params


def _hard_pass_params(
    passes: DataPasses,
    centers_list: Sequence[np.ndarray],
    covariance_type: str,
    model: MixtureModel,
    metrics: Sequence[np.ndarray | None] | None = None,
) -> list[GaussianParams]:
    """One hard pass assigning rows to their nearest centre, then the M-step.

    ``metrics`` (one per run) measure "nearest" (:func:`_assign_params`);
    the M-step is always to ``covariance_type``. Empty components are
    re-seeded on the fit's sample (no extra pass: it is cached).
    """
    hard = dataclasses.replace(model, hard=True)
    metrics = [None] * len(centers_list) if metrics is None else metrics
    start = [_assign_params(np.asarray(c, dtype=np.float64), covariance_type, m) for c, m in zip(centers_list, metrics)]
    stats = passes.statistics(hard, start)
    out: list[GaussianParams | None] = []
    errors: list[Exception] = []
    for p0, s in zip(start, stats):
        try:
            p, empty = hard.m_step(s, _as_type(p0, covariance_type))
        except InputError:
            raise
        except (ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
            # this restart's partition has a component whose covariance is
            # ill-defined (reg_covar=0 on rounded data): the run is dropped,
            # unless it was its K's last one
            errors.append(exc)
            out.append(None)
            continue
        if empty.any():
            p = hard.reseed(p, empty, passes.sample())
        out.append(p)
    if errors:
        ks = [p0.n_components for p0 in start]
        for k in set(ks):
            if all(p is None for p, kk in zip(out, ks) if kk == k):
                raise errors[0]
    return [p for p in out if p is not None]


def _as_type(p0: GaussianParams, covariance_type: str) -> GaussianParams:
    """``p0`` as the E-step parameters of an M-step to ``covariance_type``.

    Only a diag-assigned ``spherical`` changes: same statistics layout and
    reference point, a spherical covariance for components left empty.
    """
    if p0.covariance_type == covariance_type:
        return p0
    cov = np.asarray(p0.covariances)
    if cov_.layout(covariance_type) == "spherical" and p0.layout == "diag":
        cov = cov.mean(axis=1)
    return GaussianParams.from_covariances(p0.weights, p0.means, cov, covariance_type)


def _row_work(k: int, d: int, covariance_type: str) -> int:
    """Multiply-adds a row costs one EM iteration, roughly: K D^2 (full, tied) or K D."""
    return k * (d * d if cov_.layout(covariance_type) in ("full", "tied") else d)


def _score_iterations(n_rows: int, k: int, d: int, covariance_type: str, n_candidates: int) -> int:
    """EM iterations per candidate within :data:`SCORE_WORK` (see there)."""
    fit = SCORE_WORK // max(n_candidates * _row_work(k, d, covariance_type) * n_rows, 1) - 1
    return int(min(SCORE_EM_ITER, max(SCORE_MIN_EM_ITER, fit)))


def _sample_score(
    rows: np.ndarray,
    covariance_type: str,
    reg_covar: float,
    n_iter: int,
    cand: tuple[np.ndarray, np.ndarray],
) -> tuple[float, GaussianParams | None]:
    """Log-likelihood on the sample of the model the hard pass would give from a candidate.

    ``cand`` is ``(centres, metric)``: the sample rows are assigned to their
    nearest centre (``metric``, as in :func:`_assign_params`), the M-step is
    to ``covariance_type``, then ``n_iter`` EM iterations. Returns the
    log-likelihood of the last parameters and those parameters;
    ``(-inf, None)`` when a component is empty or ill-defined. Pure numpy:
    no pass over the data. The candidate comes last, so that a
    :func:`functools.partial` of the rest is the picklable function
    :meth:`~daskem._model.DataPasses.map` wants.
    """
    centres, metric = cand
    p0 = _assign_params(centres, covariance_type, metric)
    s = chunk_statistics(rows, [p0], hard=True)[0]
    try:
        p, empty = m_step(s, _as_type(p0, covariance_type), reg_covar)
    except ValueError:
        return -np.inf, None
    if empty.any():
        return -np.inf, None
    for _ in range(n_iter):
        s = chunk_statistics(rows, [p])[0]
        prev = p
        try:
            p, empty = m_step(s, p, reg_covar)
        except ValueError:
            return -np.inf, None
        if empty.any():
            return -np.inf, None
        if _em_step_size(prev, p) <= SCORE_FIXED_POINT:
            break  # EM's fixed point to round-off: the iterations left would change nothing
    return float(logsumexp_rows(estimate_weighted_log_prob(rows, p)).sum()), p


def _em_step_size(p: GaussianParams, q: GaussianParams) -> float:
    """The largest change from ``p`` to ``q`` in units of ``q``'s spread.

    Weights as they are, means over the component's standard deviation of
    their column, covariances over the product of the two columns'
    (``|dSigma_ij| / (sd_i sd_j)``): free of the data's units and offsets.
    """
    k, d = q.means.shape
    cq = cov_.dense_covariances(np.asarray(q.covariances, dtype=np.float64), q.covariance_type, k, d)
    cp = cov_.dense_covariances(np.asarray(p.covariances, dtype=np.float64), p.covariance_type, k, d)
    with np.errstate(divide="ignore", invalid="ignore"):
        sd = np.sqrt(np.diagonal(cq, axis1=1, axis2=2))
        rel_cov = np.abs(cq - cp) / (sd[:, :, None] * sd[:, None, :])
        rel_means = np.abs(q.means - p.means) / sd
        steps = (np.abs(q.weights - p.weights).max(), rel_means.max(), rel_cov.max())
    return float(max(steps)) if all(np.isfinite(steps)) else np.inf


class _PolishStop(Exception):
    """An EM step of the polish emptied a component or failed: keep the last accepted point."""


def _polish(
    rows: np.ndarray, model: MixtureModel, reg_covar: float, tol: float, item: tuple[int, GaussianParams]
) -> GaussianParams:
    """The chosen candidate's EM on ``rows`` continued, accelerated, until converged there (see :data:`POLISH_TOL`).

    SQUAREM's machine (:class:`daskem._squarem.EMAccelerator`) with
    ``rows`` as its one chunk: an extrapolated point whose M-step empties a
    component or fails is rejected; an EM step that does either ends the
    polish at the last accepted point's image. ``item`` is ``(max_iter,
    params)``, last for :func:`functools.partial`.
    """
    max_iter, params = item
    if max_iter <= 0:
        return params
    machine: EMAccelerator

    def step(stats: Stats, p: GaussianParams) -> tuple[GaussianParams, bool]:
        extrapolated = machine.stage in ("C", "D")
        try:
            new, empty = m_step(stats, p, reg_covar)
        except ValueError:
            if extrapolated:
                return p, True
            raise _PolishStop from None
        if empty.any():
            if extrapolated:
                return new, True
            raise _PolishStop
        return new, False

    machine = EMAccelerator(
        params,
        m_step=step,
        objective=model.objective,
        to_vector=model.to_vector,
        from_vector=model.from_vector,
        scale=getattr(model, "vector_scale", None),
        tol=tol * POLISH_TOL,
        max_iter=max_iter,
    )
    try:
        drive([machine], lambda ps: chunk_statistics(rows, list(ps)))
    except (_PolishStop, FloatingPointError):
        pass
    return machine.params


def lloyd(
    passes: DataPasses, centers_list: Sequence[np.ndarray], *, max_iter: int, tol: float, model: MixtureModel
) -> list:
    """Distributed Lloyd iterations: hard EM with equal weights and one shared
    spherical covariance, every run advancing in the same passes."""
    hard = dataclasses.replace(model, hard=True)
    start = [_identity_params(np.asarray(c, float), "kmeans") for c in centers_list]
    return passes.iterate(hard, start, tol=tol, max_iter=max_iter)


def _restart_rngs(
    components: Sequence[int], base: int, groups: Sequence[str] | None = None
) -> list[np.random.Generator]:
    """One independent stream per run, keyed by (K, index of the restart among that K's).

    With ``groups`` (one per run: the layouts of a selection over several
    covariance structures) the index counts within the run's group, so that
    each group's runs draw the streams a fit of that group alone would.
    """
    seen: dict[tuple[str, int], int] = {}
    out = []
    for g, k in zip(groups if groups is not None else [""] * len(components), components):
        i = seen.get((g, k), 0)
        seen[(g, k)] = i + 1
        out.append(np.random.default_rng(np.random.SeedSequence(base, spawn_key=(int(k), i))))
    return out


def _sample_centres(
    init_params: str, Z: np.ndarray, components: Sequence[int], rngs: Sequence[np.random.Generator]
) -> list[np.ndarray]:
    """Centres of every run in standardised units: random rows, k-means++ seeds, or k-means."""
    out = []
    for k, r in zip(components, rngs):
        if init_params == "random_from_data":
            out.append(Z[r.choice(Z.shape[0], size=k, replace=Z.shape[0] < k)])
        elif init_params == "k-means++":
            out.append(kmeans_plusplus(Z, k, r))
        else:
            out.append(_kmeans.kmeans(Z, k, r))
    return out


def _random_rows(Z: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return Z[rng.choice(Z.shape[0], size=k, replace=Z.shape[0] < k)]


def _candidate_kinds(covariance_type: str, d: int) -> tuple[tuple[str, str], ...]:
    """The (seeding, space) of each candidate a ``kmeans`` restart tries (:data:`KMEANS_CANDIDATES`)."""
    layout = cov_.layout(covariance_type)
    # whitened rows are assigned with a full metric: for the full and tied layouts only
    ok = {"std": True, "white": d > 1 and layout in ("full", "tied"), "iso": d > 1}
    return tuple((kind, space if ok[space] else "std") for kind, space in KMEANS_CANDIDATES[layout])


def _best_kmeans(
    rows: np.ndarray,
    Z: np.ndarray,
    centre: np.ndarray,
    scale: np.ndarray,
    components: Sequence[int],
    rngs: Sequence[np.random.Generator],
    covariance_type: str | Sequence[str],
    reg_covar: float,
    map_items: Callable[..., list] | None = None,
    polish: tuple[MixtureModel, float] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[GaussianParams | None]]:
    """Per restart, the best of the :data:`KMEANS_CANDIDATES` on the sample.

    ``covariance_type`` is the target of every run, or one per run (a
    selection over several structures): each run's candidates are those of
    its own layout, scored with its own M-step.

    Candidates are k-means solutions (k-means++ seeds and Lloyd), bare
    k-means++ seeds and random rows: Lloyd from different seeds mostly ends
    at one partition, so restarts of k-means alone explore little (wdbc, VVV,
    G=2: every restart ended 256 nats below mclust), while the seeds' own
    partitions are diverse and the short EM of :func:`_sample_score` picks
    those that lead to good optima. Whitened candidates work on whitened rows
    (the sample's correlation removed; the full and tied models are invariant
    to any linear map of the data, so the start may be too): for ``tied``,
    where one covariance shared by all components makes the metric matter,
    half the candidates (iris K=4 and wdbc K=2..4 reached better optima,
    measured with ``benchmarks/init_quality.py``), for ``full`` one k-means++
    candidate. ``spherical`` candidates are half on centred rows under one
    common scale, the model's own metric (thyroid VII G=3: 72 nats more).
    When no candidate gives a well-defined model on the sample (rounded data,
    small clusters in many dimensions), up to
    :data:`EXTRA_CANDIDATES` more are drawn. ``map_items`` (the fit's
    :meth:`~daskem._model.DataPasses.map`) scores a restart's candidates side
    by side when they are heavy (:data:`PARALLEL_SCORE_WORK`). With
    ``polish=(model, tol)`` the chosen candidates' EM goes on until
    converged on the scored rows (:func:`_polish`; the runs side by side
    when heavy). Returns the centres (data units) and the metric of each
    restart's hard pass, and the parameters the chosen candidate's EM on the
    (scored) sample rows ended at (None when no candidate was well-defined).
    """
    variances = scale**2
    types = [covariance_type] * len(components) if isinstance(covariance_type, str) else list(covariance_type)
    run_kinds = [_candidate_kinds(t, Z.shape[1]) for t in types]
    all_kinds = [kind for kinds in run_kinds for kind in kinds]
    white = _kmeans.whiten(Z) if any(sp == "white" for _, sp in all_kinds) else None
    # one common scale: the root mean column variance
    iso = float(np.sqrt(np.mean(variances)))
    # a fixed subset (the sample is in row order): the same for every run
    scored = _kmeans.subsample(rows, SCORE_ROWS)
    spaces: dict[str, tuple[np.ndarray, Callable[[np.ndarray], np.ndarray], np.ndarray]] = {
        "std": (Z, lambda c: centre + scale * c, variances)
    }
    if white is not None:
        W, L = white
        spaces["white"] = (W, lambda c: centre + scale * (c @ L.T), scale[:, None] * (L @ L.T) * scale)
    if any(sp == "iso" for _, sp in all_kinds):
        spaces["iso"] = ((rows - centre) / iso, lambda c: centre + iso * c, np.full(Z.shape[1], iso**2))
    centres, metrics, fitted = [], [], []
    for k, r, kinds, run_type in zip(components, rngs, run_kinds, types):
        fitted.append(None)

        def draw(kind: str, space: str) -> tuple[np.ndarray, np.ndarray]:
            seed = {"kmeans": _kmeans.kmeans, "k-means++": kmeans_plusplus, "random_from_data": _random_rows}[kind]
            U, back, metric = spaces.get(space, spaces["std"])
            return back(seed(U, k, r)), metric  # noqa: B023

        cands = [draw(kind, space) for kind, space in kinds]
        best_i = 0
        if len(cands) > 1:
            d = Z.shape[1]
            n_iter = _score_iterations(scored.shape[0], k, d, run_type, len(cands))

            score = functools.partial(_sample_score, scored, run_type, reg_covar, n_iter)
            work = n_iter * scored.shape[0] * _row_work(k, d, run_type)
            if map_items is not None and work >= PARALLEL_SCORE_WORK:
                results = map_items(score, cands, holds_gil=d < PARALLEL_SCORE_MIN_D)
            else:
                results = [score(c) for c in cands]
            # no candidate gave a well-defined model on the sample (a component with too
            # few distinct rows for its covariance: rounded data, small clusters in many
            # dimensions): draw more, up to :data:`EXTRA_CANDIDATES`
            for j in range(EXTRA_CANDIDATES):
                if max(v for v, _ in results) > -np.inf:
                    break
                cands.append(draw(*kinds[j % len(kinds)]))
                results.append(score(cands[-1]))
            # the first of the best: candidates that found one partition (in another
            # order) tie up to round-off, and round-off must not decide
            best = max(v for v, _ in results)
            if best > -np.inf:
                best_i = next(i for i, (v, _) in enumerate(results) if v >= best - 1e-9 * abs(best))
                fitted[-1] = results[best_i][1]
        centres.append(cands[best_i][0])
        metrics.append(cands[best_i][1])
    if polish is not None:
        model, tol = polish
        d = Z.shape[1]
        todo = [i for i, p in enumerate(fitted) if p is not None]
        # multiply-adds of one iteration on the scored rows, per run
        step = [scored.shape[0] * _row_work(components[i], d, types[i]) for i in todo]
        caps = [min(POLISH_MAX_ITER, POLISH_WORK // max(w, 1)) for w in step]
        run = functools.partial(_polish, scored, model, reg_covar, tol)
        items = [(cap, fitted[i]) for i, cap in zip(todo, caps)]
        work = sum(cap * w for cap, w in zip(caps, step))
        if map_items is not None and len(items) > 1 and work >= PARALLEL_SCORE_WORK:
            done = map_items(run, items, holds_gil=d < PARALLEL_SCORE_MIN_D)
        else:
            done = [run(item) for item in items]
        for i, p in zip(todo, done):
            fitted[i] = p
    return centres, metrics, fitted


def _kmeans_full(
    passes: DataPasses,
    components: Sequence[int],
    covariance_type: str,
    rng: np.random.Generator,
    seeding_rows: Callable[[], np.ndarray],
    model: MixtureModel,
    tol: float,
) -> list[GaussianParams]:
    """The former ``kmeans``: raw k-means++ seeds, distributed Lloyd, hard pass (up to 22 passes)."""
    pts = seeding_rows()
    seeds = [kmeans_plusplus(pts, k, rng) for k in components]
    runs = lloyd(passes, seeds, max_iter=KMEANS_MAX_ITER, tol=tol * 0.1, model=model)
    return _hard_pass_params(passes, [r.params.means for r in runs], covariance_type, model)


def initialize(
    passes: DataPasses,
    *,
    components: Sequence[int],
    covariance_type: str,
    init_params: str,
    rng: np.random.Generator,
    model: MixtureModel,
    tol: float,
    seeding_rows: Callable[[], np.ndarray],
    keep_sample_em: Callable[[], bool] = lambda: False,
    weights_init: np.ndarray | None = None,
    means_init: np.ndarray | None = None,
    precisions_init: np.ndarray | None = None,
    run_layouts: Sequence[str] | None = None,
) -> list[GaussianParams]:
    """Initial parameters for every run, in the order of ``components``.

    ``components`` holds the K of every run (restarts and candidate Ks, e.g.
    ``[2, 2, 3, 3]``): all runs share the sample and the hard pass (and, for
    ``kmeans-full``, the Lloyd passes). ``seeding_rows()`` gives the rows to
    seed on (the fit's sample, NaN filled); it is only called when a method
    needs it. ``run_layouts`` (one per run, for a selection over several
    covariance structures) are the layouts the runs will be fitted with:
    each ``kmeans`` run draws and scores its layout's candidates (with its
    own random stream, as a fit of that layout alone), while the hard pass
    is to ``covariance_type`` for all.

    ``keep_sample_em()`` says whether the ``kmeans`` candidates' EM on the
    sample may stand as the start (soft EM; the seeding rows are training
    rows as they are, none NaN filled). Then each run starts where its chosen
    candidate's EM, continued until converged on the (at most
    :data:`SCORE_ROWS`) scored sample rows (:func:`_polish`; ``tol`` is the
    fit's), ended, without a hard pass (unless ``weights_init`` or
    ``precisions_init`` is given): 1 pass, and for data no larger than the
    sample the fit does not repeat those iterations. With ``run_layouts``
    those parameters are in each run's layout.

    Returns
    -------
    list of GaussianParams
        One per entry of ``components`` (a single one when ``weights_init``,
        ``means_init`` and ``precisions_init`` are all given).
    """
    if weights_init is not None and means_init is not None and precisions_init is not None:
        # identical restarts would be wasted passes: one run
        return [GaussianParams.from_precisions(weights_init, means_init, precisions_init, covariance_type)]
    if means_init is not None:
        # the given means decide the hard assignment that yields the covariances
        runs_params = _hard_pass_params(passes, [np.asarray(means_init, float)], covariance_type, model)
    elif init_params == "kmeans-full":
        runs_params = _kmeans_full(passes, components, covariance_type, rng, seeding_rows, model, tol)
    else:
        rngs = _restart_rngs(components, int(rng.integers(2**63 - 1)), run_layouts)
        rows = np.asarray(seeding_rows(), dtype=np.float64)
        if rows.shape[0] == 0:
            raise InputError("no training rows to fit on")
        if init_params == "random":
            runs_params = [
                _random_resp_params(rows, k, covariance_type, model.reg_covar, r) for k, r in zip(components, rngs)
            ]
        else:
            Z, centre, scale = _kmeans.standardize(rows)
            fitted: list[GaussianParams | None] | None = None  # the candidates' EM, kmeans only
            keep = weights_init is None and precisions_init is None and keep_sample_em()
            if init_params == "kmeans":
                centres, metrics, fitted = _best_kmeans(
                    rows,
                    Z,
                    centre,
                    scale,
                    components,
                    rngs,
                    run_layouts or covariance_type,
                    model.reg_covar,
                    map_items=passes.map,
                    polish=(model, tol) if keep else None,
                )
            else:
                centres = [centre + scale * c for c in _sample_centres(init_params, Z, components, rngs)]
                metrics = [scale**2] * len(centres)
            if keep and fitted is not None and all(p is not None for p in fitted):
                runs_params = fitted
            else:
                runs_params = _hard_pass_params(passes, centres, covariance_type, model, metrics=metrics)
    out = []
    for p in runs_params:
        weights = p.weights if weights_init is None else np.asarray(weights_init, float)
        means = p.means if means_init is None else np.asarray(means_init, float)
        if precisions_init is not None:
            out.append(GaussianParams.from_precisions(weights, means, precisions_init, covariance_type))
        else:
            # (the type of each run's own layout when its candidate's EM is kept for ``run_layouts``)
            out.append(GaussianParams(weights, means, p.covariances, p.precisions_cholesky, p.covariance_type))
    return out
