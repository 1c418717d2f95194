"""SQUAREM acceleration (daskem._squarem): the state machine, its stopping rule and checkpoints.

Statistics come from daskem._gaussian.chunk_statistics on in-memory data and
the M-step from daskem._gaussian.m_step; plain mode is compared with the
fit loop's plain Run (daskem._fitloop.iterate) on a dask array.
"""

from __future__ import annotations

import io
import json
import math

import dask
import dask.array as da
import numpy as np
import pytest

from daskem import _fitloop
from daskem._gaussian import GaussianParams, chunk_statistics, m_step
from daskem._gaussian_model import GaussianModel
from daskem._squarem import (
    EMAccelerator,
    aitken_remaining,
    drive,
    em_remaining,
    probe_rate,
    surrogate_remaining,
)

REG = 1e-6
TYPES = ("full", "tied", "diag", "spherical")

# the extrapolation's parameterisation is the model's own (the machine knows no model)
gaussian_to_vector = GaussianModel().to_vector
gaussian_from_vector = GaussianModel().from_vector


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def params_from_labels(X: np.ndarray, lab: np.ndarray, k: int, ctype: str) -> GaussianParams:
    """The Gaussian mixture of hard labels (a start for EM)."""
    d = X.shape[1]
    nk = np.bincount(lab, minlength=k).astype(np.float64)
    means = np.stack([X[lab == j].mean(axis=0) for j in range(k)])
    covs = np.stack([np.cov(X[lab == j].T, bias=True).reshape(d, d) + REG * np.eye(d) for j in range(k)])
    cov = {
        "full": covs,
        "tied": np.einsum("k,kij->ij", nk, covs) / nk.sum(),
        "diag": np.diagonal(covs, axis1=1, axis2=2).copy(),
        "spherical": np.diagonal(covs, axis1=1, axis2=2).mean(axis=1),
    }[ctype]
    return GaussianParams.from_covariances(nk / nk.sum(), means, cov, ctype)


def random_start(X: np.ndarray, k: int, ctype: str, seed: int) -> GaussianParams:
    """Nearest of k random rows, then the Gaussians of those labels."""
    rng = np.random.default_rng(seed)
    for _ in range(100):
        seeds = X[rng.choice(len(X), size=k, replace=False)]
        lab = np.argmin(((X[:, None, :] - seeds[None]) ** 2).sum(-1), axis=1)
        if np.bincount(lab, minlength=k).min() >= X.shape[1] + 1:
            return params_from_labels(X, lab, k, ctype)
    raise AssertionError("no usable start")


def gaussian_machine(
    params: GaussianParams, method: str | None, tol: float, max_iter: int, reg: float = REG
) -> EMAccelerator:
    def mstep(stats, p):
        new, empty = m_step(stats, p, reg)
        return new, bool(empty.any())

    return EMAccelerator(
        params,
        m_step=mstep,
        objective=lambda s: s.mean_loglik,
        to_vector=gaussian_to_vector,
        from_vector=gaussian_from_vector,
        method=method,
        tol=tol,
        max_iter=max_iter,
    )


def stats_fn(X: np.ndarray):
    # as EM's passes: the model's block rows (the kernel's default), no ICL term
    return lambda plist: chunk_statistics(X, plist, log_map=False)


def trajectory(X: np.ndarray, m: EMAccelerator) -> list[tuple[int, float]]:
    """Drive one machine to its end; (passes, lower_bound) after every pass."""
    out = []
    while (p := m.proposal()) is not None:
        m.receive(chunk_statistics(X, [p], log_map=False)[0])
        out.append((m.n_iter, m.lower_bound))
    return out


def sort_components(p: GaussianParams) -> dict[str, np.ndarray]:
    order = np.lexsort(p.means.T[::-1])
    out = {"weights": p.weights[order], "means": p.means[order]}
    out["covariances"] = p.covariances if p.covariance_type == "tied" else p.covariances[order]
    return out


def adversarial(seed: int = 0) -> np.ndarray:
    """Two overlapping blobs, a near-singular (flat) component and a tiny one, in 3-D."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(1500, 3)) + [0.0, 0.0, 0.0]
    b = rng.normal(size=(1200, 3)) * [1.5, 0.7, 1.0] + [1.0, 0.5, 0.0]
    flat = rng.normal(size=(600, 3)) * [3.0, 1e-3, 1e-3] + [6.0, -4.0, 2.0]
    flat[:, 1] += 0.3 * flat[:, 0]
    tiny = rng.normal(size=(12, 3)) * 0.2 + [-6.0, 6.0, -3.0]
    return np.concatenate([a, b, flat, tiny])


def overlapping_2d(n: int = 4000, seed: int = 1, noise: float = 0.8) -> np.ndarray:
    """Three overlapping 2-D Gaussians: EM converges slowly (``noise=0.8``: very slowly)."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(3, size=n)
    centres = np.array([[0.0, 0.0], [1.2, 0.4], [0.3, 1.3]])
    return centres[lab] + rng.normal(size=(n, 2)) * noise


# --------------------------------------------------------------------------
# stopping estimates
# --------------------------------------------------------------------------


def test_aitken_remaining_on_a_geometric_sequence_and_its_guards():
    # L_t = 1 - 0.5**t: L_inf - L_2 = 0.25
    assert aitken_remaining([0.0, 0.5, 0.75]) == pytest.approx(0.25)
    assert aitken_remaining([0.0, 0.0, 0.0]) == 0.0  # nothing moved
    assert aitken_remaining([0.0, 0.5, 0.5 - 1e-15]) == 0.0  # a round-off decrease: stalled
    assert aitken_remaining([0.0, 0.0, 1e-9]) == math.inf  # rate undefined (division by 0)
    assert aitken_remaining([0.5, 0.0, 0.1]) == math.inf  # negative rate
    assert aitken_remaining([0.0, 0.1, 0.3]) == math.inf  # rate >= 1: not converging yet
    assert aitken_remaining([0.0, float("nan"), 1.0]) == math.inf
    assert em_remaining(1e-3, 0.9) == pytest.approx(1e-3 * 0.81 / 0.19)
    assert em_remaining(1e-3, 1.0) == math.inf
    assert em_remaining(0.0, 0.5) == 0.0


