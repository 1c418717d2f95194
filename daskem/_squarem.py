"""SQUAREM acceleration of EM, as a per-run state machine: pure numpy, no Dask.

Every pass over the data serves every run (restarts, candidate K), so a run
cannot call its fixed-point map when it likes. Each run is instead an
:class:`EMAccelerator`: the fit loop asks it for the parameters whose
statistics the next pass must compute (:meth:`EMAccelerator.proposal`, None
once the run is done), makes the pass for all runs together, and hands each
run its statistics (:meth:`EMAccelerator.receive`). The machine knows nothing
Gaussian: the model comes in as callables (``m_step``, ``objective`` and,
for SQUAREM, ``to_vector`` / ``from_vector`` and optionally ``scale``, the
metric of the step lengths).

Plain EM (``method=None``) is the machine with one state: every pass is an
E-step at the current parameters followed by the M-step, exactly as
:class:`daskem._fitloop.Run` does.

SQUAREM (``method="squarem"``; Varadhan & Roland 2008, scheme S3, with the
safeguards of the reference implementation, R's ``SQUAREM::squarem1``) runs
cycles of three passes (two without extrapolation, four with a failed
stabilisation) from a point ``x0``:

A. pass at ``x0``: ``L(x0)`` and ``x1 = M(x0)``;
B. pass at ``x1``: ``L(x1)`` and ``x2 = M(x1)``. With ``r = x1 - x0`` and
   ``v = x2 - 2 x1 + x0`` (in the vector parameterisation), the S3 step
   ``alpha = ||r|| / ||v||`` is clamped to ``[step_min, step_max]`` and
   ``x' = x0 + 2 alpha r + alpha^2 v`` (the issue's ``a = -alpha``). With
   ``alpha`` within 0.01 of 1, ``x'`` is ``x2`` itself: no third pass, the
   next cycle starts at ``x2`` (plain EM, two steps);
C. pass at ``x'``: ``L(x')`` and ``M(x')``. Accepted when ``L(x') >= L(x1)``:
   the next cycle starts at ``M(x')``, whose log-likelihood the next cycle's
   first pass computes anyway. Rejected when ``L(x')`` is not finite or the
   M-step had to re-seed empty components there (or failed: an ill-defined
   covariance, which the fit loop reports as a re-seeding at an
   extrapolated point): the next cycle starts at
   ``x2`` and its first pass computes ``L(x2) >= L(x1)``; the pass at ``x'``
   is the price;
D. when ``L(x')`` is finite but below ``L(x1)``, ``squarem1``'s stabilisation
   step decides (``stabilise=True``, the default): the next pass is at
   ``M(x')``; if ``L(M(x')) >= L(x1)`` it is accepted and that pass was the
   first of the next cycle (from ``M(x')``), else the next cycle starts at
   ``x2`` (two passes spent), as when the M-step at ``M(x')`` had to
   re-seed or failed. With ``stabilise=False`` such a point is
   rejected at once. (On the scikit-learn photo's pixels, K=8, the
   stabilisation cut the rejections from 41 to 10 (diag) and the passes to
   reach the optimum by 20-40%.)

Step bounds follow ``squarem1``: ``step_min = 1`` (EM's map is a
contraction, its Jacobian's eigenvalues lie in [0, 1)), ``step_max`` starts
at ``step_max0 = 1`` and is multiplied by ``mstep = 4`` after every cycle
whose step sat at the bound and was kept (an accepted extrapolation, or the
plain two-step point while ``step_max`` is 1); it is divided by ``mstep``
(not below ``step_max0``) after a rejection at the bound. ``squarem1``
compares with ``L(x0)`` plus a slack (``objfn.inc``); here the comparison is
with ``L(x1)`` and without slack, so that the accepted sequence is monotone.

Monotonicity: the *accepted* log-likelihoods of a run are ``L(x0), L(x1)``
and ``L(x')`` or ``L(M(x'))`` when accepted, cycle after cycle. Each EM step
does not lower the log-likelihood (``L(M(x)) >= L(x)``), and an extrapolated
point (or its stabilised image) is kept only when it is at least ``L(x1)``;
the next point after it is again an EM step. So no extrapolation can let a
decrease through. EM's own steps are trusted as plain EM trusts them, with
two exceptions that plain EM shares: re-seeding an empty component (the
M-step reports it as ``perturbed``) restarts the cycle and the stopping
rule's memory, and with ``reg_covar`` the M-step is not an exact maximiser:
its fixed point lies a little below the likelihood's maximum (by about
``(reg_covar / variance)^2``), and from an extrapolated point above it an EM
step can go down. Such an EM point is not recorded (the result stays the
best point's image). When its drop is below ``tol`` the run does not end
there (that point may be on a slow climb that plain EM from the same start
follows higher): the first such drop starts a new cycle at that EM image,
with the stopping rule's memory cleared; after the second the run goes on
as plain EM, stopped by plain EM's rule (a pass's change below ``tol``).
Before the run's first extrapolation its points are plain EM's, and such a
drop stops it as plain EM's rule stops plain EM. Drops within the round-off
of a mean over all rows (``64 eps |L|``) are recorded as they come.

The result of a run, in both modes, follows scikit-learn: ``params`` is the
M-step image of the last accepted point and ``lower_bound`` that point's
log-likelihood.

What ``tol`` means
------------------
* plain EM: scikit-learn's rule, unchanged: stop after the pass at which the
  mean log-likelihood per row changed by less than ``tol`` from the previous
  pass (``|L_t - L_(t-1)| < tol``);
* SQUAREM: stop when the *estimated remaining gain* ``L_inf - L_t`` of the
  mean log-likelihood per row is below ``tol / 30``
  (:data:`REMAINING_FRACTION`), checked after each cycle's second pass. The
  estimates are local: they see EM's fastest modes, not a slow one (a tiny
  component, a plateau), and on ``benchmarks/passes.py`` the true gap when
  an estimate first fell below ``x`` was up to several hundred ``x``; with
  ``tol / 30`` the default ``tol=1e-3`` ended within 1e-4 per row of the
  optimum in 57 of 60 cases there (from the initialisation's start, which
  has already converged on a sample; see ``README.md``, "Passes"), where
  plain EM at ``tol=1e-3`` from the former initialisation stopped up to 0.2
  short. Two estimates, and the larger one
  counts: Aitken's estimate
  of the limit (as R's ``mixture`` package uses for plain EM) from the last
  three cycle starts' log-likelihoods (before there are three, a run stops
  only when an EM step, a cycle's first or the one to its start, gains less
  than ``tol / 10,000``: from a start as close as the initialisation's,
  EM's fast modes look converged after one cycle while a slow one is left;
  or, with a ``prior_rate``, EM's rate measured by plain EM steps on the
  fit's sample at the start (:func:`probe_rate`), which sees the slow
  modes, when the bound ``g c^2 / (1 - c^2)`` below with the larger of that
  rate and the run's own is under ``tol / 30``: a fast mixture then ends
  after one cycle; at the run's very first pass, when no gain is known yet,
  with the model's ``surrogate_gain``: EM's surrogate gains ``q`` from ``x0``
  to ``x1 = M(x0)``, known from that pass's statistics, and with that rate
  ``q c^2 / (1 - c)`` bounds what is left after ``x1``
  (:func:`surrogate_remaining`): a well-separated mixture from the sample's
  optimum then ends after one pass, its lower bound EM's at ``x1``,
  ``L(x0) + q``), and that of the cycle's own EM step: gain ``g = L(x1) - L(x0)`` and EM's
  rate ``c``, the largest residual ratio ``||x2 - x1|| / ||x1 - x0||`` of
  the last three cycles, give ``g c^2 / (1 - c^2)``. Each estimate is
  infinite when its rate is negative, not below 1 or divides by (nearly)
  zero, so the run goes on. Like any local rule it cannot always see a
  plateau that EM later leaves (a saddle region: the photo's pixels, diag,
  creep at 1e-5 per pass 0.16 below the optimum before they escape; one
  seed of 5 stops on such a plateau at ``tol / 30``, 8e-3 below, where
  ``tol / 100`` went on for 101 passes);
* both: ``max_iter`` counts passes (EM iterations), extrapolated ones
  included; a run that reaches it stops unconverged.

Checkpoints: :meth:`EMAccelerator.state` exports everything (the points of
the current cycle, the stage, the step bounds, the history) as arrays plus a
JSON-able dict, and :meth:`EMAccelerator.from_state` rebuilds a machine that
continues exactly as the uninterrupted one would.

The parameterisation the extrapolation works in is the model's
(:meth:`daskem._model.MixtureModel.to_vector` / ``from_vector``; the Gaussian
one is :meth:`daskem._gaussian_model.GaussianModel.to_vector`): this module
knows no model. The fit loop's :class:`daskem._fitloop.AcceleratedRun` wraps
one machine per run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Params = Any
Stats = Any

#: Accelerated EM methods: None is plain EM.
METHODS = (None, "squarem")

#: An S3 step this close to 1 is no extrapolation: ``x'`` would be ``x2``.
_UNIT_STEP = 0.01

#: Relative size of the round-off of a mean log-likelihood, for the stopping rule.
_ROUNDOFF = 64 * np.finfo(np.float64).eps

#: Cycles whose residual ratio (EM's rate) the stopping rule takes the largest of.
_RATE_WINDOW = 3

#: Before three cycle starts (Aitken's estimate) SQUAREM stops only when an EM step
#: (a cycle's first, or the one to a cycle's start) gains less than
#: ``tol * REMAINING_FRACTION * _EARLY_GAIN`` (``tol / 10,000``).
_EARLY_GAIN = 3e-3

#: SQUAREM stops when the estimated remaining gain is below ``tol * REMAINING_FRACTION``. The estimates
#: are local and see EM's fastest modes best: on ``benchmarks/passes.py`` (6 data sets x full, diag x 5
#: seeds) the true gap when they first fell below ``x`` was up to 600 ``x`` (a tiny component's slow mode,
#: a plateau). From the initialisation's start (its chosen candidate's EM continued until converged on
#: the sample), the share of those 60 cases ending within 1e-4 of the optimum at the default ``tol=1e-3``
#: and ``max_iter=100``, and the median passes against the former defaults', were 93% and 0.26 with 1/10,
#: 95% and 0.32 with 1/30, 98% and 0.37 with 1/100 (812 passes in all against 589 with 1/30: the two
#: cases 1/100 kept were plateaus that EM left after about 100 passes). From the former 15-iteration start,
#: 1/30 had ended within 1e-4 in only 88% of them without a ``max_iter`` cap, 1/100 in 93%.
REMAINING_FRACTION = 1.0 / 30.0

#: Plain EM steps :func:`probe_rate` takes at most, and the relative agreement of two successive
#: step ratios at which it stops sooner.
PROBE_STEPS = 8
_PROBE_AGREE = 0.05

#: A step of the parameter vector this small against the vector itself is round-off (:func:`probe_rate`).
_PROBE_ROUNDOFF = 1e-11


# --------------------------------------------------------------------------
# stopping
# --------------------------------------------------------------------------


def aitken_remaining(values: Sequence[float], floor: float = 0.0) -> float:
    """Aitken's estimate of ``L_inf - L_t`` from three successive values ``L_(t-2), L_(t-1), L_t``.

    With ``d1 = L_(t-1) - L_(t-2)``, ``d2 = L_t - L_(t-1)`` and the rate
    ``c = d2 / d1``, a linearly converging sequence has ``L_inf - L_t =
    d2 c / (1 - c)``. A sequence that did not move in its last step
    (``d2 <= floor``: round-off) has nothing left: 0. Where the rate is
    undefined (``d1 <= 0``), negative or not below 1, the estimate is
    ``inf``.

    Parameters
    ----------
    values : sequence of 3 floats
    floor : float
        Changes up to this size are round-off.

    Returns
    -------
    float
        Non-negative, or ``inf``.
    """
    l0, l1, l2 = (float(v) for v in values)
    d1, d2 = l1 - l0, l2 - l1
    if not (math.isfinite(d1) and math.isfinite(d2)):
        return math.inf
    if d2 <= floor:
        return 0.0
    if d1 <= 0.0:
        return math.inf
    c = d2 / d1
    if not c < 1.0 - 1e-12:
        return math.inf
    return d2 * c / (1.0 - c)


def em_remaining(gain: float, rate: float, floor: float = 0.0) -> float:
    """``L_inf - L`` for EM from one step's ``gain`` and EM's parameter ``rate``.

    Near a fixed point EM's error shrinks by the Jacobian's largest
    eigenvalue ``rate`` per step, and the log-likelihood's gap (quadratic in
    the error) by ``rate**2``: the steps still to come add up to
    ``gain * rate**2 / (1 - rate**2)``. ``inf`` when ``rate`` is not in
    ``[0, 1)``; 0 when ``gain <= floor`` (round-off: the rate is then noise).
    """
    if not (math.isfinite(gain) and math.isfinite(rate)):
        return math.inf
    if gain <= floor:
        return 0.0
    rho = rate * rate
    if not (0.0 <= rho < 1.0 - 1e-12):
        return math.inf
    return gain * rho / (1.0 - rho)


def surrogate_remaining(q_gain: float, rate: float, floor: float = 0.0) -> float:
    """``L_inf - L(x1)`` after one EM step ``x1 = M(x0)``, from the gain of EM's surrogate and EM's rate.

    The M-step raises EM's surrogate ``Q( . | x0)`` (the expected
    complete-data log-likelihood, a function of the statistics of the pass
    at ``x0``) by ``q_gain = Q(x1 | x0) - Q(x0 | x0)``: known without a
    pass at ``x1``. Near a fixed point, with the complete-data information
    ``I_c`` and EM's Jacobian ``J = I_c^-1 I_mis`` (its eigenvalues are
    EM's rates ``c_i``), the observed information is ``I_c (1 - J)``. Along
    mode ``i``, with error ``e_i`` at ``x0`` and ``l_i`` its ``I_c`` norm,
    the step is ``(1 - c_i) e_i``, the surrogate gains
    ``l_i (1 - c_i)^2 e_i^2 / 2`` and the log-likelihood still lacks
    ``l_i (1 - c_i) c_i^2 e_i^2 / 2`` at ``x1``: ``q_gain_i c_i^2 / (1 - c_i)``.
    With every ``c_i <= rate`` the sum is at most ``q_gain rate^2 / (1 - rate)``
    (the same bound as :func:`em_remaining`'s, whose ``gain`` is the
    log-likelihood's: ``(1 + c) q_gain`` along a mode). ``inf`` when ``rate``
    is not in ``[0, 1)`` or ``q_gain`` is not finite; 0 when ``q_gain <= floor``.
    """
    if not (math.isfinite(q_gain) and math.isfinite(rate)):
        return math.inf
    if q_gain <= floor:
        return 0.0
    if not (0.0 <= rate < 1.0 - 1e-12):
        return math.inf
    return q_gain * rate * rate / (1.0 - rate)


def probe_rate(
    params: Params,
    em_map: Callable[[Params], Params | None],
    to_vector: Callable[[Params], np.ndarray],
    scale: Callable[[Params], np.ndarray | None] | None = None,
    max_steps: int = PROBE_STEPS,
) -> float | None:
    """EM's rate near ``params``, measured by plain EM steps from there (power iteration).

    Near a fixed point the steps ``d_j = ||x_(j+1) - x_j||`` of plain EM shrink
    by the Jacobian's eigenvalues, and their ratio ``d_j / d_(j-1)`` tends to
    the largest one (the rate of EM's slowest mode) as the faster modes die
    out. Steps are taken until two successive ratios agree within 5%, a step
    is round-off (relative to the vector), or ``max_steps``; the larger of
    the last two ratios is returned (the ratios approach the rate from
    below). ``em_map`` is one EM iteration on rows held in memory (e.g. a
    sample of the data, whose EM has the data's rate up to sampling error);
    it returns None when the step is not EM's own (a component emptied, an
    ill-defined M-step).

    Parameters
    ----------
    params : Params
        Where to measure: e.g. the initialisation's start, already
        converged on the sample.
    em_map : callable ``params -> params or None``
    to_vector : callable
        The parameterisation the norms are taken in (as SQUAREM's).
    scale : callable, optional
        Weights of the vector's coordinates at ``params`` (as SQUAREM's).
    max_steps : int

    Returns
    -------
    float or None
        The rate in ``[0, inf)`` (0 when the first steps already reach
        round-off: nothing is left to converge), or None when a step failed.
    """
    v_prev = np.asarray(to_vector(params), dtype=np.float64)
    w = scale(params) if scale is not None else None

    def norm(a: np.ndarray) -> float:
        return float(np.linalg.norm(a if w is None else w * a))

    floor = _PROBE_ROUNDOFF * max(norm(v_prev), np.finfo(np.float64).tiny)
    p, d_prev = params, math.nan
    ratios: list[float] = []
    for _ in range(max_steps):
        nxt = em_map(p)
        if nxt is None:
            return None
        p = nxt
        v = np.asarray(to_vector(p), dtype=np.float64)
        d = norm(v - v_prev)
        v_prev = v
        if not math.isfinite(d):
            return None
        if d <= floor:
            break  # round-off: the ratio would be noise
        if math.isfinite(d_prev):
            ratios.append(d / d_prev)
            if len(ratios) >= 2 and abs(ratios[-1] - ratios[-2]) <= _PROBE_AGREE * max(ratios[-2:]):
                break
        d_prev = d
    return max(ratios[-2:]) if ratios else 0.0


# --------------------------------------------------------------------------
# the state machine
# --------------------------------------------------------------------------


class EMAccelerator:
    """One EM run as a state machine of passes: plain EM or SQUAREM.

    Parameters
    ----------
    params : Params
        The initial parameters (the first pass is made at them).
    m_step : callable ``(stats, params) -> (new_params, perturbed)``
        The M-step from the statistics computed at ``params``. ``perturbed``
        is True when the map was not EM's own (components were re-seeded):
        the machine then starts a new cycle there without extrapolating, and
        an extrapolated point whose M-step is perturbed is rejected.
    objective : callable ``stats -> float``
        The mean log-likelihood per row of the parameters the statistics
        were computed at.
    to_vector, from_vector : callable, optional
        ``params -> 1-d float64 array`` and ``(vector, like) -> params or
        None`` (None: no valid model there). Required for SQUAREM.
    scale : callable, optional
        ``params -> positive weights of the vector's coordinates`` (or None):
        the metric of the step lengths and of EM's observed rate, taken at
        each cycle's ``x0`` (the Gaussian model's makes them independent of
        the data's units). Default: Euclidean.
    method : {None, "squarem"}
        None is plain EM.
    tol : float
        See the module docstring for its meaning in each mode.
    max_iter : int
        Passes at most (EM iterations, extrapolated ones included).
    step_min0, step_max0, mstep : float
        ``squarem1``'s step controls (defaults as there).
    stabilise : bool
        Whether an extrapolated point below ``L(x1)`` gets ``squarem1``'s
        stabilisation step (stage D) before it is judged.
    prior_rate : float, optional
        EM's rate measured near the start by other means (:func:`probe_rate`
        on a sample of the rows). Until there are three cycle starts for
        Aitken's estimate, the stopping rule then also stops when the
        remaining gain it bounds with the larger of it and the run's own
        observed rates (:func:`em_remaining`) is below the tolerance, not
        only when an EM step gains less than ``tol / 10,000``.
    surrogate_gain : callable ``(stats, params, new_params) -> float``, optional
        The gain per row of EM's surrogate from ``params`` (where ``stats``
        were computed) to ``new_params`` (their M-step), or NaN. With a
        ``prior_rate``, the run's first pass then bounds what is left after
        its EM step (:func:`surrogate_remaining`) and stops there when that
        is below the tolerance: a fast mixture from a start near its optimum
        takes one pass.

    Attributes
    ----------
    params : Params
        The result so far (the M-step image of the last accepted point).
    lower_bound : float
        The last accepted point's mean log-likelihood (after a stop at the
        run's first pass, EM's lower bound at the result ``x1``: ``L(x0)``
        plus the surrogate's gain).
    history : list of float
        The accepted log-likelihoods, in order.
    n_iter : int
        Passes received.
    converged, done : bool
    stage : str
        ``"A"``, ``"B"``, ``"C"`` or ``"D"`` (the next pass's point; always
        ``"A"`` in plain EM).
    n_extrapolations, n_rejected, n_perturbed : int
        Passes at extrapolated points, rejected extrapolations, M-steps that
        re-seeded.
    """

    def __init__(
        self,
        params: Params,
        *,
        m_step: Callable[[Stats, Params], tuple[Params, bool]],
        objective: Callable[[Stats], float],
        to_vector: Callable[[Params], np.ndarray] | None = None,
        from_vector: Callable[[np.ndarray, Params], Params | None] | None = None,
        scale: Callable[[Params], np.ndarray | None] | None = None,
        method: str | None = "squarem",
        tol: float = 1e-3,
        max_iter: int = 100,
        step_min0: float = 1.0,
        step_max0: float = 1.0,
        mstep: float = 4.0,
        stabilise: bool = True,
        prior_rate: float | None = None,
        surrogate_gain: Callable[[Stats, Params, Params], float] | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method is not None and (to_vector is None or from_vector is None):
            raise ValueError("SQUAREM needs to_vector and from_vector")
        if not (step_min0 >= 1.0 and step_max0 >= step_min0 and mstep > 1.0):
            raise ValueError("need 1 <= step_min0 <= step_max0 and mstep > 1")
        self.m_step = m_step
        self.objective = objective
        self.to_vector = to_vector
        self.from_vector = from_vector
        self.scale = scale
        self.method = method
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.step_min0 = float(step_min0)
        self.step_max0 = float(step_max0)
        self.mstep = float(mstep)
        self.stabilise = bool(stabilise)
        self.prior_rate = None if prior_rate is None else float(prior_rate)
        self.surrogate_gain = surrogate_gain
        # the step bounds (only step_max moves: step_min stays >= 1)
        self.step_min = self.step_min0
        self.step_max = self.step_max0
        # points of the current cycle
        self.points: dict[str, Params] = {"x0": params}
        self.stage = "A"  # "A": pass at x0, "B": at x1, "C": at the extrapolated xp, "D": at M(xp)
        self.alpha = math.nan  # the cycle's clamped step
        self.l0 = math.nan  # L(x0) and L(x1) of the current cycle
        self.l1 = math.nan
        self.rates: list[float] = []  # ||x2 - x1|| / ||x1 - x0|| of the last cycles
        #: the estimated remaining gain (:meth:`remaining`) at the last cycle's second pass;
        #: infinite until there is one, and after a perturbation
        self.estimate = math.inf
        # bookkeeping of the run
        self.n_iter = 0  # passes received
        self.history: list[float] = []  # accepted log-likelihoods, in order
        self.starts: list[float] = []  # L(x0) of the cycles since the last perturbation
        self.lower_bound = -math.inf
        self.converged = False
        self.done = self.max_iter <= 0
        self.n_extrapolations = 0  # passes at an extrapolated point
        self.n_rejected = 0
        self.n_perturbed = 0
        #: plain EM from here on (:meth:`_accept_em`)
        self.plain_tail = False
        self.n_drops = 0

    # -- what the fit loop calls ------------------------------------------

    @property
    def params(self) -> Params:
        """The run's result so far: the M-step image of the last accepted point."""
        return self.points.get("result", self.points["x0"])

    def proposal(self) -> Params | None:
        """The parameters whose statistics the next pass must compute; None when done."""
        if self.done:
            return None
        return self.points[{"A": "x0", "B": "x1", "C": "xp", "D": "xf"}[self.stage]]

    def receive(self, stats: Stats) -> None:
        """Take the statistics of the last :meth:`proposal` and advance.

        Raises
        ------
        FloatingPointError
            If the log-likelihood of an EM point (not an extrapolated one,
            which is just rejected) is not finite.
        RuntimeError
            If the run is done.
        """
        if self.done:
            raise RuntimeError("the run is done: it takes no more statistics")
        self.n_iter += 1
        ll = float(self.objective(stats))
        if self.method is None:
            self._receive_plain(stats, ll)
        elif self.plain_tail:
            self._receive_plain_tail(stats, ll)
        elif self.stage == "A":
            self._receive_a(stats, ll)
        elif self.stage == "B":
            self._receive_b(stats, ll)
        elif self.stage == "C":
            self._receive_c(stats, ll)
        else:
            self._receive_d(stats, ll)
        if not self.done and self.n_iter >= self.max_iter:
            self.done = True

    # -- plain EM ---------------------------------------------------------

    def _em_point(self, stats: Stats, params: Params, ll: float) -> tuple[Params, bool]:
        if not math.isfinite(ll):
            raise FloatingPointError(
                f"the log-likelihood became {ll} at iteration {self.n_iter}; increase reg_covar or scale the data"
            )
        new, perturbed = self.m_step(stats, params)
        self.n_perturbed += int(bool(perturbed))
        return new, bool(perturbed)

    def _receive_plain(self, stats: Stats, ll: float) -> None:
        prev = self.lower_bound
        new, _ = self._em_point(stats, self.points["x0"], ll)
        self._accept(ll, new)
        self.points = {"x0": new}
        if abs(ll - prev) < self.tol:
            self.converged = self.done = True

    def _receive_plain_tail(self, stats: Stats, ll: float) -> None:
        """Plain EM after SQUAREM met EM's own decrease (:meth:`_accept_em`).

        Stopped by plain EM's rule (the pass's change from the previous pass
        below ``tol``); a point below the best one is not recorded.
        """
        prev = self.l0
        new, _ = self._em_point(stats, self.points["x0"], ll)
        if ll >= self.lower_bound - _ROUNDOFF * max(1.0, abs(ll)):
            self._accept(ll, new)
        self.points["x0"] = new
        self.l0 = ll
        if abs(ll - prev) < self.tol:
            self.converged = self.done = True

    # -- SQUAREM ----------------------------------------------------------

    def _accept(self, ll: float, image: Params) -> None:
        """Record an accepted point's log-likelihood; its M-step image is the result."""
        self.history.append(ll)
        self.lower_bound = ll
        self.points["result"] = image

    def _accept_em(self, ll: float, image: Params) -> bool:
        """Record an EM point (SQUAREM); True when EM's own decrease restarted the cycle or ended SQUAREM.

        An EM step from an accepted point may still lower the log-likelihood:
        with ``reg_covar`` the M-step is not the exact maximiser, and near a
        component whose variance is that small the fixed point of the
        regularised map lies below points that the extrapolation reaches. Such
        a point is not recorded (the result stays the best point's image).
        When the decrease is below ``tol``, the run does not end there: that
        point may be on a slow climb that plain EM from the same start would
        have followed higher (seen on the adversarial data of
        ``tests/test_accelerated_fit.py``: 1e-5 per row below plain EM's end
        at ``tol=1e-8``). The first such decrease starts a new cycle at the EM
        image with the stopping rule's memory cleared; the second makes the
        rest plain EM (:meth:`_receive_plain_tail`). Before the run's first
        extrapolation its points are plain EM's own, and so is this decrease:
        plain EM from the same start stops here (its pass changed the
        log-likelihood by less than ``tol``), one pass lower, and so does the
        run, converged (a start at the sample's optimum, e.g. data no larger
        than the sample, whose EM step goes down by ``reg_covar``'s bias).
        """
        drop = self.lower_bound - ll
        if drop <= _ROUNDOFF * max(1.0, abs(ll)):
            self._accept(ll, image)
        if drop < self.tol and drop > _ROUNDOFF * max(1.0, abs(ll)):
            if self.n_extrapolations == 0:
                self.converged = self.done = True
                return True
            self.n_drops += 1
            self.points = {"x0": image, "result": self.points["result"]}
            self.stage = "A"
            self.l0 = ll
            if self.n_drops >= 2:
                self.plain_tail = True
            else:
                self.starts, self.rates, self.estimate = [], [], math.inf
                self.step_max = self.step_max0
            return True
        return False

    def _restart(self, x0: Params) -> None:
        """A new cycle at ``x0``."""
        self.points = {"x0": x0, "result": self.points["result"]}
        self.stage = "A"
        self.alpha = self.l0 = self.l1 = math.nan

    def _receive_a(self, stats: Stats, ll: float) -> None:
        before = self.lower_bound  # the last accepted point's: x0 is its EM image
        x0 = self.points["x0"]
        x1, perturbed = self._em_point(stats, x0, ll)
        if self._accept_em(ll, x1):
            return
        if not perturbed and before == -math.inf:
            # the run's first pass: no gain yet, but the surrogate's and the sample's rate bound
            # what is left after this EM step (:meth:`_first_remaining`)
            first, q_gain = self._first_remaining(stats, x0, x1, ll)
            if first < self.tol * REMAINING_FRACTION:
                # the result is x1, whose log-likelihood no pass measured: EM's lower bound
                # there, L(x0) + Q(x1 | x0) - Q(x0 | x0) (Jensen's inequality: exact, not
                # asymptotic), is the run's lower bound; the history keeps what passes measured
                self.lower_bound = ll + max(q_gain, 0.0)
                self.estimate = first
                self.converged = self.done = True
                return
        elif (
            not perturbed
            and len(self.starts) < 2
            and self._remaining(ll - before, False) < self.tol * REMAINING_FRACTION
        ):
            # too few cycles for Aitken's estimate, and the EM step to this cycle's start
            # gained next to nothing: the rule of a cycle's second pass (:meth:`remaining`),
            # one pass sooner
            self.converged = self.done = True
            return
        self._after_a(ll, x1, perturbed)

    def _after_a(self, ll: float, x1: Params, perturbed: bool) -> None:
        self.l0 = ll
        self.starts = [*self.starts[-2:], ll]
        if perturbed:
            self.starts, self.rates, self.estimate = [], [], math.inf
            self._restart(x1)
            return
        self.points["x1"] = x1
        self.stage = "B"

    def _receive_b(self, stats: Stats, ll: float) -> None:
        x2, perturbed = self._em_point(stats, self.points["x1"], ll)
        if self._accept_em(ll, x2):
            return
        self.l1 = ll
        if perturbed:
            self.starts, self.rates, self.estimate = [], [], math.inf
            self._restart(x2)
            return
        x0, x1 = self.points["x0"], self.points["x1"]
        v0, v1, v2 = self.to_vector(x0), self.to_vector(x1), self.to_vector(x2)
        r = v1 - v0
        q = v2 - v1
        v = q - r
        # the norms in the model's metric at x0 (e.g. independent of the data's units)
        w = self.scale(x0) if self.scale is not None else None
        sr, sq, sv = (float(np.linalg.norm(a if w is None else w * a)) for a in (r, q, v))
        self.rates = [*self.rates, sq / sr if sr > 0.0 else 0.0][-_RATE_WINDOW:]
        self.estimate = self.remaining()
        if self.estimate < self.tol * REMAINING_FRACTION:
            self.converged = self.done = True
            return
        # S3, clamped to the bounds; sv == 0 (an exactly linear map) asks for the largest step
        alpha = sr / sv if sv > 0.0 else math.inf
        alpha = max(self.step_min, min(self.step_max, alpha)) if math.isfinite(sr) else 1.0
        self.alpha = alpha
        if abs(alpha - 1.0) <= _UNIT_STEP:
            # no extrapolation: the plain two-step point, whose log-likelihood the next pass gives
            self._grow(alpha)
            self._restart(x2)
            return
        xp = self.from_vector(v0 + 2.0 * alpha * r + alpha * alpha * v, x0)
        self.points["x2"] = x2
        if xp is None:
            # no valid model there: reject without spending a pass
            self._reject()
            return
        self.points["xp"] = xp
        self.stage = "C"

    def _receive_c(self, stats: Stats, ll: float) -> None:
        self.n_extrapolations += 1
        alpha = self.alpha
        image, perturbed = None, True
        bar = max(self.l1, self.lower_bound)  # L(x1), or the best point if that was higher
        if math.isfinite(ll) and (ll >= bar or self.stabilise):
            image, perturbed = self.m_step(stats, self.points["xp"])
            self.n_perturbed += int(bool(perturbed))
        if perturbed:
            # not finite, or EM's map had to re-seed there
            self._reject()
        elif ll >= bar:
            # Accepted: L(x') >= L(x1), and the next cycle starts at M(x'), which has
            # L(M(x')) >= L(x') because an EM step never lowers the log-likelihood
            # (the E-step's lower bound is tight at x' and the M-step maximises it).
            self._accept(ll, image)
            self._grow(alpha)
            self._restart(image)
        else:
            # below L(x1): squarem1's stabilisation step decides. The next pass, at
            # M(x'), is the first of a cycle if L(M(x')) >= L(x1); the result stays x2
            # (with L(x1)) until then
            self.points["xf"] = image
            self.stage = "D"

    def _receive_d(self, stats: Stats, ll: float) -> None:
        xf = self.points["xf"]
        if not (math.isfinite(ll) and ll >= max(self.l1, self.lower_bound)):
            self._reject()
            return
        x1, perturbed = self._em_point(stats, xf, ll)
        if perturbed:
            # EM's map had to re-seed (or failed) at the stabilised point: not accepted
            self._reject()
            return
        self._grow(self.alpha)
        # accepted: the pass at M(x') was the first pass of the next cycle
        self._accept(ll, x1)
        self._restart(xf)
        self._after_a(ll, x1, perturbed)

    def _reject(self) -> None:
        """Back to the plain two-step point ``x2``: ``L(x2) >= L(x1)`` (EM), and the result stays ``x2``."""
        self.n_rejected += 1
        self._shrink(self.alpha)
        self._restart(self.points["x2"])

    def _grow(self, alpha: float) -> None:
        if alpha == self.step_max:
            self.step_max *= self.mstep

    def _shrink(self, alpha: float) -> None:
        if alpha == self.step_max:
            self.step_max = max(self.step_max0, self.step_max / self.mstep)

    # -- stopping (SQUAREM) -------------------------------------------------

    def remaining(self) -> float:
        """Estimated ``L_inf - L`` at the last accepted point (SQUAREM; see the module docstring)."""
        return self._remaining(self.l1 - self.l0, len(self.starts) == 3)

    def _first_remaining(self, stats: Stats, x0: Params, x1: Params, ll: float) -> tuple[float, float]:
        """What is left after the run's first EM step, ``x0 -> x1``, before any gain is known, and
        the surrogate's gain per row.

        With a ``prior_rate`` (EM's rate measured on the sample) and the
        model's ``surrogate_gain``: :func:`surrogate_remaining`. Without
        either, ``(inf, nan)`` (the run goes on). A start at the sample's optimum
        is within the sample's estimation error of the data's, where the
        quadratic model of :func:`surrogate_remaining` holds; the rate is
        the sample's (:func:`probe_rate`), as the second cycle's rule uses it.
        """
        if self.prior_rate is None or self.surrogate_gain is None:
            return math.inf, math.nan
        q_gain = float(self.surrogate_gain(stats, x0, x1))
        return surrogate_remaining(q_gain, self.prior_rate, _ROUNDOFF * max(1.0, abs(ll))), q_gain

    def _remaining(self, gain: float, aitken_ready: bool) -> float:
        """The estimate from an EM step's ``gain``, with Aitken's from the cycle starts when ready."""
        # the mean log-likelihood's round-off: changes below it say nothing
        floor = _ROUNDOFF * max(1.0, abs(self.lower_bound))
        if aitken_ready:
            cycles = aitken_remaining(self.starts, floor)
        else:
            # too few cycles for Aitken's estimate: a start near the optimum (the
            # candidates' EM on the sample) makes EM's first steps look converged
            # along its fast modes while a slow one is left; only a gain far below
            # the tolerance ends it (well above round-off, which the order of
            # summation decides)
            cycles = 0.0 if gain <= max(floor, self.tol * REMAINING_FRACTION * _EARLY_GAIN) else math.inf
            if self.prior_rate is not None:
                # or EM's rate measured where the run started (:func:`probe_rate` on the
                # sample), which sees the slow modes that this run's first steps cannot,
                # bounds what is left (:func:`em_remaining`, with the larger rate)
                cycles = min(cycles, em_remaining(gain, max([self.prior_rate, *self.rates]), floor))
        em = em_remaining(gain, max(self.rates), floor) if self.rates else math.inf
        return max(cycles, em)

    # -- checkpoints --------------------------------------------------------

    def state(
        self, params_state: Callable[[Params], tuple[dict[str, np.ndarray], dict]]
    ) -> tuple[dict[str, np.ndarray], dict]:
        """The machine's whole state: arrays and a JSON-able dict.

        Parameters
        ----------
        params_state : callable
            ``params -> (arrays, meta)`` (e.g. ``MixtureModel.params_state``).

        Returns
        -------
        arrays : dict of str to ndarray
            The held points' arrays, named ``"<point>_<name>"``.
        meta : dict
            Everything else (floats that are not finite are written as
            strings, so that the dict is strict JSON).
        """
        arrays: dict[str, np.ndarray] = {}
        points = {}
        for name, p in self.points.items():
            p_arrays, p_meta = params_state(p)
            for key, a in p_arrays.items():
                arrays[f"{name}_{key}"] = np.asarray(a)
            points[name] = {"meta": p_meta, "arrays": sorted(p_arrays)}
        meta = {
            "method": self.method,
            "tol": self.tol,
            "max_iter": self.max_iter,
            "step_min0": self.step_min0,
            "step_max0": self.step_max0,
            "mstep": self.mstep,
            "step_min": self.step_min,
            "step_max": self.step_max,
            "stage": self.stage,
            "alpha": _jfloat(self.alpha),
            "l0": _jfloat(self.l0),
            "l1": _jfloat(self.l1),
            "rates": [_jfloat(v) for v in self.rates],
            "estimate": _jfloat(self.estimate),
            "stabilise": self.stabilise,
            "prior_rate": None if self.prior_rate is None else _jfloat(self.prior_rate),
            "n_iter": self.n_iter,
            "history": [_jfloat(v) for v in self.history],
            "starts": [_jfloat(v) for v in self.starts],
            "lower_bound": _jfloat(self.lower_bound),
            "converged": self.converged,
            "done": self.done,
            "n_extrapolations": self.n_extrapolations,
            "n_rejected": self.n_rejected,
            "n_perturbed": self.n_perturbed,
            "plain_tail": self.plain_tail,
            "n_drops": self.n_drops,
            "points": points,
        }
        return arrays, meta

    @classmethod
    def from_state(
        cls,
        arrays: dict[str, np.ndarray],
        meta: dict,
        params_from_state: Callable[[dict[str, np.ndarray], dict], Params],
        *,
        m_step: Callable[[Stats, Params], tuple[Params, bool]],
        objective: Callable[[Stats], float],
        to_vector: Callable[[Params], np.ndarray] | None = None,
        from_vector: Callable[[np.ndarray, Params], Params | None] | None = None,
        scale: Callable[[Params], np.ndarray | None] | None = None,
        surrogate_gain: Callable[[Stats, Params, Params], float] | None = None,
    ) -> EMAccelerator:
        """Rebuild a machine from :meth:`state`'s output; it continues exactly where that one was."""
        points = {
            name: params_from_state({k: arrays[f"{name}_{k}"] for k in p["arrays"]}, p["meta"])
            for name, p in meta["points"].items()
        }
        self = cls(
            points["x0"],
            m_step=m_step,
            objective=objective,
            to_vector=to_vector,
            from_vector=from_vector,
            scale=scale,
            surrogate_gain=surrogate_gain,
            method=meta["method"],
            tol=meta["tol"],
            max_iter=meta["max_iter"],
            step_min0=meta["step_min0"],
            step_max0=meta["step_max0"],
            mstep=meta["mstep"],
            stabilise=meta["stabilise"],
            prior_rate=None if meta.get("prior_rate") is None else _pfloat(meta["prior_rate"]),
        )
        self.points = points
        self.step_min = float(meta["step_min"])
        self.step_max = float(meta["step_max"])
        self.stage = meta["stage"]
        self.alpha = _pfloat(meta["alpha"])
        self.l0 = _pfloat(meta["l0"])
        self.l1 = _pfloat(meta["l1"])
        self.rates = [_pfloat(v) for v in meta["rates"]]
        self.estimate = _pfloat(meta.get("estimate", math.inf))
        self.n_iter = int(meta["n_iter"])
        self.history = [_pfloat(v) for v in meta["history"]]
        self.starts = [_pfloat(v) for v in meta["starts"]]
        self.lower_bound = _pfloat(meta["lower_bound"])
        self.converged = bool(meta["converged"])
        self.done = bool(meta["done"])
        self.n_extrapolations = int(meta["n_extrapolations"])
        self.n_rejected = int(meta["n_rejected"])
        self.n_perturbed = int(meta["n_perturbed"])
        self.plain_tail = bool(meta.get("plain_tail", False))
        self.n_drops = int(meta.get("n_drops", 0))
        return self


def _jfloat(x: float) -> float | str:
    x = float(x)
    return x if math.isfinite(x) else repr(x)


def _pfloat(x: float | str) -> float:
    return float(x)


def drive(
    machines: Sequence[EMAccelerator], statistics: Callable[[list[Params]], list[Stats]], max_passes: int = 10**6
) -> int:
    """Run machines to the end, one shared pass at a time: the fit loop's contract in miniature.

    Parameters
    ----------
    machines : sequence of EMAccelerator
    statistics : callable
        ``list of params -> list of stats``: one pass over the data for
        every live run at once.
    max_passes : int
        A safety bound on the passes made here.

    Returns
    -------
    int
        The passes made.
    """
    passes = 0
    while passes < max_passes:
        live = [(m, p) for m in machines if (p := m.proposal()) is not None]
        if not live:
            break
        stats = statistics([p for _, p in live])
        passes += 1
        for (m, _), s in zip(live, stats):
            m.receive(s)
    return passes
