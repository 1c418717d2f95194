"""daskem._mclust against R's mclust 6.0, from fixtures exported by tests/fixtures/mclust/export.R (no R needed).

For every data set, model and G in the fixtures:
(a) from the responsibilities z at mclust's fitted parameters (computed here in numpy; their log-likelihood
    equals mclust's ``estep`` log-likelihood), counts, means and scatter give, through ``m_step_covariance``,
    the covariances of mclust's ``mstep(model, X, z)``, and the same weights and means;
(b) the log-likelihood of mclust's fitted parameters equals mclust's (``estep``), ``n_parameters`` equals its df,
    so BIC equals too;
(c) ICL of mclust's fitted parameters equals mclust's ``icl()``.
Mclust's reported loglik/BIC/ICL belong to the parameters one M-step before the reported ones (its summary ends with
``mstep(z = me(...)$z)``); the fixtures hold both, and those are checked to EM's tolerance.
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from scipy.special import logsumexp

from daskem import _mclust
from daskem._mclust import (
    ALIASES,
    MODELS,
    bic,
    covariance_to_full,
    icl,
    log_map_sum,
    m_step_covariance,
    n_parameters,
    representation_shape,
    resolve_model,
    scatter_statistics,
)

FIXTURES = Path(__file__).parent / "fixtures" / "mclust"
DATASETS = ["faithful", "iris", "diabetes", "banknote", "wdbc", "thyroid", "wreath", "chevron"]


@cache
def load(name: str) -> tuple[np.ndarray, dict]:
    csv = FIXTURES / f"{name}.csv"
    if not csv.exists():
        csv = FIXTURES / f"{name}.csv.gz"
    X = np.loadtxt(csv, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    with gzip.open(FIXTURES / f"{name}.json.gz", "rt") as f:
        ref = json.load(f)
    assert X.shape == (ref["n"], ref["d"])
    return X, ref


def fit_ref(name: str, model: str, G: int) -> dict:
    _, ref = load(name)
    (fit,) = [f for f in ref["fits"] if f["model"] == model and f["G"] == G]
    return fit


def _cases() -> tuple[list, list]:
    fitted, failed = [], []
    for name in DATASETS:
        _, ref = load(name)
        for f in ref["fits"]:
            case = pytest.param(name, f["model"], f["G"], id=f"{name}-{f['model']}-G{f['G']}")
            (failed if f["bic"] is None else fitted).append(case)
    return fitted, failed


CASES, NA_CASES = _cases()
MSTEP_CASES = [c for c in CASES if fit_ref(*c.values)["mstep"] is not None]


def params(fit: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.asarray(fit["pro"], float), np.asarray(fit["mean"], float), np.asarray(fit["sigma"], float)


def log_resp_and_loglik(X: np.ndarray, pro: np.ndarray, means: np.ndarray, sigma: np.ndarray) -> tuple:
    """Log-responsibilities (N, K) and log-likelihood of a Gaussian mixture, through Cholesky factors."""
    N, D = X.shape
    log_prob = np.empty((N, len(pro)))
    for k in range(len(pro)):
        L = np.linalg.cholesky(sigma[k])
        y = np.linalg.solve(L, (X - means[k]).T)
        log_prob[:, k] = (
            np.log(pro[k])
            - 0.5 * D * np.log(2 * np.pi)
            - np.sum(np.log(np.diag(L)))
            - 0.5 * np.einsum("ij,ij->j", y, y)
        )
    norm = logsumexp(log_prob, axis=1)
    return log_prob - norm[:, None], float(norm.sum())


def test_fixtures_cover_every_model_and_range() -> None:
    assert len(CASES) > 650
    for name in DATASETS:
        _, ref = load(name)
        assert ref["mclust_version"].startswith("6.")
        for model in MODELS:
            Gs = {f["G"] for f in ref["fits"] if f["model"] == model}
            top = 9 if model in ("VII", "VVI", "EEE", "VVV") else 5
            if name == "wdbc" and MODELS[model].family != "diag":
                top = 1 if model in ("EVE", "VVE") else 3  # see export.R
            assert Gs == set(range(1, top + 1)), (name, model)
        assert set(ref["hc_classification"]) == {str(g) for g in range(2, 10)}
        for g, cl in ref["hc_classification"].items():
            assert len(cl) == ref["n"] and set(cl) == set(range(1, int(g) + 1))


@pytest.mark.parametrize(("name", "model", "G"), MSTEP_CASES)
def test_m_step_equals_mclust_mstep(name: str, model: str, G: int) -> None:
    X, _ = load(name)
    fit = fit_ref(name, model, G)
    ms = fit["mstep"]
    N, D = X.shape
    if G == 1:
        resp = np.ones((N, 1))
    else:
        log_resp, loglik = log_resp_and_loglik(X, *params(fit))
        np.testing.assert_allclose(loglik, fit["estep_loglik"], rtol=1e-10)
        resp = np.exp(log_resp)
    spec = MODELS[model]
    nk, means, scatter = scatter_statistics(X, resp, spec.family)
    np.testing.assert_allclose(nk / N, ms["pro"], rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(means, ms["mean"], rtol=1e-8, atol=1e-12)
    cov, info = m_step_covariance(model, nk, scatter, n=N, return_info=True)
    assert cov.shape == representation_shape(model, G, D)
    full = covariance_to_full(model, cov, G, D)
    expected = np.asarray(ms["sigma"], float)
    scale = np.abs(expected).max()
    if model in ("EVE", "VVE") and G == 1:
        # mclust's MM starts from a singular matrix here and stops ~1e-4 from the MLE, on a side that depends
        # on LAPACK's sign choices; _mclust returns the MLE W / n
        np.testing.assert_allclose(full, scatter / N, rtol=1e-12)
        np.testing.assert_allclose(full, expected, rtol=1e-3, atol=1e-3 * scale)
    elif model == "VVE":
        # not mclust's msvve, which does not maximise (see _mclust): at least mclust's objective, mostly more
        assert info.converged, info
        gain = _expected_complete_loglik(full, nk, scatter) - _expected_complete_loglik(expected, nk, scatter)
        assert gain >= -1e-9 * N, gain
    elif spec.iterative:
        assert info.converged, info
        # the same algorithm from the same start: the same number of inner iterations as mclust
        assert info.iterations == abs(ms["inner_iterations"])
        np.testing.assert_allclose(full, expected, rtol=1e-6, atol=1e-8 * scale)
    else:
        np.testing.assert_allclose(full, expected, rtol=1e-9, atol=1e-12 * scale)


@pytest.mark.parametrize(("name", "model", "G"), CASES)
def test_loglik_df_bic_icl_equal_mclust(name: str, model: str, G: int) -> None:
    X, _ = load(name)
    fit = fit_ref(name, model, G)
    N, D = X.shape
    log_resp, loglik = log_resp_and_loglik(X, *params(fit))
    df = n_parameters(model, G, D)
    assert df == fit["df"]
    # the fitted parameters themselves: mclust's estep() loglik, bic() and icl() of them
    np.testing.assert_allclose(loglik, fit["estep_loglik"], rtol=1e-10)
    b = bic(loglik, df, N)
    np.testing.assert_allclose(b, fit["estep_bic"], rtol=1e-10)
    np.testing.assert_allclose(icl(b, log_map_sum(log_resp)), fit["estep_icl"], rtol=1e-10)
    # Mclust's reported loglik, BIC and ICL are those of the E-step before its final M-step: equal to EM's tolerance
    np.testing.assert_allclose(bic(fit["loglik"], df, N), fit["bic"], rtol=1e-13)
    np.testing.assert_allclose(icl(fit["bic"], fit["icl_log_map_sum"]), fit["icl"], rtol=1e-13)
    np.testing.assert_allclose(loglik, fit["loglik"], rtol=1e-4)
    # the MAP entropy term moves more than the loglik in one EM step
    np.testing.assert_allclose(icl(b, log_map_sum(log_resp)), fit["icl"], rtol=1e-3)


def test_na_cases_are_few() -> None:
    """(model, G) pairs for which mclust returned NA (7 in all, e.g. iris VEE G=5) are recorded with nulls, never G=1."""
    for case in NA_CASES:
        name, model, G = case.values
        assert G > 1
        assert all(fit_ref(name, model, G)[k] is None for k in ("pro", "mean", "sigma", "loglik", "df", "icl", "mstep"))
    assert len(NA_CASES) < len(CASES) // 10


# ------------------------------------------------------------------------------------------------
# The interface itself


def test_aliases_and_names() -> None:
    assert len(MODELS) == 14
    assert ALIASES == {"spherical": "VII", "diag": "VVI", "tied": "EEE", "full": "VVV"}
    assert resolve_model("vev") == "VEV"
    assert resolve_model("tied") == "EEE"
    with pytest.raises(ValueError, match="unknown covariance model 'XYZ'"):
        resolve_model("XYZ")
    assert {m for m, s in MODELS.items() if s.iterative} == {"VEI", "VEV", "VEE", "EVE", "VVE"}
    assert [m for m, s in MODELS.items() if s.family == "tied"] == ["EEE"]
    assert {m for m, s in MODELS.items() if s.representation == "spherical"} == {"EII", "VII"}
    assert {m for m, s in MODELS.items() if s.family == "diag"} == {"EII", "VII", "EEI", "VEI", "EVI", "VVI"}


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_alias_m_step_equals_weighted_covariances(alias: str) -> None:
    """The four daskem names give daskem's (scikit-learn's) covariances, from numpy's weighted np.cov."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3)) @ np.array([[1.0, 0.3, 0.0], [0.0, 2.0, 0.5], [0.0, 0.0, 0.7]])
    resp = rng.dirichlet(np.ones(3), size=200)
    per_k = np.stack([np.cov(X.T, aweights=resp[:, k], bias=True) for k in range(3)])
    nk = resp.sum(axis=0)
    expected = {
        "full": per_k,
        "tied": np.einsum("k,kij->ij", nk, per_k) / nk.sum(),
        "diag": np.diagonal(per_k, axis1=1, axis2=2),
        "spherical": np.diagonal(per_k, axis1=1, axis2=2).mean(axis=1),
    }[alias]
    nk, _, scatter = scatter_statistics(X, resp, MODELS[ALIASES[alias]].family)
    np.testing.assert_allclose(m_step_covariance(alias, nk, scatter), expected, rtol=1e-12)