# --------------------------------------------------------------------------
# the machine on a toy map (no Gaussians): step bounds, acceptance
# --------------------------------------------------------------------------


def toy_machine(rate: float, method="squarem", reject_extrapolated=False, tol=1e-14, max_iter=1000, perturb=None):
    """x -> t + rate (x - t), L(x) = -||x - t||^2; stats are (params, proposed at stage C).

    ``perturb(n_calls, is_extrapolated)`` says when the M-step reports a re-seeding.
    """
    target = np.array([1.0, -2.0, 3.0])
    calls = [0]

    def objective(stats):
        p, is_ext = stats
        if reject_extrapolated and is_ext:
            return -math.inf
        return -float(((p - target) ** 2).sum())

    def mstep(stats, p):
        calls[0] += 1
        return target + rate * (p - target), bool(perturb and perturb(calls[0], stats[1]))

    return vector_machine(np.zeros(3), mstep, objective, method, tol, max_iter), target


def vector_machine(x0, mstep, objective, method, tol, max_iter) -> EMAccelerator:
    """A machine whose parameters are a plain vector (its own extrapolation coordinates)."""
    return EMAccelerator(
        x0,
        m_step=mstep,
        objective=objective,
        to_vector=lambda p: p,
        from_vector=lambda v, like: v.copy(),
        method=method,
        tol=tol,
        max_iter=max_iter,
    )


def run_toy(m):
    stages, bounds = [], []
    while (p := m.proposal()) is not None:
        stages.append(m.stage)
        m.receive((p, m.stage == "C"))
        bounds.append(m.step_max)
    return stages, bounds


def test_squarem_on_a_linear_map_grows_the_bound_until_it_lands_on_the_fixed_point():
    # x -> t + 0.99 (x - t): plain EM needs ~3000 passes for 1e-12; S3 gives alpha = 1/(1 - 0.99) = 100,
    # which the bound reaches after 1 -> 4 -> 16 -> 64 -> 256, and an unclamped step lands exactly
    m, target = toy_machine(0.99)
    stages, bounds = run_toy(m)
    plain, _ = toy_machine(0.99, method=None, max_iter=10_000)
    run_toy(plain)
    assert m.converged and plain.converged
    # first cycle: alpha clamped to 1 = step_max, the two-step point, the bound grows; then every
    # extrapolation sits at the bound and is accepted until the bound exceeds 100
    assert bounds[:14] == [1.0, 4.0, 4.0, 4.0, 16.0, 16.0, 16.0, 64.0, 64.0, 64.0] + [256.0] * 4
    assert np.allclose(m.params, target, atol=1e-10)
    # on the fixed point (to round-off) after 14 passes, without a rejection before; plain EM needs > 1500
    assert m.history[13] > -1e-20 and m.n_rejected <= 1
    assert m.n_iter <= 20 and plain.n_iter > 1500
    assert all(b >= a for a, b in zip(m.history, m.history[1:]))


def test_rejected_extrapolations_fall_back_to_the_two_step_point_and_shrink_the_bound():
    # every extrapolated point has L = -inf: the run must be plain EM in pairs of steps, with one wasted pass
    # per cycle, and the bound may never stay above step_max0 * mstep
    m, target = toy_machine(0.9, reject_extrapolated=True, max_iter=60)
    stages, bounds = run_toy(m)
    assert m.n_rejected == m.n_extrapolations > 5
    assert max(bounds) <= 4.0
    assert all(b >= a for a, b in zip(m.history, m.history[1:]))
    assert all(math.isfinite(v) for v in m.history)
    # the rejections cost passes: the parameters are those of plain EM after (2/3 of 60) steps at most
    em = np.zeros(3)
    n_em = stages.count("A") + stages.count("B")
    for _ in range(n_em):
        em = target + 0.9 * (em - target)
    assert np.allclose(m.params, em)


def test_a_perturbed_m_step_restarts_the_cycle_and_rejects_an_extrapolation():
    # every extrapolated point's M-step re-seeds: all extrapolations are rejected (not one is kept)
    m, _ = toy_machine(0.9, perturb=lambda n, ext: ext, max_iter=40)
    stages, _ = run_toy(m)
    assert m.n_extrapolations > 5 and m.n_rejected == m.n_extrapolations
    assert all(b >= a for a, b in zip(m.history, m.history[1:]))
    # a re-seeding at a plain step (the 4th M-step: pass B of the second cycle): that cycle makes no
    # extrapolation, the next one starts at the re-seeded point, and the stopping memory is cleared
    m, _ = toy_machine(0.9, perturb=lambda n, ext: n == 4, max_iter=8)
    stages, _ = run_toy(m)
    assert stages == ["A", "B", "A", "B", "A", "B", "C", "A"]
    assert m.n_perturbed == 1


def test_before_aitken_a_negligible_em_step_to_a_cycle_start_ends_the_run_there():
    # x -> t + 1e-5 (x - t) from 0: the first cycle gains 14 (no stop; alpha ~ 1, so no extrapolation) and
    # the next cycle's start x2 gains 1.4e-9 over x1, below tol / 10,000 = 1e-7: the run stops at that
    # pass (3 passes), not after the cycle's second one (4), with x2's EM image as its result
    m, target = toy_machine(1e-5, tol=1e-3)
    stages, _ = run_toy(m)
    assert stages == ["A", "B", "A"] and m.converged and m.n_iter == 3
    assert np.allclose(m.params, target, atol=1e-12)
    # a gain above that threshold goes on to the cycle's second pass (rate 1e-3: x2 gains 1.4e-5)
    m, _ = toy_machine(1e-3, tol=1e-3)
    stages, _ = run_toy(m)
    assert stages[:4] == ["A", "B", "A", "B"] and m.converged


def _linear_map(rates, target):
    rates, target = np.asarray(rates, float), np.asarray(target, float)
    return lambda x: target + rates * (x - target)


