"""The seam between the fit loop and a mixture model: two protocols, no code.

:class:`MixtureModel` is everything the fit loop (:mod:`daskem._fitloop`),
the engine (:mod:`daskem._engine`) and the base estimator
(:mod:`daskem.base`) ask of a model. A model is a small, immutable, picklable
object holding its options (regularisation, soft or hard EM, compute dtype,
the NaN policy); it is shipped to the workers with every pass. It is
generic over two types it defines itself:

* ``Params`` -- the parameters of one mixture (one restart, one K); any
  immutable value.
* ``Stats`` -- the statistics of a set of rows for one ``Params``: summed
  over chunks, so the model must pack them into a flat float64 vector whose
  elementwise sum is the statistics of the union of the rows.

One EM iteration is: the engine calls :meth:`MixtureModel.statistics` on
every chunk (on a worker, pure numpy) for every parameter set proposed in
this pass, packs the results with :meth:`~MixtureModel.pack`, tree-sums the
vectors and unpacks them on the client; the fit loop then records
:meth:`~MixtureModel.objective`, calls :meth:`~MixtureModel.m_step` and
re-seeds empty components with :meth:`~MixtureModel.reseed`.

Worker side (must not touch Dask, files or global state):
    ``statistics``, ``pack``, ``log_prob``.
Client side:
    everything else.

:class:`DataPasses` is what the fit loop offers to a model's initialisation
hook: counted passes over the (training) rows, a sample of them, and the EM
loop itself (k-means initialisation is hard EM with a shared spherical
covariance), so that a model can initialise out-of-core without importing
the engine.

Optional: a ``chunk_order`` attribute (``"C"`` or ``"F"``), the memory order
in which persisted chunks are laid out for the kernel (default ``"C"``).
Optional too: a ``vector_scale(params)`` method, positive weights of
:meth:`MixtureModel.to_vector`'s coordinates for SQUAREM's norms (its step
lengths and EM's observed rate), e.g. to make them independent of the data's
units (default: plain Euclidean norms). And a
``surrogate_gain(stats, params, new_params)`` method: the gain per training
row of EM's surrogate (the expected complete-data log-likelihood given the
statistics computed at ``params``) from ``params`` to ``new_params``, their
M-step, or NaN; with it an accelerated run whose EM rate was measured on the
sample may end after its first pass (:func:`daskem._squarem.surrogate_remaining`).

A minimal complete implementation (a 1-D two-component mean model) lives in
``tests/test_seam.py``; :class:`daskem._gaussian_model.GaussianModel` is the
Gaussian one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

Params = TypeVar("Params")
Stats = TypeVar("Stats")


class DataPasses(Protocol):
    """Passes over the data, offered by the fit loop to a model's initialisation."""

    def statistics(self, model: MixtureModel, params_list: Sequence[Any]) -> list[Any]:
        """One counted pass: ``model``'s summed statistics of every parameter set."""

    def sample(self) -> np.ndarray:
        """A sample of the training rows (read once, at most one counted pass, then cached).

        The rows passed :meth:`MixtureModel.check_rows`; they may hold what
        the model's NaN policy allows.
        """

    def iterate(self, model: MixtureModel, params_list: Sequence[Any], *, tol: float, max_iter: int) -> list[Any]:
        """Run ``model``'s EM from each parameter set, in shared passes; returns the runs
        (:class:`daskem._fitloop.Run`: ``params``, ``n_iter``, ``history``, ``converged``)."""

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], *, holds_gil: bool = False) -> list[Any]:
        """``fn(item)`` for every item, in item order: in-memory work between passes
        (e.g. scoring candidate starts on :meth:`sample`), on the threads or
        forked processes an in-process pass uses, BLAS single-threaded in each.
        Reads no data. ``fn`` must not depend on the order in which the items
        run, and ``fn`` and the items must pickle (a module-level function or
        a :func:`functools.partial` of one). ``holds_gil``: each item's work is
        mostly short numpy calls, which hold Python's GIL: on threads the items
        then run one after another, on processes side by side."""


