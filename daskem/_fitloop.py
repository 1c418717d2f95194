"""The fit loop: the one place where runs are initialised, iterated, checkpointed and chosen.

:func:`fit` fits every candidate (a K with its restarts) of one model
together: the data are persisted or streamed once
(:func:`daskem._engine.prepare_data`), every run is initialised through the
model's hook (which gets counted, shared passes, :class:`Passes`), then
:func:`iterate` advances every live run in the same passes until each one
converges or reaches ``max_iter``. :func:`best_run` picks the winner of a
candidate. It knows nothing of Gaussians nor of estimators: it talks to a
:class:`daskem._model.MixtureModel`, and the estimators
(:class:`daskem.base.BaseMixture`, :func:`daskem.select_k`) talk to it.

Runs are strategies. In each pass every live run *proposes* the parameter
sets it needs evaluated (:meth:`Run.proposal`) and then *receives* their
statistics (:meth:`Run.receive`). Plain EM proposes its current parameters
and takes one M-step; an accelerated run (SQUAREM) may propose another kind
of point from the same hooks (:meth:`~daskem._model.MixtureModel.to_vector`,
``from_vector``, ``m_step``) without any change here.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from . import _engine as engine
from . import _kmeans
from ._blas import single_threaded_blas
from ._durations import format_seconds
from ._model import MixtureModel
from ._numeric import logsumexp_rows
from ._outputs import atomic_write_text
from ._squarem import PROBE_STEPS, EMAccelerator, probe_rate
from .errors import ConvergenceWarning, InputError
from .io import atomic_savez

#: rows of the init sample (seeding, re-seeding of empty components) when the fit does not size it;
#: :func:`fit` asks for :func:`daskem._kmeans.sample_size` of the largest K and the data's D
SAMPLE_ROWS = 20_000

#: An accelerated restart stops, unconverged, when a finished, non-degenerate restart of the same
#: K (and covariance structure) is above it by more than this many times its own estimated
#: remaining gain, and by more than ``tol`` (:func:`update_dominated`): by the estimate that the
#: stopping rule trusts, it cannot catch up, and its passes would only set the fit's pass count.
DOMINANCE = 100.0


def seed_from(random_state: Any) -> int:
    """An integer seed from ``None``, an integer, a ``RandomState`` or a ``Generator``.

    ``None`` draws fresh entropy; a ``RandomState`` or a ``Generator`` is
    advanced, so that fitting twice with the same instance differs, as in
    scikit-learn.
    """
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**63 - 1))
    if random_state is None:
        return int(np.random.SeedSequence().entropy % (2**63))
    return int(random_state)


# --------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------


class RunsFailedError(ValueError):
    """Every run of a fit (or of a candidate) failed."""


@dataclass
class Step:
    """What a run needs to take a step: the model, the stopping rule and a re-seeding pool."""

    model: MixtureModel
    tol: float
    max_iter: int
    pool: Callable[[], np.ndarray]


@dataclass
class Run:
    """One EM run (a restart, for one K): plain EM, and the strategy interface.

    Attributes
    ----------
    params : the current parameters (after the last M-step)
    tag : dict
        ``k`` and ``init`` (restart index), or what the caller chose.
    history : list of float
        The objective at each E-step (``lower_bounds_``).
    lower_bound : float
        The last objective (of the parameters before the last M-step, as
        scikit-learn records it).
    """

    params: Any
    tag: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    done: bool = False
    lower_bound: float = -math.inf
    n_reseeds: int = 0
    #: the run failed (its covariance became ill-defined) and was dropped
    failed: bool = False
    #: why the fitted run is degenerate (``model.degenerate``), or ""
    degenerate: str = ""
    #: stopped far below a finished restart of its K (:func:`update_dominated`)
    dominated: bool = False

    def proposal(self) -> list:
        """The parameter sets this run needs the statistics of in the next pass."""
        return [self.params]

    def receive(self, stats: Sequence[Any], step: Step) -> None:
        """Take the statistics of :meth:`proposal`'s parameter sets and advance one iteration.

        Convergence follows scikit-learn: after the E-step of iteration ``t``
        the objective ``L_t`` (of the parameters before that M-step) is
        recorded; the run stops when ``|L_t - L_{t-1}| < tol``. The
        parameters kept are those after the last M-step.
        """
        (s,) = stats
        model = step.model
        if model.loglik(s)[1] == 0:
            raise InputError("no training rows to fit on")
        ll = model.objective(s)
        prev = self.lower_bound
        self.n_iter += 1
        self.history.append(ll)
        self.lower_bound = ll
        if not math.isfinite(ll):
            raise FloatingPointError(
                f"the log-likelihood became {ll} at iteration {self.n_iter}; increase reg_covar or scale the data"
            )
        new, empty = model.m_step(s, self.params)
        if empty.any():
            warnings.warn(
                f"{int(empty.sum())} component(s) of run {self.tag} received no rows at "
                f"iteration {self.n_iter} and were re-seeded on poorly explained rows",
                RuntimeWarning,
                stacklevel=4,
            )
            new = model.reseed(new, empty, step.pool())
            self.n_reseeds += 1
        self.params = new
        if abs(ll - prev) < step.tol:
            self.converged = True
            self.done = True
        elif self.n_iter >= step.max_iter:
            self.done = True

    def remaining_estimate(self) -> float:
        """The estimated gain of the objective still to come; plain EM makes none (``inf``)."""
        return math.inf

    def summary(self) -> dict:
        """JSON-able bookkeeping (``runs_`` of an estimator, checkpoints)."""
        return {
            "tag": self.tag,
            "history": list(self.history),
            "n_iter": self.n_iter,
            "converged": self.converged,
            "lower_bound": self.lower_bound,
            "n_reseeds": self.n_reseeds,
            "failed": self.failed,
            "degenerate": self.degenerate,
            "dominated": self.dominated,
        }

    def strategy_state(self, model: MixtureModel) -> tuple[dict[str, np.ndarray], dict]:
        """What a checkpoint must hold beyond the fields of :class:`Run` (plain EM: nothing)."""
        return {}, {}

    def restore_strategy(self, model: MixtureModel, arrays: Mapping[str, np.ndarray], meta: Mapping) -> None:
        """Inverse of :meth:`strategy_state` (called on a run built from the checkpoint's fields)."""


@dataclass
class AcceleratedRun(Run):
    """One run accelerated by SQUAREM: :class:`daskem._squarem.EMAccelerator` behind :class:`Run`'s interface.

    Each pass the machine proposes one parameter set (the cycle's current
    point: an EM point or an extrapolated one) and takes its statistics. The
    M-step is the model's, with the re-seeding of empty components (the
    machine treats a re-seeded M-step as no EM step: it restarts the cycle,
    or rejects the extrapolated point that needed it). Extrapolation happens
    in the model's :meth:`~daskem._model.MixtureModel.to_vector` space.

    The :class:`Run` fields follow the machine after every pass: ``params``
    is the M-step image of the last accepted point, ``history`` the accepted
    log-likelihoods (non-decreasing), ``lower_bound`` the last of them,
    ``n_iter`` the passes this run took (extrapolated ones included: what
    ``max_iter`` counts), ``n_reseeds`` the M-steps that re-seeded.
    ``converged`` means the estimated remaining gain fell below ``tol``
    (see :mod:`daskem._squarem`).
    """

    method: str = "squarem"
    machine: EMAccelerator | None = field(default=None, repr=False)

    def _machine(self) -> EMAccelerator:
        if self.machine is None:
            # tol, max_iter and the model's callables are bound at each receive (_bind)
            self.machine = EMAccelerator(
                self.params,
                m_step=_unbound,
                objective=_unbound,
                to_vector=_unbound,
                from_vector=_unbound,
                method=self.method,
                tol=0.0,
                max_iter=2**62,
            )
            self.machine.n_iter = self.n_iter
        return self.machine

    def _bind(self, step: Step) -> EMAccelerator:
        m = self._machine()
        model = step.model

        def m_step(stats: Any, params: Any) -> tuple[Any, bool]:
            if m.stage in ("C", "D"):
                # at an extrapolated point (or its image): an ill-defined M-step rejects the point, not the run
                try:
                    new, empty = model.m_step(stats, params)
                except RUN_FAILURES as exc:
                    if isinstance(exc, InputError):
                        raise
                    return params, True
            else:
                new, empty = model.m_step(stats, params)
            if not empty.any():
                return new, False
            if m.stage in ("C", "D"):
                # at an extrapolated point or its image: the machine rejects the point, the image is not used
                return new, True
            warnings.warn(
                f"{int(empty.sum())} component(s) of run {self.tag} received no rows at "
                f"iteration {m.n_iter} and were re-seeded on poorly explained rows",
                RuntimeWarning,
                stacklevel=6,
            )
            return model.reseed(new, empty, step.pool()), True

        m.m_step = m_step
        m.objective = model.objective
        m.to_vector = model.to_vector
        m.from_vector = model.from_vector
        m.scale = getattr(model, "vector_scale", None)
        m.surrogate_gain = getattr(model, "surrogate_gain", None)
        m.tol = float(step.tol)
        m.max_iter = int(step.max_iter)
        return m

    @property
    def prior_rate(self) -> float | None:
        """EM's rate measured on the fit's sample at the start (:func:`probe_rates`), for the stopping rule."""
        return self._machine().prior_rate

    def proposal(self) -> list:
        p = self._machine().proposal()
        return [] if p is None else [p]

    def remaining_estimate(self) -> float:
        """SQUAREM's estimate at the last cycle's second pass (:attr:`EMAccelerator.estimate`)."""
        return self._machine().estimate

    def receive(self, stats: Sequence[Any], step: Step) -> None:
        (s,) = stats
        if step.model.loglik(s)[1] == 0:
            raise InputError("no training rows to fit on")
        m = self._bind(step)
        try:
            m.receive(s)
        finally:
            # the bound callables hold the pass source (a persisted array, through the re-seeding pool)
            # in a reference cycle with the machine: unbind them, so that the data are released with the
            # fit, not at the next garbage collection
            m.m_step = m.objective = m.to_vector = m.from_vector = _unbound
            m.scale = m.surrogate_gain = None
        self._sync()

    def _sync(self) -> None:
        m = self._machine()
        self.params = m.params
        self.history = m.history
        self.n_iter = m.n_iter
        self.converged = m.converged
        self.done = m.done
        self.lower_bound = m.lower_bound
        self.n_reseeds = m.n_perturbed

    def summary(self) -> dict:
        out = super().summary()
        m = self._machine()
        out.update(
            accelerate=self.method,
            n_extrapolations=m.n_extrapolations,
            n_rejected=m.n_rejected,
            prior_rate=m.prior_rate,
            history=list(self.history),
        )
        return out

    def strategy_state(self, model: MixtureModel) -> tuple[dict[str, np.ndarray], dict]:
        return self._machine().state(model.params_state)

    def restore_strategy(self, model: MixtureModel, arrays: Mapping[str, np.ndarray], meta: Mapping) -> None:
        self.machine = EMAccelerator.from_state(
            dict(arrays),
            dict(meta),
            model.params_from_state,
            m_step=_unbound,
            objective=_unbound,
            to_vector=_unbound,
            from_vector=_unbound,
        )
        self.method = self.machine.method
        self._sync()


def _unbound(*args: Any) -> Any:
    raise RuntimeError("an accelerated run's model callables are bound at each pass")


#: ``accelerate`` -> run strategy (``Settings.run_class``)
STRATEGIES: dict[str | None, type[Run]] = {None: Run, "squarem": AcceleratedRun}


def run_strategy(accelerate: str | None) -> type[Run]:
    """The run strategy of an ``accelerate`` option: :class:`Run` (None) or :class:`AcceleratedRun`."""
    try:
        return STRATEGIES[accelerate]
    except (KeyError, TypeError):
        raise InputError(f"accelerate must be one of {list(STRATEGIES)}, got {accelerate!r}") from None


#: what a run raises when its parameters become ill-defined (the run is dropped; InputError is not caught)
RUN_FAILURES = (np.linalg.LinAlgError, FloatingPointError, ValueError)


@dataclass
class IterationInfo:
    """What a progress callback receives after each pass.

    ``iteration`` is the largest ``n_iter`` of the runs this pass advanced,
    ``n_passes`` the passes over the data made by the fit so far
    (initialisation included).
    """

    iteration: int
    runs: list
    seconds: float
    n_live: int
    advanced: list = field(default_factory=list)
    n_passes: int = 0


def best_run(runs: Sequence[Run], rtol: float = 1e-9) -> Run:
    """The run with the highest final objective, among the runs that did not fail.

    A degenerate run is never chosen over a non-degenerate one. Runs within
    ``rtol`` of the best count as equal and the first of them is kept, so that
    round-off (another chunking, another cluster) cannot flip the choice
    between restarts that found the same optimum.

    Raises
    ------
    RunsFailedError
        When every run failed.
    """
    ok = [r for r in runs if not r.failed]
    if not ok:
        raise RunsFailedError(f"every run failed ({', '.join(str(r.tag) for r in runs)})")
    runs = [r for r in ok if not r.degenerate] or ok
    top = max(r.lower_bound for r in runs)
    return next(r for r in runs if r.lower_bound >= top - rtol * max(1.0, abs(top)))


def warn_if_not_converged(run: Run, max_iter: int, stacklevel: int = 3) -> None:
    """scikit-learn's :class:`ConvergenceWarning` when the chosen run did not converge."""
    if max_iter > 0 and not run.converged:
        warnings.warn(
            "Best performing initialization did not converge. Try different init "
            "parameters, or increase max_iter, tol, or check for degenerate data.",
            ConvergenceWarning,
            stacklevel=stacklevel,
        )


# --------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------


class Checkpoint:
    """Atomic per-iteration state of every run, refused for other data or options."""

    def __init__(self, path: str | Path, fingerprint: dict, model: MixtureModel, run_class: type[Run] | None = None):
        self.path = Path(path)
        self.model = model
        self.run_class = run_class or Run
        self.fingerprint = fingerprint
        self.digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()

    def save(self, runs: Sequence[Run], stage: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        meta_runs = []
        for i, r in enumerate(runs):
            # a run whose initialisation failed has no parameters
            p_arrays, p_meta = ({}, None) if r.params is None else self.model.params_state(r.params)
            for name, a in p_arrays.items():
                arrays[f"run{i}_{name}"] = a
            s_arrays, s_meta = r.strategy_state(self.model)
            for name, a in s_arrays.items():
                arrays[f"run{i}_strategy_{name}"] = np.asarray(a)
            meta_runs.append(
                {
                    "params": p_meta,
                    "arrays": sorted(p_arrays),
                    "tag": r.tag,
                    "history": r.history,
                    "n_iter": r.n_iter,
                    "converged": r.converged,
                    "done": r.done,
                    "lower_bound": r.lower_bound if math.isfinite(r.lower_bound) else None,
                    "n_reseeds": r.n_reseeds,
                    "strategy": {"arrays": sorted(s_arrays), "meta": s_meta},
                    "failed": r.failed,
                    "dominated": r.dominated,
                }
            )
        # arrays first, then the JSON that names them: a reader sees the old
        # pair or the new pair, never a JSON pointing at missing arrays
        token = hashlib.sha256(repr(time.time_ns()).encode()).hexdigest()[:12]
        atomic_savez(self.path / f"state-{token}.npz", **arrays)
        doc = {
            "digest": self.digest,
            "fingerprint": self.fingerprint,
            "stage": stage,
            "run_class": self.run_class.__name__,
            "arrays": f"state-{token}.npz",
            "runs": meta_runs,
        }
        atomic_write_text(self.path / "checkpoint.json", json.dumps(doc, default=str))
        # the previous state, and any left by a process killed between the two writes
        for f in [*self.path.glob("state-*.npz"), *self.path.glob(".state-*.tmp-*")]:
            if f.name != doc["arrays"]:
                f.unlink(missing_ok=True)

    def load(self) -> tuple[str, list[Run]] | None:
        """The saved stage and runs, or None when there is no checkpoint yet."""
        f = self.path / "checkpoint.json"
        if not f.exists():
            return None
        doc = json.loads(f.read_text())
        if doc.get("digest") != self.digest:
            theirs = doc.get("fingerprint", {})
            diff = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
            raise InputError(
                f"the checkpoint at {self.path} was written for other data or options "
                f"(differs in: {', '.join(diff) or 'format'}); use another checkpoint path "
                "or delete it"
            )
        saved_class = doc.get("run_class", Run.__name__)
        if saved_class != self.run_class.__name__:
            raise InputError(
                f"the checkpoint at {self.path} was written by a {saved_class} fit, not a "
                f"{self.run_class.__name__} one (another accelerate option); use another checkpoint path or delete it"
            )
        runs = []
        with np.load(self.path / doc["arrays"], allow_pickle=False) as npz:
            for i, m in enumerate(doc["runs"]):
                arrays = {k: npz[f"run{i}_{k}"] for k in m["arrays"]}
                if m["params"] is None:  # its initialisation failed
                    runs.append(Run(None, tag=m["tag"], done=True, failed=True))
                    continue
                run = self.run_class(
                    params=self.model.params_from_state(arrays, m["params"]),
                    tag=m["tag"],
                    history=list(m["history"]),
                    n_iter=m["n_iter"],
                    converged=m["converged"],
                    done=m["done"],
                    lower_bound=-math.inf if m["lower_bound"] is None else m["lower_bound"],
                    n_reseeds=m.get("n_reseeds", 0),
                    failed=m.get("failed", False),
                    dominated=m.get("dominated", False),
                )
                strategy = m.get("strategy") or {"arrays": [], "meta": {}}
                if strategy["meta"] or strategy["arrays"]:
                    s_arrays = {k: npz[f"run{i}_strategy_{k}"] for k in strategy["arrays"]}
                    run.restore_strategy(self.model, s_arrays, strategy["meta"])
                # a dominated run is stopped by the fit loop, not by its strategy
                run.done = run.done or run.dominated
                runs.append(run)
        return doc["stage"], runs


# --------------------------------------------------------------------------
# passes over the data
# --------------------------------------------------------------------------


class Passes:
    """Counted passes over one (prepared) array: :class:`daskem._model.DataPasses`.

    Every pass of a fit goes through one instance, so that ``counter.n`` is
    the number of times the data were read. ``sample_rows`` rows are drawn
    by :meth:`sample` (fewer when rows are held out or the data are smaller).
    """

    def __init__(
        self,
        X: da.Array,
        model: MixtureModel,
        *,
        split: engine.RowSplit | None = None,
        split_every: int = engine.DEFAULT_SPLIT_EVERY,
        seed: int = 0,
        progress: bool = False,
        counter: engine.PassCounter | None = None,
        sample_rows: int = SAMPLE_ROWS,
    ) -> None:
        self.X = X
        self.model = model
        self.split = split
        self.split_every = split_every
        self.seed = seed
        self.progress = progress
        self.counter = counter if counter is not None else engine.PassCounter()
        self.sample_rows = int(sample_rows)
        self._sample: np.ndarray | None = None

    @property
    def n_passes(self) -> int:
        return self.counter.n

    def statistics(self, model: MixtureModel, params_list: Sequence[Any]) -> list:
        return engine.reduce_statistics(
            self.X,
            model,
            params_list,
            split=self.split,
            split_every=self.split_every,
            progress=self.progress,
            counter=self.counter,
        )

    def sample(self) -> np.ndarray:
        if self._sample is None:
            rows = engine.sample_rows(self.X, self.sample_rows, self.seed, split=self.split, counter=self.counter)
            self.model.check_rows(rows)
            self._sample = rows
        return self._sample

    def iterate(self, model: MixtureModel, params_list: Sequence[Any], *, tol: float, max_iter: int) -> list[Run]:
        runs = [Run(p, tag={"lloyd": i}) for i, p in enumerate(params_list)]
        return iterate(self, model, runs, tol=tol, max_iter=max_iter)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], *, holds_gil: bool = False) -> list[Any]:
        return engine.local_map(fn, items, name=self.X.name, holds_gil=holds_gil)