def test_probe_rate_finds_the_slowest_mode_of_a_linear_map():
    # modes 0.9, 0.5 and 0.1, the fast ones larger at the start: the step ratios climb from 0.27 towards
    # 0.9 as the fast modes die out; two successive ratios agree within 5% at 0.84 and 0.88 (7 steps)
    target = np.array([1.0, -2.0, 3.0])
    em = _linear_map([0.9, 0.5, 0.1], target)
    steps = []

    def counted(x):
        steps.append(x)
        return em(x)

    rate = probe_rate(target + 1.0, counted, lambda p: p)
    assert 0.85 <= rate <= 0.9 and len(steps) == 7
    # within max_steps the estimate is what the steps show, from below: 3 steps see 0.53
    assert 0.5 < probe_rate(target + 1.0, em, lambda p: p, max_steps=3) < 0.6
    # the norms are taken in the metric ``scale`` gives: weighting the slow coordinate away leaves 0.5
    assert probe_rate(target + 1.0, em, lambda p: p, scale=lambda p: np.array([0.0, 1.0, 1.0])) == pytest.approx(
        0.5, rel=1e-3
    )
    # a map that lands on its fixed point at once has nothing left to converge: 0
    assert probe_rate(target + 1.0, lambda x: target.copy(), lambda p: p) == 0.0
    # a step that is not EM's own (a component emptied, an ill-defined M-step): no estimate
    assert probe_rate(target + 1.0, lambda x: None, lambda p: p) is None


def test_a_prior_rate_ends_the_run_after_its_first_cycle_when_it_bounds_the_remaining_gain():
    # x -> t + 1e-3 (x - t) from 0 (L = -||x - t||^2 = -14): the first cycle gains 14 (1 - 1e-6). Without a
    # prior the run waits for a later cycle (4 passes, the test above); with EM's true rate as the prior the
    # bound gain * rate^2 / (1 - rate^2) = 1.4e-5 is below tol / 30 after the cycle's second pass: 2 passes,
    # the result x2 = M(x1)
    for prior, stages_expected in ((1e-3, ["A", "B"]), (None, ["A", "B", "A", "B"])):
        m, target = toy_machine(1e-3, tol=1e-3)
        m.prior_rate = prior
        stages, _ = run_toy(m)
        assert stages == stages_expected and m.converged
        assert np.allclose(m.params, target, atol=1e-8)
    # a prior that says EM is slow does not end the first cycle: the bound 14 * 0.98 / 0.02 is far above
    # tol / 30 (the second cycle's gains, 1e-11, end the run by the rule without a prior)
    m, _ = toy_machine(1e-3, tol=1e-3)
    m.prior_rate = 0.99
    stages, _ = run_toy(m)
    assert stages == ["A", "B", "A", "B"] and m.converged
    # the prior is part of the machine's state
    m, _ = toy_machine(0.5)
    m.prior_rate = 0.25
    arrays, meta = m.state(lambda p: ({"x": p}, {}))
    back = EMAccelerator.from_state(
        arrays,
        json.loads(json.dumps(meta)),
        lambda a, meta: a["x"],
        m_step=m.m_step,
        objective=m.objective,
        to_vector=m.to_vector,
        from_vector=m.from_vector,
    )
    assert back.prior_rate == 0.25


@pytest.mark.parametrize("ctype", ["full", "tied", "diag", "spherical", "VEV", "EEI"])
def test_surrogate_is_the_expected_complete_loglik_and_bounds_the_step(ctype):
    """EM's surrogate from the statistics of one pass equals ``sum_nk q_nk log(pi_k N(x_n | k))`` at any
    parameters (the constant ``n D log(2 pi) / 2`` left out), and its gain is a lower bound of the
    log-likelihood's (Jensen): ``L(x1) - L(x0) >= Q(x1 | x0) - Q(x0 | x0) >= 0``."""
    from daskem._gaussian import estimate_weighted_log_prob, expected_complete_loglik
    from daskem._numeric import logsumexp_rows

    X = overlapping_2d(2000, noise=0.6)
    model = GaussianModel(reg_covar=REG)
    lay = {"VEV": "full", "EEI": "diag"}.get(ctype, ctype)
    base = random_start(X, 3, lay, 0)
    x0 = GaussianParams.from_covariances(base.weights, base.means, base.covariances, ctype) if lay != ctype else base
    x0 = m_step(chunk_statistics(X, [x0], log_map=False)[0], x0, REG)[0]  # a model of the structure
    s0 = chunk_statistics(X, [x0], log_map=False)[0]
    x1 = m_step(s0, x0, REG)[0]
    lp = estimate_weighted_log_prob(X, x0)
    q = np.exp(lp - logsumexp_rows(lp)[:, None])
    for p in (x0, x1):
        direct = float((q * estimate_weighted_log_prob(X, p)).sum()) + X.size / 2 * math.log(2 * math.pi)
        assert expected_complete_loglik(s0, x0, p) == pytest.approx(direct, rel=1e-12)
    gain = chunk_statistics(X, [x1], log_map=False)[0].mean_loglik - s0.mean_loglik
    q_gain = model.surrogate_gain(s0, x0, x1)
    assert 0.0 < q_gain <= gain + 1e-13
    assert math.isnan(GaussianModel(hard=True).surrogate_gain(s0, x0, x1))


@pytest.mark.parametrize("ctype", ["full", "tied", "diag", "spherical"])
def test_the_surrogate_gain_with_missing_entries_bounds_the_step(ctype):
    """With ``missing='marginalize'`` the statistics hold the conditional moments of the missing entries,
    so the same surrogate is the expected complete-data log-likelihood and its gain a lower bound of the
    observed-data log-likelihood's, every step."""
    rng = np.random.default_rng(0)
    X = np.concatenate([overlapping_2d(2000, noise=0.6), rng.normal(size=(2000, 1))], axis=1)
    p = random_start(X, 3, ctype, 0)
    X[rng.random(X.shape) < 0.2] = np.nan
    model = GaussianModel(reg_covar=REG, missing="marginalize")
    for _ in range(3):
        s0 = model.statistics(X, [p], None)[0]
        x1 = m_step(s0, p, REG)[0]
        gain = model.statistics(X, [x1], None)[0].mean_loglik - s0.mean_loglik
        assert 0.0 < model.surrogate_gain(s0, p, x1) <= gain
        p = x1


