"""daskem's fourteen covariance models against R's mclust 6.0, end to end, from the fixtures (no R needed).

The fixtures (tests/fixtures/mclust, see export.R) hold mclust's fitted parameters, log-likelihoods, df,
BIC and ICL, one E+M step from the fitted parameters, and the hierarchical starting partition, per data set.

(a) From mclust's fitted parameters, one daskem E-step (:meth:`GaussianModel.statistics` on the data) and
    M-step (:meth:`GaussianModel.m_step`) equal mclust's next iterate (``mstep``).
(b) daskem's log-likelihood of mclust's parameters, df (``n_parameters``), BIC and ICL equal mclust's
    (daskem's ``bic()`` and ``icl()`` are minus mclust's: lower is better).
(c) From mclust's starting partition (one M-step from the one-hot classification), daskem's EM ends within
    1e-3 of mclust's log-likelihood.

A sample of the cases runs by default; the full grid is marked slow.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from test_mclust_models import CASES, fit_ref, load, log_resp_and_loglik, params

import daskem
from daskem import _covariance as cov_
from daskem._gaussian import GaussianParams
from daskem._gaussian_model import GaussianModel
from daskem._init import responsibility_statistics
from daskem._mclust import scatter_statistics
from daskem.base import information_criteria

MODELS = cov_.MCLUST_MODELS


def to_layout(model: str, sigma: np.ndarray) -> np.ndarray:
    """mclust's (G, D, D) covariances in daskem's storage for ``model``."""
    return {
        "spherical": lambda: sigma[:, 0, 0].copy(),
        "diag": lambda: np.diagonal(sigma, axis1=1, axis2=2).copy(),
        "tied": lambda: sigma[0].copy(),
        "full": lambda: sigma.copy(),
    }[cov_.layout(model)]()


def mclust_params(name: str, model: str, G: int) -> GaussianParams:
    pro, mean, sigma = params(fit_ref(name, model, G))
    return GaussianParams.from_covariances(pro, mean, to_layout(model, sigma), model)


def estimator_at(params: GaussianParams, X: np.ndarray) -> daskem.GaussianMixture:
    """A GaussianMixture whose fitted parameters are ``params`` (as after ``fit``)."""
    gm = daskem.GaussianMixture(params.n_components, covariance_type=params.covariance_type, reg_covar=0.0)
    gm._set_params_from(params, np.dtype(np.float64))
    gm.n_features_in_ = X.shape[1]
    return gm


def hc_start(X: np.ndarray, name: str, model: str, G: int) -> GaussianParams:
    """mclust's initial parameters: one M-step from the hierarchical partition (one cluster for G = 1)."""
    _, ref = load(name)
    labels = np.zeros(X.shape[0], int) if G == 1 else np.asarray(ref["hc_classification"][str(G)]) - 1
    resp = np.eye(G)[labels]
    stats, at = responsibility_statistics(X, resp, model)
    p, empty = GaussianModel(covariance_type=model, reg_covar=0.0).m_step(stats, at)
    assert not empty.any()
    return p


def _sample(cases: list, every: int) -> tuple[list, list]:
    """Every ``every``-th case (deterministic) runs by default, the others are marked slow."""
    fast, slow = [], []
    for i, c in enumerate(cases):
        if i % every == 0:
            fast.append(c)
        else:
            slow.append(pytest.param(*c.values, id=c.id, marks=pytest.mark.slow))
    return fast, slow


MSTEP_CASES = [c for c in CASES if fit_ref(*c.values)["mstep"] is not None and c.values[1] in MODELS]
_A_FAST, _A_SLOW = _sample(MSTEP_CASES, 3)
_B_FAST, _B_SLOW = _sample(CASES, 3)
EM_CASES = [c for c in CASES if c.values[2] <= 5]
_C_FAST, _C_SLOW = _sample(EM_CASES, 37)


