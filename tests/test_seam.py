"""A toy model through the fit loop and the engine, end to end: the seam needs no Gaussian code.

The toy: 1-D data, K components of unit variance and equal weights, only the
means are fitted. Its statistics are ``[n, sum log p, n_heldout, sum log p
heldout, N_k..., S_k...]``; the M-step is ``mu_k = S_k / N_k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dask.array as da
import numpy as np
import pytest

from daskem import _engine as engine
from daskem import _fitloop
from daskem.errors import InputError


@dataclass(frozen=True)
class MeansOnly:
    """1-D mixture of unit-variance Gaussians with equal weights; params: the (K,) means."""

    def statistics(self, x, params_list, train_mask):
        out = []
        for mu in params_list:
            z = x[:, 0, None] - mu[None, :]
            lp = -0.5 * z * z - 0.5 * math.log(2 * math.pi) - math.log(len(mu))
            top = lp.max(axis=1, keepdims=True)
            ll = (top + np.log(np.exp(lp - top).sum(axis=1, keepdims=True)))[:, 0]
            q = np.exp(lp - ll[:, None])
            tr = np.ones(len(x), bool) if train_mask is None else train_mask
            out.append(
                np.concatenate(
                    [[tr.sum(), ll[tr].sum(), (~tr).sum(), ll[~tr].sum()], q[tr].sum(0), (q[tr] * x[tr]).sum(0)]
                )
            )
        return out

    def pass_params(self, mu):
        return mu

    def packed_size(self, mu):
        return 4 + 2 * len(mu)

    def pack(self, s):
        return s

    def unpack(self, vec, mu):
        return np.array(vec, dtype=np.float64)

    def log_prob(self, x, mu):
        return -0.5 * (x[:, 0, None] - mu) ** 2 - 0.5 * math.log(2 * math.pi) - math.log(len(mu))

    def check_rows(self, x):
        if not np.isfinite(x).all():
            raise InputError("no NaN please")

    def check_statistics(self, s):
        pass

    def objective(self, s):
        return s[1] / s[0]

    def loglik(self, s):
        return s[1], s[0]

    def heldout_loglik(self, s):
        return s[3], s[2]

    def m_step(self, s, mu):
        k = len(mu)
        nk, sx = s[4 : 4 + k], s[4 + k :]
        empty = nk < 0.5
        return np.where(empty, mu, sx / np.maximum(nk, 1e-300)), empty

    def reseed(self, mu, empty, pool):
        return np.where(empty, pool[: len(mu), 0], mu)

    def n_parameters(self, mu):
        return len(mu)

    def n_components(self, mu):
        return len(mu)

    def params_state(self, mu):
        return {"means": mu}, {}

    def params_from_state(self, arrays, meta):
        return np.asarray(arrays["means"])

    def to_vector(self, mu):
        return mu.copy()

    def from_vector(self, vec, like):
        return np.asarray(vec).reshape(like.shape)

    def scoring_model(self):
        return self

    def initialize(self, passes, components, rng, options):
        rows = passes.sample()[:, 0]
        return [np.sort(rng.choice(rows, size=k, replace=False)) for k in components]


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(-3.0, 1.0, 3000), rng.normal(4.0, 1.0, 2000)])[rng.permutation(5000), None]


def test_a_toy_model_fits_through_the_loop_and_the_engine(data, tmp_path) -> None:
    X = da.from_array(data, chunks=700)
    settings = _fitloop.Settings(tol=1e-10, max_iter=200, random_state=0, checkpoint=tmp_path / "ckpt")
    res = _fitloop.fit(X, MeansOnly(), [_fitloop.Candidate(2, n_init=3)], settings)
    assert len(res.runs) == 3 and all(r.tag["k"] == 2 for r in res.runs)
    best = _fitloop.best_run(res.runs)
    assert best.converged
    np.testing.assert_allclose(np.sort(best.params), [-3.0, 4.0], atol=0.1)
    # EM never decreases the objective
    h = np.asarray(best.history)
    assert np.all(np.diff(h) >= -1e-12 * np.abs(h[1:]))
    # one sample read to initialise, then one pass per iteration shared by all restarts
    assert res.n_passes == 1 + max(r.n_iter for r in res.runs)
    # the checkpoint holds the toy's state: a second fit resumes and has nothing left to do
    again = _fitloop.fit(X, MeansOnly(), [_fitloop.Candidate(2, n_init=3)], settings)
    assert again.n_passes == 0
    np.testing.assert_array_equal(_fitloop.best_run(again.runs).params, best.params)


def test_the_toy_scores_held_out_rows_out_of_core(data) -> None:
    X = da.from_array(data, chunks=1000)
    split = engine.RowSplit(0.2, seed=3)
    settings = _fitloop.Settings(tol=1e-8, max_iter=100, random_state=1)
    res = _fitloop.fit(X, MeansOnly(), [_fitloop.Candidate(1), _fitloop.Candidate(2)], settings, split=split)
    by_k = res.by_k()
    scores = _fitloop.score(X, MeansOnly(), [_fitloop.best_run(by_k[k]).params for k in (1, 2)], split=split)
    train = split.is_train(np.arange(len(data)))
    for s in scores:
        assert s["n"] == train.sum() and s["heldout_n"] == (~train).sum()
    # two components explain the held-out rows better than one
    assert scores[1]["heldout_loglik"] > scores[0]["heldout_loglik"]


class _EchoRun(_fitloop.Run):
    """A strategy that asks for two parameter sets per pass (what an extrapolating run does)."""

    received: list

    def proposal(self) -> list:
        return [self.params, self.params + 1.0]

    def receive(self, stats, step) -> None:
        assert len(stats) == 2 and step.model.objective(stats[1]) < step.model.objective(stats[0]) + 1.0
        super().receive(stats[:1], step)


def test_a_run_strategy_proposes_several_points_in_one_pass(data) -> None:
    X = da.from_array(data, chunks=900)
    plain = _fitloop.fit(X, MeansOnly(), [_fitloop.Candidate(2)], _fitloop.Settings(tol=1e-9, random_state=4))
    echo = _fitloop.fit(
        X, MeansOnly(), [_fitloop.Candidate(2)], _fitloop.Settings(tol=1e-9, random_state=4, run_class=_EchoRun)
    )
    (a,), (b,) = plain.runs, echo.runs
    assert isinstance(b, _EchoRun) and a.n_iter == b.n_iter
    np.testing.assert_allclose(b.params, a.params, rtol=1e-12)
    assert echo.n_passes == plain.n_passes  # both points came from the same pass