@pytest.mark.parametrize("ctype", ["full", "tied", "diag", "spherical"])
def test_surrogate_remaining_after_one_step_is_the_gain_rule_without_its_pass(ctype):
    """Along EM's slowest mode (rate ``c``) one step gains ``(1 + c)`` times the surrogate's gain, so
    :func:`surrogate_remaining` (the surrogate's gain, known after the pass at ``x0``) and
    :func:`em_remaining` (the log-likelihood's, known only after the pass at ``x1``) give one estimate of
    ``L* - L(x1)``; a factor ``1 / (1 - c^2)`` in place of ``1 / (1 - c)`` would be off by ``1 + c``
    (about 1.9 here). Where the slowest mode dominates (tied) both are the true gap to within 1%."""
    X = overlapping_2d(4000, noise=0.6)
    model = GaussianModel(reg_covar=REG)
    p = random_start(X, 3, ctype, 0)
    m = gaussian_machine(p, "squarem", 1e-15, 5000)
    trajectory(X, m)
    x0 = p
    for _ in range(60):  # plain EM into its slow regime
        x0 = m_step(chunk_statistics(X, [x0], log_map=False)[0], x0, REG)[0]
    s0 = chunk_statistics(X, [x0], log_map=False)[0]
    x1 = m_step(s0, x0, REG)[0]
    gain = chunk_statistics(X, [x1], log_map=False)[0].mean_loglik - s0.mean_loglik

    def em_map(t):
        return m_step(chunk_statistics(X, [t], log_map=False)[0], t, REG)[0]

    c = probe_rate(x0, em_map, model.to_vector, model.vector_scale, max_steps=30)
    assert 0.9 < c < 1.0
    by_surrogate = surrogate_remaining(model.surrogate_gain(s0, x0, x1), c)
    assert by_surrogate == pytest.approx(em_remaining(gain, c), rel=0.01)
    if ctype == "tied":
        assert by_surrogate == pytest.approx(m.lower_bound - (s0.mean_loglik + gain), rel=0.01)
    # the guards: no rate below 1, no finite gain -> inf; nothing gained -> 0
    assert surrogate_remaining(1e-3, 1.0) == math.inf and surrogate_remaining(math.nan, 0.5) == math.inf
    assert surrogate_remaining(0.0, 0.5) == 0.0 and surrogate_remaining(1e-3, 0.0) == 0.0


def test_a_prior_rate_with_the_surrogate_ends_the_run_at_its_first_pass():
    """With ``surrogate_gain`` and a ``prior_rate`` of 0 the machine stops after its first pass, with the
    result ``M(x0)`` and EM's lower bound there (above the measured ``L(x0)``, at most ``L(M(x0))``); a
    prior near 1, or no surrogate, goes on."""
    X = overlapping_2d(2000, noise=0.6)
    model = GaussianModel(reg_covar=REG)
    p = random_start(X, 3, "full", 0)
    ends = {}
    for prior, surrogate in ((0.0, model.surrogate_gain), (0.99, model.surrogate_gain), (0.0, None)):
        m = gaussian_machine(p, "squarem", 1e-3, 100)
        m.prior_rate, m.surrogate_gain = prior, surrogate
        m.receive(chunk_statistics(X, [m.proposal()], log_map=False)[0])
        ends[prior, surrogate is None] = m.done
        if m.done:
            assert m.converged and m.n_iter == 1 and len(m.history) == 1
            x1 = m_step(chunk_statistics(X, [p], log_map=False)[0], p, REG)[0]
            assert np.array_equal(m.params.means, x1.means)
            assert m.history[0] < m.lower_bound <= chunk_statistics(X, [x1], log_map=False)[0].mean_loglik + 1e-13
    assert ends == {(0.0, False): True, (0.99, False): False, (0.0, True): False}


def test_max_iter_counts_every_pass_in_both_modes():
    for method in (None, "squarem"):
        m, _ = toy_machine(0.999, method=method, max_iter=7)
        run_toy(m)
        assert m.n_iter == 7 and m.done and not m.converged
    m, _ = toy_machine(0.5, max_iter=0)
    assert m.proposal() is None


# --------------------------------------------------------------------------
# (a) monotone accepted log-likelihood on adversarial data
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ctype", TYPES)
def test_accepted_loglik_never_decreases_on_adversarial_data(ctype):
    X = adversarial()
    n_rejected = 0
    for seed in range(3):
        start = random_start(X, 4, ctype, seed)
        plain = gaussian_machine(start, None, 1e-8, 500)
        trajectory(X, plain)
        m = gaussian_machine(start, "squarem", 1e-8, 500)
        trajectory(X, m)
        h = np.array(m.history)
        # round-off of a mean log-likelihood of 3312 rows: the sum's last bits
        assert np.diff(h).min() >= -1e-11 * max(1.0, abs(h[-1])), (seed, np.diff(h).min())
        assert m.lower_bound == h[-1] == max(h)
        assert m.converged
        # never ends below plain EM from the same start at the same tol
        assert m.lower_bound >= plain.lower_bound - 1e-9, (seed, m.lower_bound, plain.lower_bound)
        n_rejected += m.n_rejected
        assert m.n_extrapolations > 0
    # the guard was exercised on this data (else this test shows nothing about it); with one variance
    # per component no extrapolation of these starts overshoots
    if ctype != "spherical":
        assert n_rejected > 0