def iterate(
    passes: Passes,
    model: MixtureModel,
    runs: Sequence[Run],
    *,
    tol: float,
    max_iter: int,
    callback: Callable[[IterationInfo], None] | None = None,
    checkpoint: Checkpoint | None = None,
    stage: str = "em",
    rival: Callable[[Run], bool] | None = None,
    group: Callable[[Run], Any] | None = None,
) -> list[Run]:
    """Advance every run until it converges or reaches ``max_iter``, all in shared passes.

    In each pass, every live run proposes its parameter sets; one pass
    computes the statistics of all of them; each run receives its own. A run
    that is done drops out of the next pass, and so does a restart far below
    a finished restart of its candidate (``group``) that is a ``rival``
    (:func:`update_dominated`).
    """
    runs = list(runs)
    step = Step(model, tol, max_iter, passes.sample)
    while True:
        for r in runs:
            if not r.done and r.n_iter >= max_iter:
                r.done = True
        live = [r for r in runs if not r.done]
        if not live:
            break
        t0 = time.perf_counter()
        proposals = [r.proposal() for r in live]
        stats = passes.statistics(model, [p for props in proposals for p in props])
        pos = 0
        for r, props in zip(live, proposals):
            try:
                r.receive(stats[pos : pos + len(props)], step)
            except RUN_FAILURES as exc:
                if isinstance(exc, InputError) or all(o.failed or o is r for o in runs):
                    raise
                # an ill-defined covariance (collapsed component): drop this run, keep the others
                r.failed, r.done, r.lower_bound = True, True, -math.inf
                warnings.warn(
                    f"run {r.tag} failed at iteration {r.n_iter} and was dropped: {exc}", RuntimeWarning, stacklevel=3
                )
            pos += len(props)
        # before the checkpoint and the progress line, so that both see who stopped
        update_dominated(runs, tol, rival, group)
        if checkpoint is not None:
            checkpoint.save(runs, stage)
        if callback is not None:
            iteration = max(r.n_iter for r in live)
            seconds = time.perf_counter() - t0
            callback(IterationInfo(iteration, runs, seconds, len(live), live, n_passes=passes.n_passes))
    return runs