def test_richer_scatter_accepted_and_reg_covar_on_the_diagonal() -> None:
    X, _ = load("iris")
    _, ref = load("iris")
    fit = fit_ref("iris", "VEV", 3)
    log_resp, _ = log_resp_and_loglik(X, *params(fit))
    nk, _, full = scatter_statistics(X, np.exp(log_resp), "full")
    for model, spec in MODELS.items():
        rich = m_step_covariance(model, nk, full)
        _, _, own = scatter_statistics(X, np.exp(log_resp), spec.family)
        np.testing.assert_allclose(rich, m_step_covariance(model, nk, own), rtol=1e-9)
        reg = m_step_covariance(model, nk, own, reg_covar=0.5)
        np.testing.assert_allclose(
            covariance_to_full(model, reg, 3, 4) - covariance_to_full(model, rich, 3, 4),
            np.broadcast_to(0.5 * np.eye(4), (3, 4, 4)),
            atol=1e-9,
        )


@pytest.mark.parametrize("model", ["VEI", "VEV", "EVE", "VVE"])
def test_previous_is_a_warm_start_to_the_same_optimum(model: str) -> None:
    X, _ = load("banknote")
    fit = fit_ref("banknote", model, 3)
    log_resp, _ = log_resp_and_loglik(X, *params(fit))
    nk, _, scatter = scatter_statistics(X, np.exp(log_resp), MODELS[model].family)
    cold, cold_info = m_step_covariance(model, nk, scatter, return_info=True, tol=1e-12)
    # mclust's fitted covariances are the previous M-step's output: a fixed point, so few iterations
    prev = np.asarray(fit["sigma"], float)
    if MODELS[model].representation == "diag":
        prev = np.diagonal(prev, axis1=1, axis2=2)
    warm, warm_info = m_step_covariance(model, nk, scatter, previous=prev, return_info=True, tol=1e-12)
    assert warm_info.iterations < cold_info.iterations
    # MM converges slowly along a flat target: equal to a small absolute tolerance
    np.testing.assert_allclose(warm, cold, rtol=1e-6, atol=1e-5 * np.abs(cold).max())