# --------------------------------------------------------------------------
# (b) same optimum as plain EM, (c) far fewer passes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ctype", TYPES)
def test_accelerated_em_ends_at_plain_em_optimum(ctype):
    # reg_covar moves EM's fixed point off the likelihood's maximum (by ~reg / variance), and SQUAREM,
    # which keeps any point of higher likelihood, drifts toward the maximum: compare with a negligible one
    X = overlapping_2d(2000, noise=0.4)
    start = random_start(X, 3, ctype, 0)
    plain = gaussian_machine(start, None, 0.0, 3000, reg=1e-12)  # tol 0: run to the cap
    trajectory(X, plain)
    assert plain.history[-1] - plain.history[-2] < 1e-14  # plain EM is at its fixed point
    m = gaussian_machine(start, "squarem", 1e-13, 3000, reg=1e-12)
    trajectory(X, m)
    assert m.converged and m.n_iter < 150
    a, b = sort_components(plain.params), sort_components(m.params)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6, err_msg=key)
    assert m.lower_bound == pytest.approx(plain.lower_bound, abs=1e-11)


@pytest.mark.parametrize("ctype", ["full", "diag"])
def test_accelerated_em_needs_far_fewer_passes_to_reach_the_optimum(ctype):
    X = overlapping_2d()
    start = random_start(X, 3, ctype, 2)
    plain = trajectory(X, gaussian_machine(start, None, 1e-12, 5000))
    sq = trajectory(X, gaussian_machine(start, "squarem", 1e-12, 5000))
    lstar = max(plain[-1][1], sq[-1][1])
    n_plain = next(n for n, ll in plain if ll >= lstar - 1e-4)
    n_sq = next(n for n, ll in sq if ll >= lstar - 1e-4)
    print(f"\n{ctype}: passes to L* - 1e-4: plain {n_plain}, SQUAREM {n_sq}, ratio {n_sq / n_plain:.2f}")
    assert n_plain >= 50  # a slowly converging case, or the comparison says nothing
    assert n_sq <= 0.6 * n_plain


# --------------------------------------------------------------------------
# (d) plain mode is the fit loop's plain Run, exactly
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ctype", ["full", "diag"])
def test_plain_mode_equals_the_fit_loops_plain_run_exactly(ctype):
    X = overlapping_2d(3000)
    starts = [random_start(X, 3, ctype, s) for s in (0, 1)]
    model = GaussianModel(reg_covar=REG)
    runs = [_fitloop.Run(p) for p in starts]
    with dask.config.set(scheduler="synchronous"):
        passes = _fitloop.Passes(da.from_array(X, chunks=(len(X), 2)), model)
        _fitloop.iterate(passes, model, runs, tol=1e-5, max_iter=300)
    machines = [gaussian_machine(p, None, 1e-5, 300) for p in starts]
    drive(machines, stats_fn(X))
    for r, m in zip(runs, machines):
        assert r.history == m.history  # bit for bit
        assert r.n_iter == m.n_iter and r.converged == m.converged and r.lower_bound == m.lower_bound
        for key, a in r.params.to_arrays().items():
            np.testing.assert_array_equal(m.params.to_arrays()[key], a)
    assert runs[0].n_iter != runs[1].n_iter or runs[0].history != runs[1].history


# --------------------------------------------------------------------------
# (e) checkpoint: export, restore, continue = uninterrupted
# --------------------------------------------------------------------------


def _roundtrip(m: EMAccelerator, model: GaussianModel) -> EMAccelerator:
    arrays, meta = m.state(model.params_state)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(json.dumps(meta, allow_nan=False))
    fresh = gaussian_machine(m.points["x0"], m.method, m.tol, m.max_iter)
    return EMAccelerator.from_state(
        arrays,
        meta,
        model.params_from_state,
        m_step=fresh.m_step,
        objective=fresh.objective,
        to_vector=gaussian_to_vector,
        from_vector=gaussian_from_vector,
    )


@pytest.mark.parametrize("ctype", ["full", "spherical"])
def test_state_export_restore_mid_cycle_gives_the_identical_run(ctype):
    X = overlapping_2d(2000)
    start = random_start(X, 3, ctype, 3)
    model = GaussianModel(reg_covar=REG)
    ref = gaussian_machine(start, "squarem", 1e-10, 400)
    ref_traj, stages = [], []
    while (p := ref.proposal()) is not None:
        stages.append(ref.stage)
        ref.receive(chunk_statistics(X, [p], log_map=False)[0])
        ref_traj.append((ref.n_iter, ref.lower_bound))
    assert ref.n_extrapolations >= 3
    # kill before the first three passes of each stage (and never after the last one)
    kills = sorted({i for st in "ABCD" for i in [j for j, s in enumerate(stages) if s == st][:3] if i > 0})
    seen = set()
    for kill_at in kills:
        m = gaussian_machine(start, "squarem", 1e-10, 400)
        for _ in range(kill_at):
            m.receive(chunk_statistics(X, [m.proposal()], log_map=False)[0])
        seen.add(m.stage)
        before = m.state(model.params_state)
        m = _roundtrip(m, model)
        after = m.state(model.params_state)
        assert after[1] == before[1]  # every field restored
        assert after[0].keys() == before[0].keys()
        for key, a in before[0].items():
            np.testing.assert_array_equal(after[0][key], a, err_msg=key)
        rest = trajectory(X, m)
        assert ref_traj[kill_at:] == rest
        assert m.history == ref.history and m.step_max == ref.step_max
        for key, a in ref.params.to_arrays().items():
            np.testing.assert_array_equal(m.params.to_arrays()[key], a)
    assert seen == {"A", "B", "C", "D"}  # killed in every stage of a cycle


def test_state_of_a_plain_run_restores_too():
    X = overlapping_2d(1000)
    start = random_start(X, 3, "diag", 0)
    model = GaussianModel(reg_covar=REG)
    ref = gaussian_machine(start, None, 1e-8, 200)
    trajectory(X, ref)
    m = gaussian_machine(start, None, 1e-8, 200)
    for _ in range(5):
        m.receive(chunk_statistics(X, [m.proposal()], log_map=False)[0])
    m = _roundtrip(m, model)
    trajectory(X, m)
    assert m.history == ref.history and m.n_iter == ref.n_iter


# --------------------------------------------------------------------------
# (f) the Gaussian parameterisation
# --------------------------------------------------------------------------