def _group(run: Run) -> str:
    """A run's candidate as its tag tells it: the tag without the restart index."""
    return json.dumps({k: v for k, v in run.tag.items() if k != "init"}, sort_keys=True, default=str)


def update_dominated(
    runs: Sequence[Run],
    tol: float,
    rival: Callable[[Run], bool] | None = None,
    group: Callable[[Run], Any] | None = None,
) -> None:
    """Stop the restarts that a finished restart of their candidate is far above.

    A live run is *dominated* when a run of the same candidate (``group``;
    by default the tag without the restart index: same K, and covariance
    structure when several are fitted) that has finished, did not
    fail and is a ``rival`` (the fit's: not degenerate) has an objective
    above the run's own by more than ``tol`` and by more than
    :data:`DOMINANCE` times the run's estimated remaining gain
    (:meth:`Run.remaining_estimate`: SQUAREM's, the estimate its stopping
    rule trusts; plain EM has none, so its restarts all run to their end, as
    scikit-learn's do). By that estimate it cannot overtake: it is marked
    ``dominated`` and ``done`` and takes no more passes. Only a finished run
    dominates, so the candidate's choice (:func:`best_run`) is never a
    stopped run: it is that run or a better one.
    """
    group = group or _group
    top: dict[Any, float] = {}
    for r in runs:
        if r.done and not (r.failed or r.dominated) and (rival is None or rival(r)):
            g = group(r)
            top[g] = max(top.get(g, -math.inf), r.lower_bound)
    for r in runs:
        if r.done or r.failed:
            continue
        estimate = r.remaining_estimate()
        if not math.isfinite(estimate):
            continue
        gap = top.get(group(r), -math.inf) - r.lower_bound
        if gap > max(tol, DOMINANCE * estimate):
            r.dominated = r.done = True