@pytest.mark.parametrize(("name", "model", "G"), _A_FAST + _A_SLOW)
def test_one_em_step_equals_mclust(name: str, model: str, G: int) -> None:
    X, _ = load(name)
    ms = fit_ref(name, model, G)["mstep"]
    p = mclust_params(name, model, G)
    gmodel = GaussianModel(covariance_type=model, reg_covar=0.0)
    (stats,) = gmodel.statistics(X, [p], None)
    new, empty = gmodel.m_step(stats, p)
    assert not empty.any()
    np.testing.assert_allclose(new.weights, ms["pro"], rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(new.means, ms["mean"], rtol=1e-8, atol=1e-10 * np.abs(X).max())
    expected = to_layout(model, np.asarray(ms["sigma"], float))
    scale = np.abs(expected).max()
    if model in ("EVE", "VVE") and G == 1:
        # mclust's MM stops ~1e-4 from the MLE here (see daskem._mclust); daskem returns the MLE
        np.testing.assert_allclose(new.covariances, expected, rtol=1e-3, atol=1e-3 * scale)
    elif model in ("VEI", "VEV", "VEE", "EVE", "VVE"):
        # mclust's mstep() starts the inner iterations from a fixed point; daskem's EM, like mclust's, from
        # the E-step's covariances. From mclust's start, the structure's M-step is mclust's:
        delta = stats.s1 / stats.nk[:, None]
        cold = cov_.structure(model).covariances(stats.s2, delta, stats.nk, 0.0, None)
        q_ref = m_step_objective(X, p, _with_cov(new, expected), model)
        if model == "VVE":
            # not mclust's msvve, whose fixed point is not the maximiser (see daskem._mclust): at least its
            # objective (from 1e-4 to 79 nats more on these fixtures)
            q_cold = m_step_objective(X, p, _with_cov(new, cold), model)
            assert q_cold >= q_ref - 1e-10 * abs(q_ref), (q_cold, q_ref)
        else:
            np.testing.assert_allclose(cold, expected, rtol=1e-6, atol=1e-8 * scale)
        # Warm-started, it does not lower the M-step's objective below the E-step's covariances' (EM stays
        # monotone) and reaches mclust's optimum to ~1e-7 (VVE: at least mclust's objective).
        q_new = m_step_objective(X, p, new, model)
        q_old = m_step_objective(X, p, _with_cov(new, p.covariances), model)
        assert q_new >= q_old - 1e-12 * abs(q_old), (q_new, q_old)
        assert q_new >= q_ref - 1e-6 * abs(q_ref), (q_new, q_ref)
        if model != "VVE":
            np.testing.assert_allclose(new.covariances, expected, rtol=3e-2, atol=3e-2 * scale)
    else:
        np.testing.assert_allclose(new.covariances, expected, rtol=1e-8, atol=1e-11 * scale)


def _with_cov(p: GaussianParams, cov: np.ndarray) -> GaussianParams:
    return GaussianParams.from_covariances(p.weights, p.means, cov, p.covariance_type)


def m_step_objective(X: np.ndarray, at: GaussianParams, new: GaussianParams, model: str) -> float:
    """sum_k [-n_k/2 log det Sigma_k - 1/2 tr(Sigma_k^-1 W_k)], the covariance part of EM's Q at ``new``."""
    log_resp, _ = log_resp_and_loglik(
        X, at.weights, at.means, cov_.dense_covariances(at.covariances, model, *at.means.shape)
    )
    nk, _, W = scatter_statistics(X, np.exp(log_resp), "full")
    sigma = cov_.dense_covariances(new.covariances, model, *new.means.shape)
    _, logdet = np.linalg.slogdet(sigma)
    return float(np.sum(-0.5 * nk * logdet - 0.5 * np.einsum("kij,kji->k", np.linalg.inv(sigma), W)))


@pytest.mark.parametrize(("name", "model", "G"), _B_FAST + _B_SLOW)
def test_loglik_df_bic_of_mclust_parameters(name: str, model: str, G: int) -> None:
    X, _ = load(name)
    fit = fit_ref(name, model, G)
    p = mclust_params(name, model, G)
    (stats,) = GaussianModel(covariance_type=model, reg_covar=0.0).statistics(X, [p], None)
    np.testing.assert_allclose(stats.loglik, fit["estep_loglik"], rtol=1e-10)
    assert p.n_parameters() == fit["df"]
    bic = information_criteria(stats.loglik, X.shape[0], p.n_parameters())["bic"]
    np.testing.assert_allclose(bic, -fit["estep_bic"], rtol=1e-10)


@pytest.mark.parametrize("model", MODELS)
def test_estimator_scores_mclust_parameters(model: str) -> None:
    """The estimator's own ``bic()`` (one pass, numpy and dask input): minus mclust's BIC."""
    X, _ = load("faithful")
    fit = fit_ref("faithful", model, 3)
    gm = estimator_at(mclust_params("faithful", model, 3), X)
    assert gm.bic(X) == pytest.approx(-fit["estep_bic"], rel=1e-10)
    import dask.array as da

    assert gm.bic(da.from_array(X, chunks=100)) == pytest.approx(-fit["estep_bic"], rel=1e-10)
    # ICL: daskem's sign (lower is better) is minus mclust's icl()
    assert gm.icl(X) == pytest.approx(-fit["estep_icl"], rel=1e-10)
    assert gm.icl(da.from_array(X, chunks=100)) == pytest.approx(-fit["estep_icl"], rel=1e-10)
    assert gm.icl(X) >= gm.bic(X)


@pytest.mark.parametrize(("name", "model", "G"), _B_FAST + _B_SLOW)
def test_icl_of_mclust_parameters(name: str, model: str, G: int) -> None:
    """The kernels' ``log_map`` (sum of log max responsibility) gives mclust's ICL."""
    X, _ = load(name)
    fit = fit_ref(name, model, G)
    p = mclust_params(name, model, G)
    scoring = GaussianModel(covariance_type=model, reg_covar=0.0).scoring_model()
    (stats,) = scoring.statistics(X, [p], None)
    bic = information_criteria(stats.loglik, X.shape[0], p.n_parameters())["bic"]
    np.testing.assert_allclose(bic - 2.0 * stats.log_map, -fit["estep_icl"], rtol=1e-10)
    # restarts sharing a pass (the stacked kernel of the diagonal layouts): the same term for each
    for s in scoring.statistics(X, [p, p], None):
        assert s.log_map == pytest.approx(stats.log_map, rel=1e-10)


@pytest.mark.parametrize("model", ["VVV", "EEE", "VEI", "EII"])
def test_log_map_of_the_missing_values_kernel(model: str) -> None:
    """Rows with NaN: log max of the responsibilities on the observed entries, as the complete rows'."""
    X, _ = load("iris")
    p = mclust_params("iris", model, 3)
    Xn = X.copy()
    Xn[::7, 1] = np.nan
    Xn[3::11, 2:] = np.nan
    gmodel = GaussianModel(covariance_type=model, reg_covar=0.0, missing="marginalize", map_term=True)
    (stats,) = gmodel.statistics(Xn, [p], None)
    lp = gmodel.log_prob(Xn, p)
    expected = float(np.sum(lp.max(axis=1) - np.logaddexp.reduce(lp, axis=1)))
    assert stats.log_map == pytest.approx(expected, rel=1e-10)
    # hard EM's responsibilities are one-hot: nothing to add
    hard_model = GaussianModel(covariance_type=model, hard=True, missing="marginalize", map_term=True)
    (hard,) = hard_model.statistics(Xn, [p], None)
    assert hard.log_map == 0.0


def _em(X: np.ndarray, p0: GaussianParams, reg_covar: float = 0.0, quiet: bool = True) -> daskem.GaussianMixture:
    """daskem's EM from ``p0``: no regularisation, a tight tolerance."""
    gm = daskem.GaussianMixture(
        p0.n_components,
        covariance_type=p0.covariance_type,
        reg_covar=reg_covar,
        tol=1e-10,
        accelerate=None,
        max_iter=50_000,
        weights_init=p0.weights,
        means_init=p0.means,
        precisions_init=p0.precisions,
    )
    if not quiet:
        return gm.fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return gm.fit(X)


#: VVE: daskem's M-step maximises, mclust's Fortran MM (msvve) does not (its orientation steps weight
#: sum_k tr(A_k^-1 D' W_k D) without 1/lambda_k; see daskem._mclust), so the two EM paths differ. From mclust's
#: final parameters daskem's EM rises above mclust's log-likelihood in 31 of the 35 VVE cases (thyroid G=3..5:
#: +320..342 nats); from mclust's hc start it ends at or above mclust's optimum except in these four, where
#: the other path leads to a lower local optimum (daskem's from the hc start, mclust's):
KNOWN_DIFFERENT = {
    ("iris", "VVE", 5): "another optimum: daskem -17.2 below mclust from the hc start (+0.87 from mclust's end)",
    ("banknote", "VVE", 5): "another optimum: daskem -0.35 below mclust from the hc start (+1.05 from mclust's end)",
    ("thyroid", "VVE", 2): "another optimum: daskem -24.9 below mclust from the hc start (+11.0 from mclust's end)",
    ("chevron", "VVE", 3): "another optimum: daskem -26.9 below mclust from the hc start (+1.11 from mclust's end)",
}


@pytest.mark.parametrize(("name", "model", "G"), _C_FAST + _C_SLOW)
def test_em_from_mclust_start_ends_at_mclusts_optimum(name: str, model: str, G: int) -> None:
    """From mclust's starting partition daskem's EM reaches mclust's optimum.

    Mclust stops at its default tolerance (a relative change of 1e-5 in the log-likelihood), up to a few
    units short of the optimum it is heading for on slow fits; that optimum is where daskem's EM goes from
    mclust's final parameters. daskem from mclust's start ends within 1e-3 of it, never below mclust (VVE:
    never below mclust, see :data:`KNOWN_DIFFERENT`).
    """
    if (name, model, G) in KNOWN_DIFFERENT:
        pytest.xfail(KNOWN_DIFFERENT[(name, model, G)])
    X, _ = load(name)
    fit = fit_ref(name, model, G)
    n = X.shape[0]
    from_start = _em(X, hc_start(X, name, model, G))
    from_mclust = _em(X, mclust_params(name, model, G))
    ll_start, ll_mclust = from_start.score(X) * n, from_mclust.score(X) * n
    assert from_start.converged_ and from_mclust.converged_
    assert ll_mclust >= fit["estep_loglik"] - 1e-6 * abs(fit["estep_loglik"])
    if model != "VVE":  # VVE: another M-step, another path (see KNOWN_DIFFERENT)
        assert abs(ll_start - ll_mclust) < 1e-3, (ll_start, ll_mclust, fit["loglik"])
    assert ll_start >= fit["loglik"] - 1e-3


def test_sample_is_small_and_the_rest_is_marked_slow() -> None:
    assert 10 <= len(_C_FAST) <= 30
    assert len(_C_FAST) + len(_C_SLOW) == len(EM_CASES)
    assert all(c.marks for c in _C_SLOW)


# ------------------------------------------------------------------------------------------------
# degenerate runs and failed restarts


def _faithful_collapsed_start() -> GaussianParams:
    """faithful, VVI, G=5: mclust's G=4 fit plus a component on the 14 rows with waiting == 83."""
    X, _ = load("faithful")
    pro, mean, sigma = params(fit_ref("faithful", "VVI", 4))
    on = X[:, 1] == 83
    weights = np.append(pro * (1 - on.mean()), on.mean())
    means = np.vstack([mean, X[on].mean(axis=0)])
    var = np.vstack([np.diagonal(sigma, axis1=1, axis2=2), [X[on, 0].var(), 1e-3]])
    return GaussianParams.from_covariances(weights, means, var, "VVI")


def test_faithful_collapsed_component_is_flagged_and_never_chosen() -> None:
    """The issue's case: a component on 14 rows of rounded data (waiting = 83) wins on BIC; it is degenerate."""
    X, _ = load("faithful")
    ref = fit_ref("faithful", "VVI", 5)
    with pytest.warns(RuntimeWarning, match="degenerate.*component 4 \\(14 effective rows\\) has collapsed"):
        bad = _em(X, _faithful_collapsed_start(), reg_covar=1e-6, quiet=False)
    assert bad.runs_[0]["degenerate"]
    # far above mclust's optimum (+65 in log-likelihood), so its BIC would win
    assert bad.score(X) * X.shape[0] > ref["loglik"] + 50
    assert bad.bic(X) < -ref["bic"]
    good = _em(X, mclust_params("faithful", "VVI", 5))
    assert not good.runs_[0]["degenerate"]
    # restarts: a degenerate run is never the chosen one, though its log-likelihood is the highest
    # (the default k-means start found no collapsed optimum in 12 seeds; random rows as centres do)
    found = 0
    for seed in (2,):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            gm = daskem.GaussianMixture(
                5,
                covariance_type="VVI",
                n_init=5,
                random_state=seed,
                tol=1e-6,
                max_iter=500,
                init_params="random_from_data",
            )
            gm.fit(X)
        flagged = [r for r in gm.runs_ if r["degenerate"]]
        found += len(flagged)
        chosen = max((r for r in gm.runs_ if not r["degenerate"]), key=lambda r: r["lower_bound"])
        # (restarts within 1e-9 relative of the best count as equal: best_run keeps the first of them)
        assert gm.lower_bound_ == pytest.approx(chosen["lower_bound"], rel=1e-9, abs=0)
        # the chosen run is never a flagged one (that a degenerate optimum can be the highest is
        # shown by the collapsed start above)
        assert not any(r["degenerate"] and r["lower_bound"] == gm.lower_bound_ for r in gm.runs_)
    assert found >= 1


def test_select_k_never_chooses_a_degenerate_k() -> None:
    from daskem.select import choose

    table = [
        {"k": 4, "bic": 2343.5, "degenerate": ""},
        {"k": 5, "bic": 2230.0, "degenerate": "component 4 has collapsed"},
        {"k": 6, "bic": 2360.0, "degenerate": ""},
    ]
    assert table[choose(table, "bic")]["k"] == 4
    assert table[choose([dict(r, degenerate="x") for r in table], "bic")]["k"] == 5  # all degenerate: the best
    X, _ = load("faithful")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = daskem.select_k(X, [4, 5], criterion="bic", covariance_type="VVI", n_init=5, random_state=2, tol=1e-6)
    assert all(isinstance(r["degenerate"], str) for r in res.table)
    assert not res.table[[r["k"] for r in res.table].index(res.best_k)]["degenerate"]


def test_a_failed_restart_is_dropped_with_a_warning() -> None:
    """With reg_covar=0, restarts whose component lands on 4 identical rows fail; the others carry the fit."""
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(300, 2)), np.tile([6.0, 6.0], (4, 1))])
    # plain EM: at reg_covar=0 the likelihood is unbounded at the 4 identical rows, and accelerated EM
    # climbs towards that collapse in every restart (so every restart fails)
    opts = dict(
        covariance_type="VVV", reg_covar=0.0, n_init=6, init_params="random_from_data", max_iter=200, accelerate=None
    )
    with pytest.warns(RuntimeWarning, match="run \\{'k': 3, 'init': \\d\\} failed at iteration \\d+ and was dropped"):
        gm = daskem.GaussianMixture(3, random_state=0, **opts).fit(X)
    failed = [r for r in gm.runs_ if r["failed"]]
    assert 1 <= len(failed) < 6
    assert np.isfinite(gm.lower_bound_) and gm.lower_bound_ == max(r["lower_bound"] for r in gm.runs_)
    # one restart, and it fails: the fit fails, as scikit-learn's
    with pytest.raises(ValueError, match="ill-defined"):
        daskem.GaussianMixture(3, random_state=0, **{**opts, "n_init": 1, "means_init": [[6, 6], [0, 0], [1, 1]]}).fit(
            X
        )