def _assert_valid(p: GaussianParams) -> None:
    assert np.isfinite(p.weights).all() and (p.weights > 0).all()
    assert p.weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.isfinite(p.means).all()
    ct = p.covariance_type
    if ct in ("full", "tied"):
        covs = p.covariances if ct == "full" else p.covariances[None]
        pcs = p.precisions_cholesky if ct == "full" else p.precisions_cholesky[None]
        for cov, u in zip(covs, pcs):
            np.linalg.cholesky(cov)  # positive definite
            np.testing.assert_allclose(cov, cov.T, rtol=0, atol=1e-12 * np.abs(cov).max())
            assert np.allclose(np.tril(u, -1), 0.0) and (np.diag(u) > 0).all()
            # precision = U U^T is the inverse of the covariance (to the accuracy its condition allows)
            cond = np.linalg.cond(cov)
            np.testing.assert_allclose(u.T @ cov @ u, np.eye(len(u)), atol=1e-14 * cond + 1e-12)
    else:
        assert (p.covariances > 0).all()
        np.testing.assert_allclose(p.precisions_cholesky**2 * p.covariances, 1.0, rtol=1e-12)


@pytest.mark.parametrize("ctype", TYPES)
def test_vector_roundtrip_and_every_extrapolated_point_is_a_valid_model(ctype):
    X = adversarial()
    p0 = random_start(X, 4, ctype, 0)
    p1 = m_step(chunk_statistics(X, [p0], log_map=False)[0], p0, REG)[0]
    p2 = m_step(chunk_statistics(X, [p1], log_map=False)[0], p1, REG)[0]
    for p in (p0, p1, p2):
        v = gaussian_to_vector(p)
        back = gaussian_from_vector(v, p)
        for key, a in p.to_arrays().items():
            np.testing.assert_allclose(back.to_arrays()[key], a, rtol=1e-10, atol=1e-14, err_msg=key)
        np.testing.assert_allclose(gaussian_to_vector(back), v, rtol=1e-12, atol=1e-12)
    v0, v1, v2 = (gaussian_to_vector(p) for p in (p0, p1, p2))
    r, v = v1 - v0, v2 - 2 * v1 + v0
    valid = []
    for alpha in (1.0, 1.5, 4.0, 16.0, 64.0, 256.0, 1024.0, 1e5, 1e8):
        q = gaussian_from_vector(v0 + 2 * alpha * r + alpha**2 * v, p0)
        valid.append(q is not None)
        if q is not None:
            _assert_valid(q)
            ll = chunk_statistics(X, [q], log_map=False)[0].mean_loglik
            assert not math.isnan(ll)
    # small steps always give a model; the largest overflow (None: the machine rejects them)
    assert valid[:3] == [True] * 3 and not valid[-1]
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = gaussian_from_vector(v0 + rng.normal(scale=3.0, size=v0.shape), p0)
        if q is not None:
            _assert_valid(q)
    assert gaussian_from_vector(np.full_like(v0, np.nan), p0) is None
    huge = v0.copy()
    k, d = p0.means.shape
    huge[k + k * d] = 1e4  # the first log-diagonal entry of a precision factor: exp(1e4)
    assert gaussian_from_vector(huge, p0) is None
    assert gaussian_from_vector(v0[:-1], p0) is None  # a vector of another shape
    # a structure stored in another's layout (internal k-means): its constraints are no coordinates
    km = GaussianParams.from_covariances(p0.weights, p0.means, np.ones(len(p0.weights)), "kmeans")
    assert gaussian_from_vector(gaussian_to_vector(km), km) is None


@pytest.mark.parametrize("ctype", ["full", "diag"])
def test_step_lengths_in_the_models_metric_do_not_depend_on_the_units(ctype):
    """X and X diag(s) + b from corresponding starts: with the model's ``vector_scale`` the same path (passes,
    accept/reject decisions, log-likelihoods up to the Jacobian term); with Euclidean norms another path."""
    X = overlapping_2d(3000, noise=0.6)
    s, b = np.array([1e-3, 1e3]), np.array([5.0, -2e4])
    Y = X * s + b
    rng = np.random.default_rng(1)
    lab = np.argmin(((X[:, None, :] - X[rng.choice(len(X), 3, replace=False)][None]) ** 2).sum(-1), axis=1)
    p = params_from_labels(X, lab, 3, ctype)
    cov = p.covariances * (np.outer(s, s) if ctype == "full" else s**2)
    q = GaussianParams.from_covariances(p.weights, p.means * s + b, cov, ctype)
    jac = np.log(s).sum()
    runs = {}
    for name, data, start, scale in (
        ("x", X, p, GaussianModel().vector_scale),
        ("y", Y, q, GaussianModel().vector_scale),
        ("y_euclid", Y, q, None),
    ):
        m = gaussian_machine(start, "squarem", tol=1e-9, max_iter=400, reg=0.0)
        m.scale = scale
        runs[name] = (trajectory(data, m), m)
    (tx, mx), (ty, _), (te, _) = runs["x"], runs["y"], runs["y_euclid"]
    assert mx.n_extrapolations > 3
    # the first 30 passes (later, round-off of sums over the offset columns may flip a decision)
    n = 30
    assert len(tx) > n and len(ty) > n and len(te) > n
    np.testing.assert_allclose([v + jac for _, v in ty[:n]], [v for _, v in tx[:n]], rtol=1e-9)
    # Euclidean norms mix units: another sequence of steps
    assert [v + jac for _, v in te[:n]] != pytest.approx([v for _, v in tx[:n]], rel=1e-6)


# --------------------------------------------------------------------------
# mclust's structures
# --------------------------------------------------------------------------

CONSTRAINED = ("EII", "EEI", "VEI", "EVI", "EEV", "VEV", "EVV", "VVE", "EVE", "VEE")


def structured_start(X: np.ndarray, k: int, ctype: str, seed: int) -> GaussianParams:
    """``random_start`` in ``ctype``'s layout, moved to the structure (its M-step on those covariances)."""
    from daskem import _covariance as cov_

    lay = cov_.layout(ctype)
    p = random_start(X, k, lay, seed)
    dense = cov_.dense_covariances(p.covariances, lay, k, X.shape[1])
    return GaussianParams.from_covariances(p.weights, p.means, cov_.project_covariances(dense, p.weights, ctype), ctype)