# --------------------------------------------------------------------------
# fitting candidates together
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One K to fit, with its restarts; ``options`` identify it in a checkpoint."""

    n_components: int
    n_init: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    """The loop's options (shared by every candidate of one fit).

    ``init`` is handed to the model's initialisation hook as it is;
    ``run_class`` is the run strategy of the fit's EM runs (:class:`Run`:
    plain EM; :class:`AcceleratedRun`: SQUAREM; :func:`run_strategy` maps
    an ``accelerate`` option to it). The initialisation's own runs (Lloyd's
    k-means, :meth:`Passes.iterate`) are always plain.
    """

    tol: float = 1e-3
    max_iter: int = 100
    random_state: Any = None
    checkpoint: str | Path | None = None
    cache: bool | str = "auto"
    dtype: str = "float64"
    order: str = "C"
    split_every: int = engine.DEFAULT_SPLIT_EVERY
    verbose: int = 0
    verbose_interval: int = 1
    init: Mapping[str, Any] = field(default_factory=dict)
    run_class: type[Run] = Run


@dataclass
class FitResult:
    """What :func:`fit` returns: every run (tagged ``k`` and ``init``) and the passes made."""

    runs: list[Run]
    n_passes: int
    seed: int

    def by_k(self) -> dict[int, list[Run]]:
        out: dict[int, list[Run]] = {}
        for r in self.runs:
            out.setdefault(int(r.tag["k"]), []).append(r)
        return out


#: the logger of the progress lines (a child of ``daskem``; :func:`say`)
logger = logging.getLogger("daskem.fit")

#: callbacks that receive every fit's progress snapshot in this context (:func:`observe_progress`)
_observers: contextvars.ContextVar[tuple[Callable[[dict], None], ...]] = contextvars.ContextVar(
    "daskem_progress_observers", default=()
)


@contextlib.contextmanager
def observe_progress(callback: Callable[[dict], None]) -> Iterator[None]:
    """Call ``callback(snapshot)`` after every pass of the fits run in this block (and context).

    ``snapshot`` is :attr:`Progress.snapshot`, a JSON-able dict; it is sent
    whatever ``verbose`` says (a batch job records it in ``progress.json``).
    An ``OSError`` from the callback is warned about once, not raised.
    """
    token = _observers.set((*_observers.get(), callback))
    try:
        yield
    finally:
        _observers.reset(token)


#: lists that receive every fit's initialisation sample in this context (:func:`keep_sample`)
_kept_samples: contextvars.ContextVar[tuple[list, ...]] = contextvars.ContextVar("daskem_kept_samples", default=())


@contextlib.contextmanager
def keep_sample() -> Iterator[list]:
    """Collect the training rows each fit run in this block drew for its initialisation.

    Yields a list; every fit (:func:`fit`) that drew a sample appends it (the
    rows :meth:`Passes.sample` read, held-out rows excluded). A report built
    after the fit can use them instead of reading the data once more.
    """
    kept: list = []
    token = _kept_samples.set((*_kept_samples.get(), kept))
    try:
        yield kept
    finally:
        _kept_samples.reset(token)


def say(message: str, snapshot: dict | None = None) -> None:
    """One progress line: to the ``daskem.fit`` logger at INFO, and to stderr when logging would not show it.

    Logging shows it when the logger is enabled for INFO and a handler is
    configured (``logging.basicConfig(level=logging.INFO)``, or a handler on
    ``daskem``); otherwise (logging left unconfigured, as in a notebook) the
    line is printed to stderr, as scikit-learn's ``verbose`` does. The
    record carries the snapshot as ``record.daskem_progress``.
    """
    logger.info(message, extra={"daskem_progress": snapshot})
    if not (logger.isEnabledFor(logging.INFO) and logger.hasHandlers()):
        print(message, file=sys.stderr, flush=True)


def run_name(run: Run) -> str:
    """A run as a person names it: ``k=8 init=3``."""
    return " ".join(f"{k}={v}" for k, v in run.tag.items())


def passes_to_tol(run: Run, tol: float) -> int | None:
    """Passes this run needs until its change falls below ``tol``, at its current rate, or None.

    Plain EM converges linearly near an optimum: successive changes shrink
    by a steady ratio ``r``. An estimate is given only when the last four
    changes are positive and their three ratios are below 1 and within 0.05
    of each other; otherwise (early passes, a run still finding its way, an
    accelerated run, whose passes are not EM steps) there is no honest one.
    """
    h = run.history
    if isinstance(run, AcceleratedRun) or len(h) < 5 or tol <= 0:
        return None
    d = [b - a for a, b in zip(h[-5:-1], h[-4:])]
    if min(d) <= 0:
        return None
    ratios = [b / a for a, b in zip(d[:-1], d[1:])]
    if max(ratios) >= 1 or max(ratios) - min(ratios) > 0.05:
        return None
    if d[-1] < tol:
        return 1
    return max(1, math.ceil(math.log(tol / d[-1]) / math.log(ratios[-1])))


def _ending(run: Run) -> str:
    """How a run that is done ended, in words."""
    if run.failed:
        return "failed"
    if run.converged:
        return "converged"
    if run.dominated:
        return "stopped far below another restart"
    return "reached max_iter"


class Progress:
    """What a person reads after each pass, and the snapshot an observer receives.

    The lines follow one named run (``k=8 init=3``): the leading run when it
    is first chosen, kept until it stops (converges, reaches ``max_iter`` or
    fails), so its log-likelihood never drops while its change is positive;
    then the leading run still iterating. Each line gives the run's
    iteration out of ``max_iter``, its log-likelihood and change, the
    seconds per pass (the mean of the last ten), an upper bound on the time
    left (every live run going on to ``max_iter``), an estimate at the
    current convergence rate when every live run has one
    (:func:`passes_to_tol`), and the runs still running out of all.
    """

    def __init__(
        self,
        max_iter: int,
        tol: float,
        verbose: int = 0,
        interval: int = 1,
        observers: Sequence[Callable[[dict], None]] = (),
    ) -> None:
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.verbose = int(verbose)
        self.interval = max(1, int(interval))
        self.observers = list(observers)
        self.followed: Run | None = None
        self.snapshot: dict = {}
        self._t0 = self._t_last = time.perf_counter()
        self._pass_seconds: deque[float] = deque(maxlen=10)

    def _choose(self, info: IterationInfo) -> Run | None:
        f = self.followed
        if f is not None and any(f is r for r in info.advanced):
            return f
        candidates = [r for r in info.advanced if r.history] or [r for r in info.runs if r.history and not r.failed]
        self.followed = max(candidates, key=lambda r: r.history[-1], default=None)
        return self.followed

    def __call__(self, info: IterationInfo) -> None:
        now = time.perf_counter()
        self._pass_seconds.append(now - self._t_last)
        self._t_last = now
        run = self._choose(info)
        if run is None:
            return
        live = [r for r in info.runs if not r.done]
        per_pass = sum(self._pass_seconds) / len(self._pass_seconds)
        passes_left = max(0, self.max_iter - min(r.n_iter for r in live)) if live else 0
        estimates = [passes_to_tol(r, self.tol) for r in live]
        to_tol = None
        if live and all(e is not None for e in estimates):
            to_tol = min(max(e for e in estimates if e is not None), passes_left)
        ll = run.history[-1]
        delta = ll - run.history[-2] if len(run.history) > 1 else None
        self.snapshot = {
            "iteration": run.n_iter,
            "max_iter": self.max_iter,
            "run": run_name(run),
            "loglik": ll,
            "delta": delta,
            "n_running": len(live),
            "n_runs": len(info.runs),
            "n_passes": info.n_passes,
            "seconds_per_pass": per_pass,
            "eta_seconds": passes_left * per_pass,
            "eta_converge_seconds": None if to_tol is None else to_tol * per_pass,
            "elapsed_seconds": now - self._t0,
            "finished": False,
        }
        self._notify()
        if not self.verbose:
            return
        # every verbose_interval, the first, and the last of the followed run
        if info.iteration % self.interval and info.iteration != 1 and not run.done:
            return
        say(self.line(), self.snapshot)
        if run.done and live:
            say(
                f"run {run_name(run)} {_ending(run)} at iteration {run.n_iter}; following the leading run still running"
            )

    def line(self) -> str:
        """The progress line of the last snapshot."""
        s = self.snapshot
        width = len(str(self.max_iter))
        delta = "         -" if s["delta"] is None else f"{s['delta']:+.3e}"
        if s["n_running"] == 0:
            eta = "done"
        else:
            eta = f"ETA <= {format_seconds(s['eta_seconds'])} (max_iter)"
            if s["eta_converge_seconds"] is not None and s["eta_converge_seconds"] < s["eta_seconds"]:
                eta += f", ~{format_seconds(s['eta_converge_seconds'])} (at the current rate)"
        return (
            f"iteration {s['iteration']:>{width}}/{s['max_iter']}  run {s['run']}  loglik {s['loglik']: .6f}  "
            f"delta {delta}  {format_seconds(s['seconds_per_pass'])}/pass  {eta}  "
            f"running {s['n_running']}/{s['n_runs']}  passes {s['n_passes']}"
        )

    def finish(self, runs: Sequence[Run], n_passes: int) -> None:
        """The closing line (verbose) and the last snapshot (``finished``: True)."""
        elapsed = time.perf_counter() - self._t0
        n_conv = sum(r.converged for r in runs)
        n_failed = sum(r.failed for r in runs)
        n_dominated = sum(r.dominated for r in runs)
        n_max = len(runs) - n_conv - n_failed - n_dominated
        # the leading run: the one kept (for one K), whichever run the lines followed
        ok = [r for r in runs if r.history and not r.failed]
        best = best_run(ok) if ok else None  # the estimator's rule: ties within round-off keep the first
        if best is not None:
            self.snapshot.update(
                iteration=best.n_iter,
                run=run_name(best),
                loglik=best.history[-1],
                delta=best.history[-1] - best.history[-2] if len(best.history) > 1 else None,
            )
        self.snapshot.update(
            max_iter=self.max_iter,
            n_running=0,
            n_runs=len(runs),
            n_passes=n_passes,
            eta_seconds=0.0,
            eta_converge_seconds=None,
            elapsed_seconds=elapsed,
            finished=True,
        )
        self.snapshot.setdefault("seconds_per_pass", None)
        self._notify()
        if self.verbose:
            parts = [f"{n_conv} of {len(runs)} run(s) converged"]
            if n_max:
                parts.append(f"{n_max} reached max_iter ({self.max_iter})")
            if n_dominated:
                parts.append(f"{n_dominated} stopped far below another restart of their K")
            if n_failed:
                parts.append(f"{n_failed} failed")
            if n_passes:
                parts.append(f"{n_passes:,} passes over the data")
            if best is not None:
                parts.append(f"leading run {run_name(best)}: loglik {best.history[-1]:.6f}")
            say(f"EM finished in {format_seconds(elapsed)}: {', '.join(parts)}", self.snapshot)

    def _notify(self) -> None:
        for cb in list(self.observers):
            try:
                cb(dict(self.snapshot))
            except OSError as exc:
                self.observers.remove(cb)
                warnings.warn(f"progress not recorded: {exc}", RuntimeWarning, stacklevel=2)


def fit(
    X: da.Array,
    model: MixtureModel,
    candidates: Sequence[Candidate],
    settings: Settings,
    *,
    in_memory: bool = False,
    split: engine.RowSplit | None = None,
    start: tuple[Any, float] | None = None,
) -> FitResult:
    """Initialise and run EM for every candidate together.

    Every restart of every K advances in the same passes over ``X``,
    initialisation included.

    Parameters
    ----------
    X : dask array
    model : MixtureModel
    candidates : sequence of Candidate
    settings : Settings
    in_memory : bool
        ``X`` wraps data already in this process's memory (numpy input).
    split : RowSplit, optional
        Rows held out of training (validation).
    start : (params, lower_bound), optional
        Warm start: one run from these parameters, no initialisation.
    """
    # the client's small products (M-steps, Cholesky factors) with one BLAS
    # thread: a multi-threaded BLAS spins on them (iris: 250 ms a fit on a busy
    # 2-core machine against 31 ms), and in-process passes use the cores already
    with single_threaded_blas(), contextlib.ExitStack() as scope:
        return _fit(X, model, candidates, settings, in_memory=in_memory, split=split, start=start, scope=scope)


def _fit(
    X: da.Array,
    model: MixtureModel,
    candidates: Sequence[Candidate],
    settings: Settings,
    *,
    in_memory: bool,
    split: engine.RowSplit | None,
    start: tuple[Any, float] | None,
    scope: contextlib.ExitStack,
) -> FitResult:
    seed = seed_from(settings.random_state)
    counter = engine.PassCounter()
    checkpoint = None
    if settings.checkpoint:
        fingerprint = {
            **engine.data_fingerprint(X),
            "specs": [[c.n_components, dict(c.options)] for c in candidates],
            "split": None if split is None else [split.fraction, split.seed],
        }
        if settings.random_state is not None:
            fingerprint["seed"] = seed
        checkpoint = Checkpoint(settings.checkpoint, fingerprint, model, settings.run_class)

    Xw, _ = engine.prepare_data(X, settings.cache, in_memory=in_memory, dtype=settings.dtype, order=settings.order)
    # in-process data: the fit's passes in worker processes that share its memory
    scope.enter_context(engine.local_workers(Xw))
    verbose = settings.verbose
    passes = Passes(
        Xw,
        model,
        split=split,
        split_every=settings.split_every,
        seed=seed,
        progress=verbose >= 1 and sys.stderr.isatty(),
        counter=counter,
        # one sample serves the seeding of every run: sized for the largest K
        sample_rows=_kmeans.sample_size(max((c.n_components for c in candidates), default=1), X.shape[1]),
    )
    resumed = checkpoint.load() if checkpoint is not None else None
    if resumed is not None:
        _, runs = resumed
        if verbose:
            done = max((r.n_iter for r in runs), default=0)
            say(f"resuming from checkpoint {checkpoint.path} at iteration {done}")
    elif start is not None:
        params, lower_bound = start
        runs = [settings.run_class(params, tag={"k": model.n_components(params), "init": 0}, lower_bound=lower_bound)]
    else:
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        # every restart of every K: their initialisation passes are shared too
        components = [c.n_components for c in candidates for _ in range(c.n_init)]
        params_list = initialize(passes, model, components, rng, {"tol": settings.tol, **settings.init})
        types = tuple(getattr(model, "run_types", ()) or ())
        runs = []
        for i, (k, p) in enumerate(zip(components, params_list)):
            # tagged by covariance structure too when several are fitted together
            tag: dict[str, Any] = {"covariance_type": types[i], "k": k} if types else {"k": k}
            tag["init"] = sum({**r.tag, "init": None} == {**tag, "init": None} for r in runs)
            runs.append(settings.run_class(p, tag=tag) if p is not None else Run(None, tag=tag, done=True, failed=True))
        probe_rates(passes, model, runs)
        if verbose:
            say(f"initialised {len(runs)} run(s) in {format_seconds(time.perf_counter() - t0)}")
        if checkpoint is not None:
            checkpoint.save(runs, "em")
    observers = _observers.get()
    progress = None
    if verbose or observers:
        progress = Progress(settings.max_iter, settings.tol, verbose, settings.verbose_interval, observers)
    n_rows = float(X.shape[0]) * (1.0 - (split.fraction if split is not None else 0.0))
    rivals: dict[int, bool] = {}

    def rival(run: Run) -> bool:
        # a finished run's parameters are final: whether it is degenerate is asked once
        if id(run) not in rivals:
            rivals[id(run)] = not (hasattr(model, "degenerate") and model.degenerate(run.params, n_rows))
        return rivals[id(run)]

    # the runs are in candidate order, each candidate's restarts together (also from a checkpoint):
    # the restarts of one candidate compete, and two candidates of the same K and structure
    # (``fit_models`` given both) do not
    owner = [i for i, c in enumerate(candidates) for _ in range(c.n_init)]
    candidate_of = {id(r): i for r, i in zip(runs, owner)} if len(owner) == len(runs) else {}

    def group(run: Run) -> Any:
        return candidate_of.get(id(run), _group(run))

    runs = iterate(
        passes,
        model,
        runs,
        tol=settings.tol,
        max_iter=settings.max_iter,
        callback=progress,
        checkpoint=checkpoint,
        rival=rival,
        group=group,
    )
    if progress is not None:
        progress.finish(runs, counter.n)
    if hasattr(model, "degenerate"):
        for r in runs:
            r.degenerate = "" if r.failed else model.degenerate(r.params, n_rows)
        bad = [r for r in runs if r.degenerate]
        if bad:
            warnings.warn(
                f"{len(bad)} of {len(runs)} run(s) ended degenerate and are chosen only if nothing else is left: "
                + "; ".join(f"run {r.tag}: {r.degenerate}" for r in bad[:5]),
                RuntimeWarning,
                stacklevel=3,
            )
    if passes._sample is not None:
        for kept in _kept_samples.get():
            kept.append(passes._sample)
    return FitResult(runs, counter.n, seed)


#: Sample rows :func:`probe_rates` measures EM's rate on, at most (a fixed random subset of the fit's sample).
PROBE_ROWS = 10_000
#: Fewer rows than this within :data:`PROBE_WORK`: no probe.
PROBE_MIN_ROWS = 2_000
#: The probes of all runs together, at most, in rows x statistics values x steps (the packed statistics'
#: length stands for a row's work: K (D^2 + D + 1) for full covariances, K (2D + 1) for diagonal ones).
PROBE_WORK = 4 * 10**9


def probe_rates(passes: Passes, model: MixtureModel, runs: Sequence[Run]) -> None:
    """EM's rate at each accelerated run's start, on the fit's sample (no pass over the data).

    :func:`daskem._squarem.probe_rate`: plain EM steps from the start on at
    most :data:`PROBE_ROWS` rows of the sample the initialisation drew (only
    when it drew one: no pass is spent on this), in memory, the runs side by
    side on the fit's local workers. Each rate becomes the run's
    ``prior_rate``, which lets SQUAREM's stopping rule stop after its first
    cycle when the remaining gain it bounds is below the tolerance (a start
    already converged on the sample and a fast-converging mixture) instead of
    after the three cycles Aitken's estimate needs. Cost: at most
    :data:`daskem._squarem.PROBE_STEPS` EM iterations on those rows per run,
    and :data:`PROBE_WORK` for all runs together (fewer rows when it would be
    more; none below :data:`PROBE_MIN_ROWS`). Not made when the sample holds
    every row (data no larger than the sample).
    """
    todo = [r for r in runs if isinstance(r, AcceleratedRun) and not r.done and r.params is not None]
    if not todo or passes._sample is None or passes._sample.shape[0] >= passes.X.shape[0]:
        # no sample, or the sample is every row: EM on it is the fit's own, whose first steps
        # tell as much (iris: the probe cost 40% of the fit and saved nothing)
        return
    rows = passes._sample
    width = sum(model.packed_size(r.params) for r in todo)
    n = min(rows.shape[0], PROBE_ROWS, PROBE_WORK // max(PROBE_STEPS * width, 1))
    if n < min(PROBE_MIN_ROWS, rows.shape[0]):
        return  # too heavy a model for its sample's rows: the rule without a prior
    rows = _kmeans.subsample(rows, n)
    # at small D the kernel is element-wise numpy that holds the GIL: side by side only on processes
    rates = passes.map(
        functools.partial(_probe_one, rows, model), [r.params for r in todo], holds_gil=rows.shape[1] < 32
    )
    for r, rate in zip(todo, rates):
        r._machine().prior_rate = rate


def _probe_one(rows: np.ndarray, model: MixtureModel, params: Any) -> float | None:
    def em_map(p: Any) -> Any:
        (s,) = model.statistics(rows, [model.pass_params(p)], None)
        try:
            new, empty = model.m_step(s, p)
        except RUN_FAILURES:
            return None
        return None if np.any(empty) else new

    # (BLAS is single-threaded in every item of ``Passes.map``)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return probe_rate(params, em_map, model.to_vector, getattr(model, "vector_scale", None))


def initialize(
    passes: Passes, model: MixtureModel, components: Sequence[int], rng: np.random.Generator, options: Mapping
) -> list[Any | None]:
    """Initial parameters of every run, in the order of ``components``; None for a run that cannot start.

    Every run is initialised together, in shared passes. When that fails
    with an ill-defined covariance (a singular start), every K is
    initialised on its own, then, when the model fits several covariance
    structures together (``run_types``), every structure of a K that still
    fails: a run that cannot start fails alone (with a warning) and the others
    go on, from the same starts as together (the streams are keyed by K and
    restart). When every run fails the first error is raised.
    """
    start = copy.deepcopy(rng)
    try:
        return list(model.initialize(passes, components, rng, options))
    except RUN_FAILURES as exc:
        if isinstance(exc, InputError):
            raise
        error = exc
    types = tuple(getattr(model, "run_types", ()) or ())
    out: list[Any | None] = [None] * len(components)
    failed: list[tuple[list[int], BaseException]] = []

    def attempt(idx: list[int]) -> BaseException | None:
        sub = model
        if types:
            sub = dataclasses.replace(model, run_types=tuple(types[i] for i in idx))  # type: ignore[type-var]
        try:
            params = sub.initialize(passes, [components[i] for i in idx], copy.deepcopy(start), options)
        except RUN_FAILURES as exc:
            if isinstance(exc, InputError):
                raise
            return exc
        for i, p in zip(idx, params):
            out[i] = p
        return None

    for k in dict.fromkeys(components):
        idx = [i for i, c in enumerate(components) if c == k]
        exc = attempt(idx)
        if exc is None:
            continue
        if not types or len({types[i] for i in idx}) == 1:
            failed.append((idx, exc))
            continue
        for t in dict.fromkeys(types[i] for i in idx):
            sub_idx = [i for i in idx if types[i] == t]
            exc = attempt(sub_idx)
            if exc is not None:
                failed.append((sub_idx, exc))
    if all(p is None for p in out):
        raise error
    for idx, exc in failed:
        what = f"covariance_type={types[idx[0]]!r}, k={components[idx[0]]}" if types else f"k={components[idx[0]]}"
        warnings.warn(
            f"the initialisation of {what} failed and its {len(idx)} run(s) were dropped: {exc}",
            RuntimeWarning,
            stacklevel=4,
        )
    return out


@dataclass(frozen=True)
class PairedHeldout:
    """A scoring model that also sums, over the held-out rows, the products of every two
    parameter sets' per-row log-likelihoods: what the standard error of the difference
    between two sets' held-out means needs (the rows are the same, so the difference is
    paired and its noise far below either mean's).

    It wraps any :class:`~daskem._model.MixtureModel` through its seam (``statistics``,
    ``log_prob``, ``pack``): ``cross`` of set ``i`` is ``(rows, sum_r d_ri, sum_r d_ri d_rj
    for every j)`` with ``d_ri = log p_i(x_r) - log p_0(x_r)``, centred on the first set so
    that the sums stay small. ``n_sets`` is the number of parameter sets of the pass.
    """

    inner: Any
    n_sets: int

    def statistics(
        self, x: np.ndarray, params_list: Sequence[Any], train_mask: np.ndarray | None
    ) -> list[tuple[Any, np.ndarray]]:
        stats = self.inner.statistics(x, params_list, train_mask)
        m = len(params_list)
        cross = np.zeros((m, m + 2))
        if train_mask is not None and not train_mask.all():
            held = x[~train_mask]
            held = held[~np.isnan(held).all(axis=1)]  # a row with no value: no model scores it
            logp = np.column_stack([logsumexp_rows(self.inner.log_prob(held, p)) for p in params_list])
            logp = logp[np.isfinite(logp).all(axis=1)]  # the rows the model scores (as its held-out sums)
            d = logp - logp[:, :1]
            cross[:, 0] = d.shape[0]
            cross[:, 1] = d.sum(axis=0)
            cross[:, 2:] = d.T @ d
        return list(zip(stats, cross))

    def pass_params(self, params: Any) -> Any:
        return self.inner.pass_params(params)

    def packed_size(self, params: Any) -> int:
        return self.inner.packed_size(params) + self.n_sets + 2

    def pack(self, stats: tuple[Any, np.ndarray]) -> np.ndarray:
        return np.concatenate([self.inner.pack(stats[0]), stats[1]])

    def unpack(self, vec: np.ndarray, params: Any) -> tuple[Any, np.ndarray]:
        cut = vec.shape[0] - self.n_sets - 2
        return self.inner.unpack(vec[:cut], params), vec[cut:]

    def check_statistics(self, stats: tuple[Any, np.ndarray]) -> None:
        self.inner.check_statistics(stats[0])

    def params_state(self, params: Any) -> tuple[dict[str, np.ndarray], dict]:
        return self.inner.params_state(params)


def paired_se(cross: Sequence[np.ndarray], i: int, j: int) -> float:
    """Standard error of the difference between the held-out mean log-likelihoods of
    parameter sets ``i`` and ``j``, from :class:`PairedHeldout`'s sums (NaN without
    held-out rows)."""
    n = float(cross[i][0])
    if n < 2:
        return math.nan
    mean = (cross[i][1] - cross[j][1]) / n
    sq = cross[i][2 + i] - 2.0 * cross[i][2 + j] + cross[j][2 + j]
    var = max(sq / n - mean * mean, 0.0) * n / (n - 1.0)
    return math.sqrt(var / n)


def score(
    X: da.Array,
    model: MixtureModel,
    params_list: Sequence[Any],
    *,
    split: engine.RowSplit | None = None,
    split_every: int = engine.DEFAULT_SPLIT_EVERY,
    counter: engine.PassCounter | None = None,
) -> list[dict[str, Any]]:
    """One pass scoring fitted parameters: training and held-out ``(sum log p, rows)`` of each.

    With held-out rows (``split``), each result also has ``heldout_se``: the list, over
    every parameter set ``j``, of the standard error of this set's held-out mean
    log-likelihood minus set ``j``'s (paired over the same rows, :class:`PairedHeldout`).
    """
    scorer = model.scoring_model()
    paired = split is not None and len(params_list) > 1
    pass_model = PairedHeldout(scorer, len(params_list)) if paired else scorer
    stats = engine.reduce_statistics(X, pass_model, params_list, split=split, split_every=split_every, counter=counter)
    cross = [c for _, c in stats] if paired else None
    out = []
    for i, s in enumerate(stats):
        if paired:
            s = s[0]
        total, n = scorer.loglik(s)
        ho_total, ho_n = scorer.heldout_loglik(s)
        out.append({"loglik": float(total), "n": float(n), "heldout_loglik": float(ho_total), "heldout_n": float(ho_n)})
        if cross is not None:
            out[-1]["heldout_se"] = [paired_se(cross, i, j) for j in range(len(stats))]
        if hasattr(scorer, "log_map"):  # ICL's term (sum of log max responsibility), when the model has one
            out[-1]["log_map"] = float(scorer.log_map(s))
    return out