class MixtureModel(Protocol[Params, Stats]):
    """What the fit loop, the engine and the base estimator need from a mixture model."""

    # ---------------------------------------------------------------- workers

    def statistics(self, x: np.ndarray, params_list: Sequence[Params], train_mask: np.ndarray | None) -> list[Stats]:
        """Statistics of one chunk for every parameter set, in one pass over the chunk.

        Parameters
        ----------
        x : ndarray of shape (n, D)
            A chunk of rows (any float dtype; the model casts).
        params_list : sequence of Params
            Every parameter set of this pass (restarts, candidate K, the
            points an accelerated run asks for).
        train_mask : ndarray of bool of shape (n,), or None
            Rows used for training; the others only count as held-out rows
            (validation log-likelihood). None: every row trains.

        Rows the NaN policy refuses are counted (see :meth:`check_statistics`)
        and left out; the chunk kernel never raises on them, so that a pass
        is not lost to one bad chunk.
        """

    def pass_params(self, params: Params) -> Params:
        """What :meth:`statistics` and :meth:`log_prob` read of ``params``: what a pass sends to the workers.

        The engine sends these (each pass, to every worker process or task)
        in place of the full parameters; the statistics must be the same to
        the bit. A model whose parameters hold derived arrays the chunk
        kernel never reads leaves them out here.
        """

    def packed_size(self, params: Params) -> int:
        """Length of :meth:`pack`'s vector for statistics of ``params``."""

    def pack(self, stats: Stats) -> np.ndarray:
        """A flat float64 vector; the sum of two packed vectors packs the summed statistics."""

    def unpack(self, vec: np.ndarray, params: Params) -> Stats:
        """Inverse of :meth:`pack`."""

    def log_prob(self, x: np.ndarray, params: Params) -> np.ndarray:
        """Row-wise ``log pi_k + log p(x | k)``, shape (n, K), float64.

        Predictions (``predict``, ``predict_proba``, ``score_samples``) are
        slices of this. A row the model cannot score (e.g. every entry
        missing) gets a row of NaN.
        """

    # ---------------------------------------------------------------- client

    def check_rows(self, x: np.ndarray) -> None:
        """The NaN policy on in-memory rows: raise :class:`daskem.errors.InputError` for what it refuses."""

    def check_statistics(self, stats: Stats) -> None:
        """The NaN policy after a pass: raise :class:`~daskem.errors.InputError` if the
        statistics counted rows the policy refuses."""

    def objective(self, stats: Stats) -> float:
        """What EM increases and convergence watches: today the mean log-likelihood
        per training row (a Bayesian model adds its prior terms)."""

    def loglik(self, stats: Stats) -> tuple[float, float]:
        """``(sum of log p(x), rows)`` over the training rows (BIC, AIC, ``score``)."""

    def heldout_loglik(self, stats: Stats) -> tuple[float, float]:
        """``(sum of log p(x), rows)`` over the held-out rows (validation)."""

    def m_step(self, stats: Stats, params: Params) -> tuple[Params, np.ndarray]:
        """New parameters from the statistics of ``params``, and a (K,) bool mask of
        components that received no rows (left as they were, to be re-seeded)."""

    def reseed(self, params: Params, empty: np.ndarray, pool: np.ndarray) -> Params:
        """Move the ``empty`` components onto rows of ``pool`` (a sample of the data)."""

    def n_parameters(self, params: Params) -> int:
        """Degrees of freedom (BIC, AIC)."""

    def n_components(self, params: Params) -> int:
        """K."""

    def params_state(self, params: Params) -> tuple[dict[str, np.ndarray], dict]:
        """Arrays and JSON-able metadata that restore ``params`` (checkpoints, saved models)."""

    def params_from_state(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Params:
        """Inverse of :meth:`params_state`."""

    def to_vector(self, params: Params) -> np.ndarray:
        """An unconstrained real vector for ``params`` (acceleration: SQUAREM extrapolates
        in this space)."""

    def from_vector(self, vec: np.ndarray, like: Params) -> Params | None:
        """Inverse of :meth:`to_vector`; ``like`` gives the shapes and the structure. None where
        ``vec`` is no valid model (overflow, non-finite): the accelerated run rejects that point
        without spending a pass."""

    def sample(self, params: Params, n_samples: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
        """``n_samples`` rows drawn from the mixture and their components (``sample``)."""

    def scoring_model(self) -> MixtureModel:
        """The model that scores fitted parameters (soft E-step, whatever the fit used)."""

    def initialize(
        self,
        passes: DataPasses,
        components: Sequence[int],
        rng: np.random.Generator,
        options: Mapping[str, Any],
    ) -> list[Params]:
        """Initial parameters of every run, ``components`` giving each run's K.

        ``options`` holds the estimator's initialisation options (for the
        Gaussian model: ``init_params``, ``tol``, ``weights_init``,
        ``means_init``, ``precisions_init``). Every pass goes through
        ``passes`` (counted, shared by all runs).
        """