def _assert_structure(p: GaussianParams, ctype: str, rtol: float = 1e-6) -> None:
    """``p`` is a finite, positive definite model of ``ctype``: its constraints hold to ``rtol``."""
    from daskem._covariance import _has_structure

    assert p.covariance_type == ctype
    assert np.isfinite(p.precisions_cholesky).all()
    cov = np.asarray(p.covariances)
    if ctype in ("EII", "EEI"):  # one variance, one diagonal for all components
        np.testing.assert_allclose(cov, np.broadcast_to(cov[0], cov.shape), rtol=rtol)
    elif ctype == "EVI":  # diagonal, equal volumes
        logdet = np.log(cov).sum(axis=1)
        np.testing.assert_allclose(logdet, logdet[0], rtol=0, atol=rtol * len(cov[0]))
    elif ctype == "EEV":  # equal eigenvalues
        vals = np.linalg.eigvalsh(cov)
        np.testing.assert_allclose(vals, np.broadcast_to(vals[0], vals.shape), rtol=rtol, atol=1e-12 * vals.max())
    elif ctype == "EVV":  # equal volumes
        logdet = np.linalg.slogdet(cov)[1]
        np.testing.assert_allclose(logdet, logdet[0], rtol=0, atol=rtol * cov.shape[-1])
    else:
        assert _has_structure(ctype, cov, rtol=rtol), ctype
    if cov.ndim == 3:
        np.linalg.cholesky(cov)
    else:
        assert (cov > 0).all()


def overlapping_3d(n: int = 3000, seed: int = 4) -> np.ndarray:
    """Three overlapping 3-D Gaussians of different sizes, shapes and orientations."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(3, size=n)
    out = np.empty((n, 3))
    for j, (scale, centre) in enumerate(
        [([1.0, 0.5, 0.3], [0, 0, 0]), ([0.6, 1.2, 0.4], [1, 1, 0]), ([0.8, 0.8, 1.5], [0, 1, 1])]
    ):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        z = rng.normal(size=(int((lab == j).sum()), 3)) * scale
        out[lab == j] = z @ q.T + centre
    return out


@pytest.mark.parametrize("ctype", CONSTRAINED)
def test_extrapolated_points_of_a_constrained_structure_are_models_of_it(ctype):
    """The vector holds the layout's coordinates; from_vector moves an extrapolated point to the structure."""
    X = overlapping_3d()
    p0 = structured_start(X, 3, ctype, 0)
    _assert_structure(p0, ctype)
    _assert_structure(gaussian_from_vector(gaussian_to_vector(p0), p0), ctype)
    p1 = m_step(chunk_statistics(X, [p0], log_map=False)[0], p0, REG)[0]
    p2 = m_step(chunk_statistics(X, [p1], log_map=False)[0], p1, REG)[0]
    v0, v1, v2 = (gaussian_to_vector(p) for p in (p0, p1, p2))
    r, v = v1 - v0, v2 - 2 * v1 + v0
    for alpha in (1.5, 4.0, 16.0):
        q = gaussian_from_vector(v0 + 2 * alpha * r + alpha**2 * v, p0)
        assert q is not None
        _assert_structure(q, ctype)
        assert math.isfinite(chunk_statistics(X, [q], log_map=False)[0].mean_loglik)


@pytest.mark.parametrize("ctype", CONSTRAINED)
def test_constrained_structures_are_accelerated_and_monotone(ctype):
    """Before, every extrapolation of mclust's constrained models was rejected (SQUAREM ran as plain EM)."""
    X = overlapping_3d()
    start = structured_start(X, 3, ctype, 1)
    plain = gaussian_machine(start, None, 1e-9, 3000)
    trajectory(X, plain)
    m = gaussian_machine(start, "squarem", 1e-9, 3000)
    trajectory(X, m)
    h = np.array(m.history)
    assert np.diff(h).min() >= -1e-11 * max(1.0, abs(h[-1]))
    assert m.n_extrapolations > 0 and m.converged
    # VEV, VVE, EVE, VEE, VEI: iterative M-steps (inner tolerance sqrt(eps)) make EM's map inexact
    assert m.lower_bound >= plain.lower_bound - 1e-6
    assert m.n_iter < plain.n_iter
    _assert_structure(m.params, ctype, rtol=1e-4)  # the M-step's image: reg_covar on top of the structure