def test_collapsed_component_raises_linalg_error() -> None:
    nk = np.array([10.0, 3.0])
    scatter = np.stack([np.eye(3), np.diag([1.0, 1.0, 0.0])])
    for model in ("VEV", "EVE", "VVE", "EVV"):
        with pytest.raises(np.linalg.LinAlgError, match=model):
            m_step_covariance(model, nk, scatter)
    with pytest.raises(np.linalg.LinAlgError, match="VEI"):
        m_step_covariance("VEI", nk, np.diagonal(scatter, axis1=1, axis2=2))
    with pytest.raises(ValueError, match=r"shape \(K, D, D\)"):
        m_step_covariance("VVV", nk, np.ones((2, 3)))


def test_icl_sign_convention() -> None:
    log_resp = np.log(np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]]))
    assert log_map_sum(log_resp) == pytest.approx(np.log(0.9) + np.log(0.5) + np.log(0.8))
    assert icl(-100.0, log_map_sum(log_resp)) < -100.0
    assert bic(-10.0, 3, 100) == pytest.approx(-20.0 - 3 * np.log(100))
    assert _mclust.MCLUST_TOL == pytest.approx(1.490116e-08, rel=1e-6)


def _expected_complete_loglik(cov: np.ndarray, nk: np.ndarray, scatter: np.ndarray) -> float:
    """The M-step's objective: sum_k -n_k/2 log|Sigma_k| - tr(W_k Sigma_k^-1) / 2 (covariances full)."""
    _, logdet = np.linalg.slogdet(cov)
    return float(np.sum(-0.5 * nk * logdet - 0.5 * np.einsum("kij,kji->k", scatter, np.linalg.inv(cov))))