# ------------------------------------------------------------------------------------------------
# choosing the model and K together


def mclust_choice(name: str, max_g: int = 9, models: tuple[str, ...] = MODELS) -> tuple[str, int, float]:
    """Mclust's BIC choice from the fixtures: the largest BIC over the models and G."""
    _, ref = load(name)
    fits = [f for f in ref["fits"] if f["bic"] is not None and f["G"] <= max_g and f["model"] in models]
    best = max(fits, key=lambda f: f["bic"])
    return best["model"], best["G"], best["bic"]


def _select(name: str, types, ks, n_init: int = 1) -> daskem.select.SelectModelResult:
    X, _ = load(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return daskem.select_model(
            X, ks, types, criterion="bic", random_state=0, tol=1e-6, max_iter=1000, n_init=n_init
        )


def test_select_model_chooses_mclusts_model_and_g_on_iris() -> None:
    """iris, the four models mclust's BIC ranks highest, G = 1..4: mclust's choice (VEV, 2) and its BIC."""
    _, ref = load("iris")
    fits = sorted((f for f in ref["fits"] if f["bic"] is not None and f["G"] <= 4), key=lambda f: -f["bic"])
    types = list(dict.fromkeys(f["model"] for f in fits))[:4]
    res = _select("iris", types, range(1, 5))
    model, g, bic = mclust_choice("iris", 4)
    assert (res.best_covariance_type, res.best_k) == (model, g) == ("VEV", 2)
    row = next(r for r in res.table if (r["covariance_type"], r["k"]) == (model, g))
    assert row["bic"] == pytest.approx(-bic, abs=0.1)
    assert row["df"] == fit_ref("iris", model, g)["df"]
    assert [(r["covariance_type"], r["k"]) for r in res.table] == [(t, k) for t in types for k in range(1, 5)]
    assert res.best_model.covariance_type == model and res.best_model.n_components == g
    assert not res.at_range_edge
    # every pair shared the passes: far fewer than one fit per pair would make
    assert res.n_passes < 2 * max(r["n_iter"] for r in res.table) + 10


#: restarts daskem needs (k-means starts) to find optima as good as mclust's (hierarchical starts)
#: (faithful: one restart's shared start, chosen for VVV, leads EEE G=3 to a poorer optimum since the
#: candidates of issue 12's initialisation; three restarts find mclust's)
SELECT_N_INIT = {"iris": 1, "faithful": 1, "diabetes": 1, "banknote": 1}


@pytest.mark.parametrize("model", ["EEE", "VII", "VVI"])
def test_select_model_starts_each_layout_as_its_own_fit(model: str) -> None:
    """Each layout's runs start as a fit of that layout alone would: its own candidates, scored by its own M-step.

    faithful, EEE G=3: from a start shared with the full layout, EM ended 28 below mclust's optimum (BIC -2342.0
    against -2314.3), so a selection over several models disagreed with a selection over EEE alone.
    """
    X, _ = load("faithful")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = daskem.select_model(X, [3], [model, "VVV", "EEI"], criterion="bic", random_state=0)
        single = daskem.GaussianMixture(3, covariance_type=model, random_state=0).fit(X)
    row = next(r for r in res.table if r["covariance_type"] == model and r["k"] == 3)
    assert not row["failed"]
    assert row["loglik"] == pytest.approx(single.score(X) * X.shape[0], rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["iris", "faithful", "diabetes", "banknote"])
def test_select_model_all_models_chooses_mclusts(name: str) -> None:
    """All fourteen models, G = 1..5: mclust's BIC choice, or a pair where daskem found a better optimum.

    mclust fits each (model, G) once from its hierarchical partition, daskem from k-means restarts; where
    mclust's fit of a pair is a poorer local optimum than daskem's, the rankings can differ (banknote: mclust
    stops EEE G=4 at BIC -1632.4, daskem reaches -1607.3, above mclust's choice VVE G=3 at -1607.6).
    """
    res = _select(name, "all", range(1, 6), n_init=SELECT_N_INIT[name])
    model, g, bic = mclust_choice(name, 5)
    chosen = next(r for r in res.table if (r["covariance_type"], r["k"]) == (res.best_covariance_type, res.best_k))
    assert -chosen["bic"] >= bic - 0.1
    if (res.best_covariance_type, res.best_k) == (model, g):
        if model == "VVE":  # daskem's VVE M-step maximises, mclust's does not: banknote G=3 1.2 BIC units above
            assert -chosen["bic"] > bic
        else:
            assert chosen["bic"] == pytest.approx(-bic, abs=0.1)
    else:
        # a better optimum of the same pair than mclust's own fit of it, by more than one BIC unit
        assert name == "banknote"
        theirs = fit_ref(name, res.best_covariance_type, res.best_k)["bic"]
        assert -chosen["bic"] > theirs + 1.0


def test_select_model_reports_failed_and_degenerate_pairs() -> None:
    """reg_covar=0 and a group with a constant column: VVI with 2 components fails in every restart (mclust's
    NA); with that column almost constant instead (spread 1e-6), VVV with 2 collapses (degenerate). The
    selection goes on and chooses neither. (With the exactly constant column, whether VVV's Cholesky fails or
    its covariance comes out barely positive is round-off: it changed with numpy 2.4.)"""
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 8
    B[:, 1] = 8.0
    X = np.vstack([A, B])
    with pytest.warns(RuntimeWarning, match="every restart of covariance_type='VVI', k=2 failed"):
        res = daskem.select_model(X, [1, 2], ["EII", "VVI"], reg_covar=0.0, random_state=0)
    rows = {(r["covariance_type"], r["k"]): r for r in res.table}
    assert rows[("VVI", 2)]["failed"] and np.isnan(rows[("VVI", 2)]["bic"]) and ("VVI", 2) not in res.models
    assert (res.best_covariance_type, res.best_k) == ("EII", 2) and res.at_range_edge
    B[:, 1] = 8.0 + 1e-6 * rng.normal(size=200)
    X = np.vstack([A, B])
    res = daskem.select_model(X, [1, 2], ["VVV", "EII"], reg_covar=0.0, random_state=0)
    rows = {(r["covariance_type"], r["k"]): r for r in res.table}
    assert not rows[("VVV", 2)]["failed"]
    assert rows[("VVV", 2)]["degenerate"] and rows[("VVV", 2)]["bic"] < rows[("EII", 2)]["bic"]
    assert (res.best_covariance_type, res.best_k) == ("EII", 2) and res.at_range_edge
    assert set(rows[("EII", 2)]) == set(daskem.select.MODEL_TABLE_KEYS)


def test_select_model_warnings_name_the_covariance_type() -> None:
    """The failed restart's warning and the run tags in runs_ name the model as well as K and the restart."""
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 8
    B[:, 1] = 8.0
    X = np.vstack([A, B])
    with pytest.warns(
        RuntimeWarning, match="run \\{'covariance_type': 'VVI', 'k': 2, 'init': 1\\} failed at iteration \\d+"
    ):
        res = daskem.select_model(X, [1, 2], ["EII", "VVI"], reg_covar=0.0, random_state=0, n_init=2)
    tags = [r["tag"] for r in res.models[("EII", 2)].runs_]
    assert tags == [{"covariance_type": "EII", "k": 2, "init": 0}, {"covariance_type": "EII", "k": 2, "init": 1}]


def _collapsed_at_large_scale() -> np.ndarray:
    """Three distinct points, each repeated 20 times, at a scale of 1e8: with K > 3 a k-means start has a
    component of identical rows, whose full covariance (1e-6 added to a 1e16 scale) is singular."""
    rng = np.random.default_rng(0)
    return np.repeat(rng.normal(size=(3, 2)), 20, axis=0) * 1e8


def test_an_initialisation_that_fails_fails_its_pairs_only() -> None:
    """The shared start of VVV (full layout) fails for K = 2, 4 and 6; EII (starts of its own diagonal layout)
    and K = 1 go on; the failed pairs are reported failed, with a warning that names them."""
    X = _collapsed_at_large_scale()
    with pytest.warns(RuntimeWarning, match="the initialisation of covariance_type='VVV', k=4 failed"):
        res = daskem.select_model(X, [1, 2, 4], ["VVV", "EII"], reg_covar=0.0, random_state=0)
    rows = {(r["covariance_type"], r["k"]): r for r in res.table}
    assert [p for p, r in rows.items() if r["failed"]] == [("VVV", 2), ("VVV", 4), ("EII", 4)]
    assert not rows[("EII", 2)]["failed"] and np.isfinite(rows[("EII", 2)]["bic"])
    assert (res.best_covariance_type, res.best_k) == ("EII", 2)
    assert ("VVV", 4) not in res.models and ("EII", 2) in res.models
    # the pairs that started are the same as when fitted without the failing ones
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = daskem.select_model(X, [1, 2], ["EII"], reg_covar=0.0, random_state=0)
    assert alone.table[1]["bic"] == pytest.approx(rows[("EII", 2)]["bic"], rel=1e-9)


def test_a_failed_initialisation_is_checkpointed_and_resumed(tmp_path) -> None:
    """The runs that could not start are saved in the checkpoint (without parameters) and come back failed."""
    X = _collapsed_at_large_scale()
    opts = dict(reg_covar=0.0, random_state=0, checkpoint=str(tmp_path / "ck"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = daskem.select_model(X, [1, 2, 4], ["VVV", "EII"], **opts)
        again = daskem.select_model(X, [1, 2, 4], ["VVV", "EII"], **opts)
    assert [r["failed"] for r in again.table] == [r["failed"] for r in first.table] == [0, 1, 1, 0, 0, 1]
    assert again.n_passes < first.n_passes  # resumed: no initialisation, no EM passes
    np.testing.assert_allclose(
        [r["bic"] for r in again.table], [r["bic"] for r in first.table], rtol=1e-12, equal_nan=True
    )


def test_select_k_reports_a_k_whose_initialisation_fails() -> None:
    """One covariance model, several K: a K that cannot start is a failed row (NaN scores), not a failed fit."""
    X = _collapsed_at_large_scale()
    with pytest.warns(RuntimeWarning, match="the initialisation of k=4 failed"):
        res = daskem.select_k(X, [1, 4], criterion="bic", covariance_type="VVV", reg_covar=0.0, random_state=0)
    assert [(r["k"], r["failed"]) for r in res.table] == [(1, False), (4, True)]
    assert np.isnan(res.table[1]["bic"]) and res.table[1]["df"] == 4 * 2 + 4 * 3 + 3
    assert res.best_k == 1 and set(res.models) == {1} and tuple(res.table[0]) == daskem.select.TABLE_KEYS


def test_an_initialisation_that_fails_everywhere_fails_the_fit() -> None:
    X = _collapsed_at_large_scale()
    with pytest.raises(ValueError, match="ill-defined"):
        daskem.select_model(X, [4], ["VVV", "EEE"], reg_covar=0.0, random_state=0)
    with pytest.raises(ValueError, match="ill-defined"):
        daskem.GaussianMixture(4, covariance_type="VVV", reg_covar=0.0, random_state=0).fit(X)


def test_select_model_refuses_bad_arguments() -> None:
    X, _ = load("faithful")
    with pytest.raises(daskem.InputError, match="covariance_types"):
        daskem.select_model(X, [1, 2], ["VVV", "XYZ"])
    with pytest.raises(daskem.InputError, match="covariance_type cannot be given"):
        daskem.select_model(X, [1, 2], "all", covariance_type="VVV")
    with pytest.raises(daskem.InputError, match="criterion"):
        daskem.select_model(X, [1, 2], "all", criterion="loglik")


# ------------------------------------------------------------------------------------------------
# what exists for the four sklearn names works for mclust's models


@pytest.mark.parametrize("model", ["EII", "EEI", "VEI", "EVI", "VEE", "EVE", "EEV", "VEV", "EVV"])
def test_every_model_fits_with_missing_values_float32_checkpoint_save_load_sample(model: str, tmp_path) -> None:
    import dask.array as da

    X, _ = load("iris")
    Xn = X.astype(np.float32)
    Xn[::9, 2] = np.nan
    opts = dict(covariance_type=model, n_init=2, random_state=0, missing="marginalize", dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = daskem.GaussianMixture(3, checkpoint=tmp_path / "ck", **opts).fit(da.from_array(Xn, chunks=50))
        again = daskem.GaussianMixture(3, checkpoint=tmp_path / "ck", **opts).fit(da.from_array(Xn, chunks=50))
    assert gm.covariance_type == model and gm.get_params()["covariance_type"] == model
    assert gm.covariances_.shape == cov_.covariance_shape(model, 3, 4) and gm.covariances_.dtype == np.float32
    assert np.isfinite(gm.lower_bound_) and len(gm.runs_) == 2
    # the structure holds: e.g. equal volumes for E.., a common orientation for .E.
    dense = cov_.dense_covariances(gm.params_.covariances, model, 3, 4)
    vols = np.linalg.det(dense) ** 0.25
    if model[0] == "E":
        np.testing.assert_allclose(vols, vols[0], rtol=1e-4)
    np.testing.assert_array_equal(again.means_, gm.means_)  # resumed from the checkpoint: nothing left to do
    gm.save(tmp_path / "model")
    back = daskem.load(tmp_path / "model")
    assert back.covariance_type == model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(back.predict(Xn), gm.predict(Xn))
        np.testing.assert_allclose(back.score_samples(Xn), gm.score_samples(Xn), rtol=1e-6)
    Xs, labels = gm.sample(500)
    assert Xs.shape == (500, 4) and set(labels) <= {0, 1, 2}
    assert np.isfinite(gm.icl(X)) and gm.icl(X) >= gm.bic(X)