@pytest.mark.parametrize("layout", ["full", "tied", "diag", "spherical"])
def test_mclusts_names_of_the_layouts_are_accelerated_as_the_layouts(layout):
    """VVV is full under mclust's name (EEE tied, VVI diag, VII spherical): the same fit, pass for pass.
    Before, SQUAREM rejected every extrapolation of the mclust names and ran as plain EM (on the photo's
    pixels, 5 restarts of VVV K=4 took 102 passes and stopped unconverged where full took 74)."""
    import warnings

    import daskem
    from daskem import _covariance as cov_

    X = overlapping_3d(6000)
    fits = {}
    for name in (layout, cov_.ALIASES[layout]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits[name] = daskem.GaussianMixture(3, covariance_type=name, init_params="k-means++", random_state=0).fit(X)
    a, b = fits.values()
    assert sum(r["n_extrapolations"] for r in b.runs_) > 0
    assert b.n_passes_ == a.n_passes_
    assert b.lower_bound_ == pytest.approx(a.lower_bound_, rel=1e-12)
    np.testing.assert_allclose(b.means_, a.means_, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------
# restarts far below another restart of their K stop (the fit loop's rule)
# --------------------------------------------------------------------------


def _restart(k: int, init: int, lower_bound: float, estimate: float, done: bool = False) -> _fitloop.AcceleratedRun:
    run = _fitloop.AcceleratedRun(None, tag={"k": k, "init": init}, lower_bound=lower_bound, done=done)
    run._machine().estimate = estimate
    return run


def test_a_restart_far_below_a_finished_one_of_its_k_stops():
    tol = 1e-3
    best = _restart(5, 0, -6.0, 1e-6, done=True)
    # 0.2 below the finished best, with an estimated remaining gain of 1e-4: stopped (0.2 > 100 * 1e-4)
    low = _restart(5, 1, -6.2, 1e-4)
    # 0.2 below, but its estimate (3e-3) says it could still gain up to a hundredth of that: goes on
    hopeful = _restart(5, 2, -6.2, 3e-3)
    # below by less than tol: goes on, whatever its estimate
    near = _restart(5, 3, -6.0 - 0.9 * tol, 1e-9)
    # no estimate yet (too few passes): goes on
    fresh = _restart(5, 4, -9.0, math.inf)
    # another K is not a restart of this one
    other_k = _restart(4, 0, -7.0, 1e-6)
    # plain EM has no estimate: its restarts run to their end, as scikit-learn's do
    plain = _fitloop.Run(None, tag={"k": 5, "init": 5}, lower_bound=-7.0)
    runs = [best, low, hopeful, near, fresh, other_k, plain]
    _fitloop.update_dominated(runs, tol)
    assert [r.dominated for r in runs] == [False, True, False, False, False, False, False]
    assert low.done and not any(r.done for r in runs if r not in (best, low))
    # only a finished run dominates (its objective is final, and so is whether it is degenerate) ...
    runs = [_restart(5, 0, -6.0, 1e-6), _restart(5, 1, -6.2, 1e-4)]
    _fitloop.update_dominated(runs, tol)
    assert not runs[1].dominated
    # ... that the fit accepts as a rival (not degenerate), nor one that failed
    runs = [_restart(5, 0, -6.0, 1e-6, done=True), _restart(5, 1, -6.2, 1e-4)]
    _fitloop.update_dominated(runs, tol, rival=lambda r: r is not runs[0])
    assert not runs[1].dominated
    runs[0].failed = True
    _fitloop.update_dominated(runs, tol)
    assert not runs[1].dominated
    # several structures fitted together: a restart of another covariance type is not a rival either
    a = _fitloop.AcceleratedRun(None, tag={"covariance_type": "VVV", "k": 3, "init": 0}, lower_bound=-1.0, done=True)
    b = _fitloop.AcceleratedRun(None, tag={"covariance_type": "EEE", "k": 3, "init": 0}, lower_bound=-2.0)
    b._machine().estimate = 1e-8
    _fitloop.update_dominated([a, b], tol)
    assert not b.dominated


def _biased_machine(tol: float, method: str | None = "squarem", start: tuple = (0.0, 0.0)) -> EMAccelerator:
    """A map whose fixed point is not the maximiser of L (as with ``reg_covar``): coordinate 0 goes
    to 1.001 at rate 0.3 while L peaks at 1; coordinate 1 climbs slowly (rate 0.995) to 1. An
    extrapolated point lands nearer the peak than the fixed point, and EM's next step goes down."""

    def objective(p):
        return -float((p[0] - 1.0) ** 2 + 10.0 * (p[1] - 1.0) ** 2)

    def mstep(p, x):
        return np.array([1.001 + 0.3 * (x[0] - 1.001), 1.0 + 0.995 * (x[1] - 1.0)]), False

    return vector_machine(np.array(start, dtype=float), mstep, objective, method, tol, 3000)


def test_em_decreasing_after_an_extrapolation_restarts_squarem_then_goes_on_as_plain_em():
    """EM's own small decrease after an accepted extrapolation does not end the run: the first
    restarts SQUAREM's cycle (and its stopping memory) from that EM image, the second makes the rest
    plain EM, stopped by plain EM's rule; nothing below the best point is recorded, the result is
    the best point's image, and a checkpoint taken in the plain tail resumes the identical run."""
    m = _biased_machine(1e-6)
    passes = []
    while (p := m.proposal()) is not None:
        if m.plain_tail and not passes:
            # mid-tail: export, restore, and let the copy run alongside
            arrays, meta = m.state(lambda q: ({"x": q}, {}))
            assert meta["plain_tail"] and meta["n_drops"] == 2
            copy = EMAccelerator.from_state(
                arrays,
                meta,
                lambda a, _m: a["x"],
                m_step=m.m_step,
                objective=m.objective,
                to_vector=m.to_vector,
                from_vector=m.from_vector,
            )
            passes.append(copy)
        m.receive(p)
    assert m.converged and m.n_drops == 2 and m.plain_tail and m.n_extrapolations > 0
    assert all(b >= a for a, b in zip(m.history, m.history[1:]))
    assert m.lower_bound == max(m.history)
    (copy,) = passes
    while (p := copy.proposal()) is not None:
        copy.receive(p)
    assert copy.history == m.history and copy.n_iter == m.n_iter and np.array_equal(copy.params, m.params)
    plain = _biased_machine(1e-6, method=None)
    while (p := plain.proposal()) is not None:
        plain.receive(p)
    assert m.lower_bound >= plain.lower_bound and m.n_iter < plain.n_iter / 10


def test_em_decreasing_before_any_extrapolation_stops_where_plain_em_stops():
    """A start above the map's fixed point (the sample's optimum reached by an accelerated polish,
    with ``reg_covar``'s bias): EM's first step goes down by less than ``tol``. No extrapolation has
    happened, so the run is plain EM so far, and it stops where plain EM stops, converged, keeping
    the start (higher than plain EM's last point) as its best point."""
    tol = 1e-6
    # the start is L's peak; the map's fixed point (1.001, 1) lies below it
    m = _biased_machine(tol, start=(1.0, 1.0))
    plain = _biased_machine(tol, method=None, start=(1.0, 1.0))
    for machine in (m, plain):
        while (p := machine.proposal()) is not None:
            machine.receive(p)
    assert m.converged and plain.converged and m.n_extrapolations == 0 and m.n_drops == 0
    assert m.n_iter == plain.n_iter == 2
    assert m.history == [0.0] and m.lower_bound == 0.0 > plain.lower_bound > -tol