def _wdbc_statistics(G: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft counts and full scatters of wdbc (30 columns, standard deviations 0.003 .. 570) for a fixed soft split."""
    X, _ = load("wdbc")
    labels = np.random.default_rng(0).integers(G, size=X.shape[0])
    resp = np.eye(G)[labels] * 0.8 + 0.2 / G
    nk, _, scatter = scatter_statistics(X, resp, "full")
    return nk, scatter


@pytest.mark.parametrize("G", [2, 5])
def test_mm_stall_on_badly_scaled_data_is_finished_by_jacobi_rotations(G: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = "EVE"
    # wdbc's scatter eigenvalues span ~1e-5 .. 1e5: mclust's MM makes relative steps of ~1e-5 that do not
    # shrink, 10,000 iterations are not enough. The hybrid hands over to Jacobi rotations and converges.
    nk, scatter = _wdbc_statistics(G)
    cov, info = m_step_covariance(model, nk, scatter, return_info=True)
    assert info.converged, info
    assert info.iterations < _mclust.MM_ITER
    with monkeypatch.context() as m:
        m.setattr(_mclust, "MM_CHECK", 10**9)  # MM alone, as mclust
        stalled, stalled_info = m_step_covariance(model, nk, scatter, return_info=True, max_iter=2000)
    assert not stalled_info.converged
    full = covariance_to_full(model, cov, G, scatter.shape[1])
    stalled_full = covariance_to_full(model, stalled, G, scatter.shape[1])
    assert _expected_complete_loglik(full, nk, scatter) >= _expected_complete_loglik(stalled_full, nk, scatter)
    # warm from its own answer: a fixed point
    again, again_info = m_step_covariance(model, nk, scatter, previous=cov, return_info=True)
    assert again_info.converged and again_info.iterations <= 2
    np.testing.assert_allclose(again, cov, rtol=1e-6, atol=1e-8 * np.abs(cov).max())


@pytest.mark.parametrize("G", [2, 5])
def test_vve_on_badly_scaled_data_converges_to_a_fixed_point(G: int) -> None:
    nk, scatter = _wdbc_statistics(G)
    cov, info = m_step_covariance("VVE", nk, scatter, return_info=True)
    assert info.converged and info.iterations < 200, info
    again, again_info = m_step_covariance("VVE", nk, scatter, previous=cov, return_info=True)
    assert again_info.converged and again_info.iterations <= 2, again_info
    np.testing.assert_allclose(again, cov, rtol=1e-6, atol=1e-8 * np.abs(cov).max())


@pytest.mark.parametrize("model", ["EVE", "VVE"])
@pytest.mark.parametrize("name", ["banknote", "thyroid"])
def test_jacobi_orientation_maximises_the_m_step_objective(name: str, model: str) -> None:
    # From mclust's own M-step inputs, the Jacobi rotations alone (no MM) reach at least mclust's objective:
    # more for EVE by what MM's stopping rule leaves, far more for VVE, whose Fortran MM (mevve) weights the
    # orientation's terms without the volumes and so does not maximise it (thyroid G=3: +79 nats).
    X, _ = load(name)
    for G in range(2, 6):
        fit = fit_ref(name, model, G)
        log_resp, _ = log_resp_and_loglik(X, *params(fit))
        nk, _, scatter = scatter_statistics(X, np.exp(log_resp), "full")
        Dt, sweeps, err = _mclust._orientation_jacobi(model, scatter, nk, np.eye(X.shape[1]), 1e-12, 1000)
        assert err <= 1e-12 and sweeps < 200
        np.testing.assert_allclose(Dt @ Dt.T, np.eye(X.shape[1]), atol=1e-12)
        shape, _ = _mclust._eve_vve_shapes(model, Dt, scatter, nk)
        diag = np.einsum("ij,kjl,il->ki", Dt, scatter, Dt)
        if model == "EVE":
            lam = np.full(G, np.sum(diag / shape) / (nk.sum() * X.shape[1]))
        else:
            lam = np.exp(np.mean(np.log(diag / nk[:, None]), axis=1))
        ours = np.einsum("ji,kj,jl->kil", Dt, lam[:, None] * shape, Dt)
        theirs = np.asarray(fit["mstep"]["sigma"], float)
        gain = _expected_complete_loglik(ours, nk, scatter) - _expected_complete_loglik(theirs, nk, scatter)
        assert gain >= -1e-9 * abs(_expected_complete_loglik(theirs, nk, scatter)), (G, gain)
        if model == "VVE":
            assert gain > 0.1, (G, gain)


def test_round_robin_pairs_every_pair_once() -> None:
    for d in (2, 3, 6, 7, 30):
        rounds = _mclust._round_robin(d)
        pairs = [(int(a), int(b)) for i, j in rounds for a, b in zip(i, j)]
        assert sorted(pairs) == [(a, b) for a in range(d) for b in range(a + 1, d)]
        for i, j in rounds:  # disjoint within a round
            assert len(set(i) | set(j)) == 2 * len(i)
