"""The fast chunk kernel equals a straightforward computation.

The reference below is the textbook E-step and statistics: for each component
separately, ``(x - mu_k) @ U_k``, ``scipy.special.logsumexp``, ``exp`` of the
normalised log-probabilities, and moments of ``x - reference_k``, all in
float64 with no stacking, no centring on the mixture mean and no blocking.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp

from daskem import _gaussian as g
from daskem._blas import blas_limit_available, single_threaded_blas

TYPES = ("full", "tied", "diag", "spherical")


def _data(n: int = 3000, d: int = 5, k: int = 4, offset: float = 50.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(k, d)) + offset
    labels = rng.integers(0, k, size=n)
    scales = rng.uniform(0.5, 2.0, size=(k, d))
    return centres[labels] + rng.standard_normal((n, d)) * scales[labels]


def _params(X: np.ndarray, ctype: str, k: int = 4, seed: int = 1) -> g.GaussianParams:
    rng = np.random.default_rng(seed)
    d = X.shape[1]
    means = X[rng.choice(len(X), k, replace=False)] + rng.normal(scale=0.3, size=(k, d))
    weights = rng.uniform(0.5, 1.5, size=k)
    weights /= weights.sum()
    if ctype == "full":
        cov = []
        for _ in range(k):
            a = rng.normal(size=(d, d))
            cov.append(a @ a.T / d + np.eye(d) * 2.0)
        cov = np.array(cov)
    elif ctype == "tied":
        a = rng.normal(size=(d, d))
        cov = a @ a.T / d + np.eye(d) * 2.0
    elif ctype == "diag":
        cov = rng.uniform(1.0, 4.0, size=(k, d))
    else:
        cov = rng.uniform(1.0, 4.0, size=k)
    return g.GaussianParams.from_covariances(weights, means, cov, ctype)


def _ref_log_prob(X: np.ndarray, p: g.GaussianParams) -> np.ndarray:
    k, d = p.means.shape
    out = np.empty((len(X), k))
    for j in range(k):
        diff = X - p.means[j]
        if p.covariance_type in ("full", "tied"):
            u = p.precisions_cholesky[j] if p.covariance_type == "full" else p.precisions_cholesky
            y = diff @ u
            logdet = np.log(np.diag(u)).sum()
        else:
            s = p.precisions_cholesky[j]
            s = np.full(d, s) if np.ndim(s) == 0 else s
            y = diff * s
            logdet = np.log(s).sum()
        out[:, j] = -0.5 * (d * np.log(2 * np.pi) + (y * y).sum(axis=1)) + logdet + np.log(p.weights[j])
    return out


def _ref_stats(X: np.ndarray, p: g.GaussianParams, hard: bool, mask: np.ndarray) -> dict:
    lp = _ref_log_prob(X, p)
    lse = logsumexp(lp, axis=1)
    tr = X[mask]
    lpt = lp[mask]
    if hard:
        best = lpt.argmax(axis=1)
        q = np.eye(p.n_components)[best]
        loglik = lpt[np.arange(len(tr)), best].sum()
    else:
        q = np.exp(lpt - lse[mask][:, None])
        loglik = lse[mask].sum()
    ref = p.reference()
    k, d = p.means.shape
    s1 = np.array([q[:, j] @ (tr - ref[j]) for j in range(k)])
    if p.covariance_type == "full":
        s2 = np.array([(tr - ref[j]).T @ ((tr - ref[j]) * q[:, j : j + 1]) for j in range(k)])
    elif p.covariance_type == "tied":
        s2 = sum((tr - ref[j]).T @ ((tr - ref[j]) * q[:, j : j + 1]) for j in range(k))
    else:
        s2 = np.array([q[:, j] @ (tr - ref[j]) ** 2 for j in range(k)])
    return {
        "n": mask.sum(),
        "loglik": loglik,
        "nk": q.sum(axis=0),
        "s1": s1,
        "s2": s2,
        "n_heldout": (~mask).sum(),
        "loglik_heldout": lse[~mask].sum(),
    }


def _check(st: g.Stats, ref: dict, rtol: float, scale_s1: float, scale_s2: float) -> None:
    assert st.n == ref["n"]
    assert st.n_heldout == ref["n_heldout"]
    np.testing.assert_allclose(st.loglik, ref["loglik"], rtol=rtol)
    np.testing.assert_allclose(st.loglik_heldout, ref["loglik_heldout"], rtol=rtol)
    np.testing.assert_allclose(st.nk, ref["nk"], rtol=rtol, atol=rtol * ref["n"])
    np.testing.assert_allclose(st.s1, ref["s1"], rtol=rtol, atol=rtol * scale_s1)
    np.testing.assert_allclose(st.s2, ref["s2"], rtol=rtol, atol=rtol * scale_s2)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("ctype", TYPES)
def test_kernel_equals_reference_float64(ctype: str, hard: bool) -> None:
    X = _data()
    p = _params(X, ctype)
    mask = np.random.default_rng(5).random(len(X)) > 0.2
    ref = _ref_stats(X, p, hard, mask)
    # scales of the moments: absolute tolerances for entries that cancel to ~0
    scale_s1 = np.abs(ref["s1"]).max() + ref["n"]
    scale_s2 = np.abs(ref["s2"]).max()
    for block_rows in (257, 4096):
        (st,) = g.chunk_statistics(X, [p], hard=hard, train_mask=mask, block_rows=block_rows)
        _check(st, ref, 1e-10, scale_s1, scale_s2)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("ctype", TYPES)
def test_kernel_equals_reference_float32(ctype: str, hard: bool) -> None:
    X = _data()
    p = _params(X, ctype)
    mask = np.random.default_rng(6).random(len(X)) > 0.2
    ref = _ref_stats(X, p, hard, mask)
    (st,) = g.chunk_statistics(X.astype(np.float32), [p], hard=hard, train_mask=mask, dtype="float32")
    assert st.nk.dtype == np.float64 and st.s2.dtype == np.float64
    scale_s1 = np.abs(ref["s1"]).max() + ref["n"]
    scale_s2 = np.abs(ref["s2"]).max()
    _check(st, ref, 1e-5, scale_s1, scale_s2)


def _bounded(X: np.ndarray, p: g.GaussianParams, dtype: str = "float64") -> bool:
    """Whether :func:`g._accumulate_diag_bounded` takes the rows ``X`` as one block."""
    k, d = p.means.shape
    acc = {"loglik": 0.0, "nk": np.zeros(k), "c2": np.zeros((k, 2 * d))}
    dt = np.dtype(dtype)
    return g._accumulate_diag_bounded(X.astype(dt), g._make_plan(p, dt), acc, g._Workspace(dt))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("ctype", ["diag", "spherical"])
def test_soft_diagonal_passes_without_icl_term_take_the_bound(ctype: str, dtype: str) -> None:
    """EM's passes (no ``log_map``) take the responsibilities through the bound of the log-densities:
    the statistics of the textbook E-step, and ``log_map`` NaN."""
    X = _data()
    p = _params(X, ctype)
    assert _bounded(X, p, dtype)
    ref = _ref_stats(X, p, False, np.ones(len(X), bool))
    rtol = 1e-10 if dtype == "float64" else 1e-5
    for block_rows in (257, 4096):
        (st,) = g.chunk_statistics(X.astype(dtype), [p], block_rows=block_rows, dtype=dtype, log_map=False)
        assert np.isnan(st.log_map)
        _check(st, ref, rtol, np.abs(ref["s1"]).max() + ref["n"], np.abs(ref["s2"]).max())
        (with_map,) = g.chunk_statistics(X.astype(dtype), [p], block_rows=block_rows, dtype=dtype)
        assert np.isfinite(with_map.log_map)


def test_bounded_blocks_decline_non_finite_rows_and_rows_far_from_every_component() -> None:
    """A block with a NaN or infinite value, or with a row whose every log-density is far below the
    bound, goes the way it went before: the same statistics, the same count of bad rows."""
    X = _data(n=1000)
    p = _params(X, "diag")
    bad = X.copy()
    bad[[3, 500], 1] = np.nan
    bad[10, 0] = np.inf
    far = X.copy()
    far[700] += 1e4  # each term some 1e7 nats below the bound
    assert _bounded(X[:128], p) and _bounded(X[640:768], p)
    assert not _bounded(bad[:128], p) and not _bounded(far[640:768], p)
    for data, n_bad in ((bad, 3), (far, 0)):
        (got,) = g.chunk_statistics(data, [p], block_rows=128, log_map=False)
        (before,) = g.chunk_statistics(data, [p], block_rows=128)
        assert got.n_bad == before.n_bad == n_bad
        keep = np.isfinite(data).all(axis=1)
        ref = _ref_stats(data[keep], p, False, np.ones(keep.sum(), bool))
        _check(got, ref, 1e-10, np.abs(ref["s1"]).max() + ref["n"], np.abs(ref["s2"]).max())
        np.testing.assert_allclose(np.delete(got.pack(), 5), np.delete(before.pack(), 5), rtol=1e-12)  # 5: log_map
    # several sets sharing the pass (restarts): the same for each
    ps = [p, _params(X, "diag", seed=2)]
    group = g._DiagGroup.build([0, 1], ps, np.dtype(np.float64))
    accs = [{"loglik": 0.0, "nk": np.zeros(4), "c2": np.zeros((4, 10))} for _ in ps]
    assert group._accumulate_bounded(X[640:768], accs, g._Workspace(np.dtype(np.float64)))
    assert not group._accumulate_bounded(far[640:768], accs, g._Workspace(np.dtype(np.float64)))
    for q, st in zip(ps, g.chunk_statistics(far, ps, block_rows=128, log_map=False)):
        ref = _ref_stats(far, q, False, np.ones(len(far), bool))
        _check(st, ref, 1e-10, np.abs(ref["s1"]).max() + ref["n"], np.abs(ref["s2"]).max())


def test_only_the_scoring_model_accumulates_the_icl_term() -> None:
    """EM's passes go without ``sum log max_k q`` (NaN); the scoring model's passes have it."""
    from daskem._gaussian_model import GaussianModel

    X = _data(n=1000)
    for ctype in TYPES:
        p = _params(X, ctype)
        model = GaussianModel(covariance_type=ctype)
        (em,) = model.statistics(X, [p], None)
        (scored,) = model.scoring_model().statistics(X, [p], None)
        assert np.isnan(em.log_map) and np.isfinite(scored.log_map) and scored.log_map < 0
        np.testing.assert_allclose(em.s2, scored.s2, rtol=1e-12)
        assert em.loglik == pytest.approx(scored.loglik, rel=1e-14)


@pytest.mark.parametrize("ctype", TYPES)
def test_several_parameter_sets_in_one_pass(ctype: str) -> None:
    """n_init > 1: each parameter set's stats equal its own single pass."""
    X = _data(n=1500)
    same_k = [_params(X, ctype, seed=s) for s in (1, 2, 3)]
    mixed_k = [_params(X, ctype, k=k, seed=s) for k, s in ((3, 1), (5, 2))]
    for ps in (same_k, mixed_k):
        for log_map in (True, False):  # False: EM's passes (soft diagonal sets: through their bounds)
            together = g.chunk_statistics(X, ps, block_rows=500, log_map=log_map)
            for p, st in zip(ps, together):
                (alone,) = g.chunk_statistics(X, [p], block_rows=500)
                np.testing.assert_allclose(np.delete(st.pack(), 5), np.delete(alone.pack(), 5), rtol=1e-12, atol=1e-9)
                assert np.isnan(st.log_map) != log_map  # 5: log_map
                if log_map:
                    assert st.log_map == pytest.approx(alone.log_map, rel=1e-12)


@pytest.mark.parametrize("ctype", TYPES)
def test_log_prob_equals_reference(ctype: str) -> None:
    X = _data(n=5000)  # more than one block of DEFAULT_BLOCK_ROWS
    p = _params(X, ctype)
    ref = _ref_log_prob(X, p)
    np.testing.assert_allclose(g.estimate_weighted_log_prob(X, p), ref, rtol=1e-10)
    got32 = g.estimate_weighted_log_prob(X.astype(np.float32), p, np.float32)
    np.testing.assert_allclose(got32, ref, rtol=1e-4)


def test_non_finite_rows_are_counted_and_left_out() -> None:
    X = _data(n=1000)
    p = _params(X, "full")
    bad = X.copy()
    bad[[3, 500, 999], 1] = np.nan
    bad[10, 0] = np.inf
    (st,) = g.chunk_statistics(bad, [p], block_rows=128)
    keep = np.isfinite(bad).all(axis=1)
    ref = _ref_stats(X[keep], p, False, np.ones(keep.sum(), bool))
    assert st.n_bad == 4
    _check(st, ref, 1e-10, np.abs(ref["s1"]).max() + ref["n"], np.abs(ref["s2"]).max())


def test_blas_threads_restored() -> None:
    """The kernel's one-thread BLAS setting is scoped to the calling thread."""
    import ctypes

    assert blas_limit_available(), "numpy's OpenBLAS should expose openblas_set_num_threads_local"
    from daskem import _blas

    fn = _blas._get_setters()[0]
    before = fn(3)  # set 3 (returns the previous value)
    try:
        with single_threaded_blas():
            assert fn(1) == 1  # inside: one thread
        assert fn(3) == 3  # restored on exit
    finally:
        fn(max(int(before), 1))
    assert isinstance(fn.restype, type(ctypes.c_int)) or fn.restype is ctypes.c_int


def test_huge_finite_rows_are_not_taken_for_bad() -> None:
    """Rows whose sum overflows are still finite rows (the screen is only a filter)."""
    X = _data(n=600, d=3)
    big = np.zeros((4, 3))
    big[:, 0] = big[:, 1] = 1e308  # the row sum overflows to inf
    Xb = np.vstack([X, big])
    p = _params(X, "diag")
    with np.errstate(all="ignore"):
        (st,) = g.chunk_statistics(Xb, [p], block_rows=256)
    assert st.n_bad == 0
    assert st.n == len(Xb)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_mixed_parameter_sets_with_mask_equal_reference(hard: bool) -> None:
    """Diagonal-type sets are stacked together (shared design); others run alone."""
    X = _data(n=2500)
    ps = [
        _params(X, "diag", seed=1),
        _params(X, "full", seed=2),
        _params(X, "spherical", seed=3),
        _params(X, "diag", k=3, seed=4),
        _params(X, "tied", seed=5),
        # the internal k-means type (shared spherical variance, equal weights)
        g.GaussianParams.from_covariances(np.full(4, 0.25), X[:4], np.full(4, 3.0), "kmeans"),
    ]
    mask = np.random.default_rng(7).random(len(X)) > 0.3
    stats = g.chunk_statistics(X, ps, hard=hard, train_mask=mask, block_rows=700)
    for p, st in zip(ps, stats):
        ref = _ref_stats(X, p, hard, mask)
        _check(st, ref, 1e-10, np.abs(ref["s1"]).max() + ref["n"], np.abs(ref["s2"]).max())


def test_products_in_pieces_equal_one_product() -> None:
    """``_matmul`` splits tall products into row pieces; the result is the same product."""
    rng = np.random.default_rng(0)
    for m, inner, n in [(128, 17, 2048), (37, 33, 2048), (8, 33, 2048), (1024, 65, 2048)]:
        w = rng.standard_normal((m, inner))
        a = rng.standard_normal((inner, n))
        step = g._piece_rows(m, inner, n)
        assert step == m or (step % 8 == 0 and step * inner * n <= g._GEMM_PIECE)
        out = np.empty((m, n))
        np.testing.assert_allclose(g._matmul(w, a, out), w @ a, rtol=1e-12, atol=1e-12)
        # a transposed right operand (the moment products) takes the same path
        out_t = np.empty((m, inner))
        np.testing.assert_allclose(g._matmul(w @ a, a.T, out_t), (w @ a) @ a.T, rtol=1e-10)
    assert g._piece_rows(128, 17, 2048) < 128  # the benchmark's full (a) shape is split


@pytest.mark.parametrize("ctype", TYPES)
def test_kernel_equals_reference_at_split_product_shapes(ctype: str) -> None:
    """D=16, K=8 and four parameter sets: every block product is issued in pieces."""
    X = _data(n=4500, d=16, k=8, offset=5.0)
    ps = [_params(X, ctype, k=8, seed=s) for s in (1, 2, 3, 4)]
    mask = np.ones(len(X), dtype=bool)
    got = g.chunk_statistics(X, ps, block_rows=2048)
    for p, st in zip(ps, got):
        ref = _ref_stats(X, p, False, mask)
        _check(st, ref, 1e-9, np.abs(ref["s1"]).max() + ref["n"], np.abs(ref["s2"]).max())


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("ctype", ["full", "tied"])
@pytest.mark.parametrize("d", [1, 3, 5, 16, 24, 33])
def test_outer_product_kernel_equals_reference(ctype: str, hard: bool, d: int) -> None:
    """K >= 8 full and tied fits take the outer-product kernel; it equals the textbook statistics."""
    X = _data(n=3000, d=d, k=8, offset=50.0)
    p = _params(X, ctype, k=9)
    assert g._make_plan(p, np.dtype(np.float64), features=True).features is not None
    mask = np.random.default_rng(7).random(len(X)) > 0.2
    ref = _ref_stats(X, p, hard, mask)
    for block_rows in (257, 4096):
        for log_map in (True, False):  # False: EM's passes (soft: through the bound of the log-densities)
            (st,) = g.chunk_statistics(X, [p], hard=hard, train_mask=mask, block_rows=block_rows, log_map=log_map)
            _check(st, ref, 1e-10, np.abs(ref["s1"]).max() + ref["n"], np.abs(ref["s2"]).max())


def test_outer_product_kernel_declines_the_bound_for_rows_far_from_every_component() -> None:
    """A row whose every log-density is far below the bound sends its sub-block (and the rest of the
    block) to the row-maximum responsibilities: the textbook statistics either way."""
    X = _data(n=3000, d=5, k=8)
    p = _params(X, "full", k=9)
    plan = g._make_plan(p, np.dtype(np.float64), features=True)
    far = X.copy()
    far[100] += 1e4
    for data, taken in ((X, True), (far, False)):
        f = np.empty((plan.features.weight.shape[1], 256))
        g._outer_features(data[:256], plan, f, g._Workspace(np.dtype(np.float64)))
        f[-1] = 1.0
        lp = plan.features.shifted @ f
        assert (g._responsibilities_bounded(lp, plan.features.bound) is not None) == taken
        ref = _ref_stats(data, p, False, np.ones(len(data), bool))
        (st,) = g.chunk_statistics(data, [p], log_map=False)
        _check(st, ref, 1e-10, np.abs(ref["s1"]).max() + ref["n"], np.abs(ref["s2"]).max())


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_wide_full_fits_with_many_components_take_the_outer_product_kernel(hard: bool) -> None:
    """Full fits beyond D=48 take the outer-product kernel while K >= D / 4 (in sub-blocks
    of fewer rows), the wide kernel below; both equal the textbook statistics."""
    X = _data(n=1500, d=64, k=16, offset=50.0)
    mask = np.random.default_rng(3).random(len(X)) > 0.2
    for k, features in ((16, True), (15, False)):
        p = _params(X, "full", k=k)
        plan = g._make_plan(p, np.dtype(np.float64), features=True)
        assert (plan.features is not None) is features
        assert plan.wide is not None  # built for D >= _WIDE_MIN_D either way (held-out rows use it)
        ref = _ref_stats(X, p, hard, mask)
        for block_rows in (300, 2048):
            (st,) = g.chunk_statistics(X, [p], hard=hard, train_mask=mask, block_rows=block_rows)
            _check(st, ref, 1e-10, np.abs(ref["s1"]).max() + ref["n"], np.abs(ref["s2"]).max())
    tied = _params(X, "tied", k=16)
    assert g._make_plan(tied, np.dtype(np.float64), features=True).features is None
    assert g._features_rows(64 * 65 // 2 + 65, 16) == 256


@pytest.mark.parametrize("d", [1, 4, 8, 16, 24, 32, 48, 64, 96])
@pytest.mark.parametrize("k", [8, 9, 16, 32, 64, 128])
def test_outer_product_sub_blocks_keep_both_products_on_the_small_matrix_path(d: int, k: int) -> None:
    """A sub-block holds as many rows as keep ``K x F x rows`` within ``_GEMM_PIECE`` (a multiple
    of 16, at most a block) when that is at least ``_FEATURES_MIN_ROWS``; else the rule by bytes."""
    f_len = d * (d + 1) // 2 + d + 1
    rows = g._features_rows(f_len, k)
    fit = g._GEMM_PIECE // (k * f_len)
    if fit >= g._FEATURES_MIN_ROWS:
        assert rows % 16 == 0 and k * f_len * rows <= g._GEMM_PIECE
        assert rows == min(fit - fit % 16, g.DEFAULT_BLOCK_ROWS) or rows * f_len * 8 <= g._FEATURES_BYTES
        assert rows > fit - 16 or rows == g.DEFAULT_BLOCK_ROWS or rows * 2 * f_len * 8 > g._FEATURES_BYTES
    else:
        assert rows in (512, 256) and (rows == 256 or rows * f_len * 8 <= g._FEATURES_BYTES)
    assert g._features_rows(16 * 17 // 2 + 17, 8) == 816
    assert g._features_rows(16 * 17 // 2 + 17, 16) == 400
    assert g._features_rows(32 * 33 // 2 + 33, 32) == 512


@pytest.mark.parametrize(("d", "k", "rows"), [(24, 8, 384), (32, 16, 96), (40, 16, 256), (48, 16, 256), (64, 16, 256)])
def test_features_built_in_one_product_take_the_small_path_from_96_rows_else_256(d: int, k: int, rows: int) -> None:
    """From ``_CIRCULAR_MIN_D`` a sub-block keeps both products on the small-matrix path where
    96 rows or more fit, else it holds 256 rows; the plan takes that rule."""
    assert d >= g._CIRCULAR_MIN_D
    f_len = d * (d + 1) // 2 + d + 1
    assert g._features_rows(f_len, k, circular=True) == rows
    fit = g._GEMM_PIECE // (k * f_len)
    assert (rows == 256) is (fit < 96)
    X = _data(n=500, d=d, k=k)
    plan = g._make_plan(_params(X, "full", k=k), np.dtype(np.float64), features=True)
    assert plan.features is not None and plan.features.rows == rows


@pytest.mark.parametrize("d", [1, 2, 5, 16, 23, 24, 25, 48])
def test_outer_product_features_hold_every_pair_once_offset_by_offset(d: int) -> None:
    """The features are the D (D+1) / 2 products ``z_i z_j`` (i <= j), each once, laid
    out by offset: below ``_CIRCULAR_MIN_D`` offset s is the contiguous range
    ``z[:D-s] * z[s:]``; from it offset s is ``z * roll(z, -s)`` (D pairs, for even D the
    last offset half of them), and the kernel builds them as the layout says."""
    pi, pj = g._feature_layout(d)
    assert len(pi) == d * (d + 1) // 2
    assert sorted((min(i, j), max(i, j)) for i, j in zip(pi.tolist(), pj.tolist())) == [
        (i, j) for i in range(d) for j in range(i, d)
    ]
    if d < g._CIRCULAR_MIN_D:
        off = 0
        for s in range(d):
            np.testing.assert_array_equal(pi[off : off + d - s], np.arange(d - s))
            np.testing.assert_array_equal(pj[off : off + d - s] - pi[off : off + d - s], s)
            off += d - s
        return
    full = (d + 1) // 2
    for s in range(full):
        np.testing.assert_array_equal(pi[s * d : (s + 1) * d], np.arange(d))
        np.testing.assert_array_equal(pj[s * d : (s + 1) * d], (np.arange(d) + s) % d)
    # the kernel's features of a block are the products of the layout's pairs
    X = _data(n=300, d=d, k=8)
    p = _params(X, "full", k=8)
    plan = g._make_plan(p, np.dtype(np.float64), features=True)
    ft = plan.features
    f = np.empty((ft.n_pairs + d + 1, 300))
    g._outer_features(X, plan, f, g._Workspace(np.dtype(np.float64)))
    z = (X - plan.centre).T
    np.testing.assert_allclose(f[: ft.n_pairs], z[pi] * z[pj], rtol=1e-14, atol=0)
    np.testing.assert_allclose(f[ft.n_pairs : ft.n_pairs + d], z, rtol=1e-14, atol=1e-12)


def test_outer_product_kernel_steps_aside_where_it_would_lose_digits() -> None:
    """A narrow component far from the mixture mean: the expanded quadratic form would
    cancel, so the exact kernel is used (and the statistics still equal the reference)."""
    X = _data(n=3000, d=4, k=8)
    p = _params(X, "full", k=8)
    cov = p.covariances.copy()
    cov[0] = np.eye(4) * 1e-8  # m' P m ~ 1e8 * |mu_0 - centre|^2
    p = g.GaussianParams.from_covariances(p.weights, p.means, cov, "full")
    assert g._make_plan(p, np.dtype(np.float64), features=True).features is None
    assert g._make_plan(p, np.dtype(np.float32), features=True).features is None
    mask = np.ones(len(X), dtype=bool)
    ref = _ref_stats(X, p, False, mask)
    (st,) = g.chunk_statistics(X, [p])
    _check(st, ref, 1e-9, np.abs(ref["s1"]).max() + ref["n"], np.abs(ref["s2"]).max())


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_wide_full_kernel_equals_reference(dtype: str, hard: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full fits with D >= _WIDE_MIN_D run one component at a time (trmm, syrk); same statistics."""
    monkeypatch.setattr(g, "_WIDE_MIN_D", 6)
    X = _data(n=3000, d=7, k=4, offset=50.0)
    p = _params(X, "full", k=5)
    assert g._make_plan(p, np.dtype(dtype)).wide is not None
    assert g._make_plan(_params(X, "tied", k=5), np.dtype(dtype)).wide is None
    mask = np.random.default_rng(8).random(len(X)) > 0.2
    ref = _ref_stats(X, p, hard, mask)
    rtol = 1e-10 if dtype == "float64" else 1e-5
    for block_rows in (257, 4096):
        (st,) = g.chunk_statistics(X.astype(dtype), [p], hard=hard, train_mask=mask, dtype=dtype, block_rows=block_rows)
        _check(st, ref, rtol, np.abs(ref["s1"]).max() + ref["n"], np.abs(ref["s2"]).max())
        # one triangle accumulated, both returned
        np.testing.assert_allclose(st.s2, st.s2.transpose(0, 2, 1), rtol=1e-12, atol=1e-12 * np.abs(st.s2).max())
    np.testing.assert_allclose(g.estimate_weighted_log_prob(X, p), _ref_log_prob(X, p), rtol=1e-10)


def test_wide_full_kernel_at_its_threshold_equals_stacked_kernel() -> None:
    """At the real threshold (D=64) the wide kernel gives the stacked kernel's statistics."""
    d = g._WIDE_MIN_D
    X = _data(n=1500, d=d, k=3, offset=5.0)
    p = _params(X, "full", k=3)
    assert g._make_plan(p, np.dtype(np.float64)).wide is not None
    (wide,) = g.chunk_statistics(X, [p], block_rows=700)
    ref = _ref_stats(X, p, False, np.ones(len(X), dtype=bool))
    _check(wide, ref, 1e-9, np.abs(ref["s1"]).max() + ref["n"], np.abs(ref["s2"]).max())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_exp_floor_leaves_the_statistics_as_they_were(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Well-separated components put exp's arguments in its slow underflow range; the floor
    (exp(-700) instead of 0) changes no log-likelihood bit and the moments by at most ~1e-300."""
    rng = np.random.default_rng(3)
    k, d = 12, 3
    centres = rng.normal(scale=60.0, size=(k, d))
    X = (centres[rng.integers(k, size=5000)] + rng.normal(size=(5000, d))).astype(dtype)
    ps = [
        g.GaussianParams.from_covariances(np.full(k, 1 / k), centres, np.ones((k, d)), "diag"),
        g.GaussianParams.from_covariances(np.full(k, 1 / k), centres + 1.0, np.ones((k, d)), "diag"),
        g.GaussianParams.from_covariances(np.full(k, 1 / k), centres, np.tile(np.eye(d), (k, 1, 1)), "full"),
    ]
    lp = g.estimate_weighted_log_prob(X.astype(np.float64), ps[0])
    assert (lp - lp.max(axis=1, keepdims=True) < -745).mean() > 0.5  # mostly in exp's underflow range
    mask = rng.random(len(X)) > 0.2
    got = g.chunk_statistics(X, ps, train_mask=mask, dtype=dtype)  # two diag sets: the stacked path
    monkeypatch.setattr(g, "_EXP_FLOOR", False)
    ref = g.chunk_statistics(X, ps, train_mask=mask, dtype=dtype)
    tiny = 1e-290 if dtype == "float64" else 1e-30
    for a, b in zip(got, ref):
        assert a.loglik == b.loglik and a.loglik_heldout == b.loglik_heldout and a.log_map == b.log_map
        np.testing.assert_allclose(a.pack(), b.pack(), rtol=1e-12, atol=tiny * len(X) * np.abs(X).max() ** 2)


def test_exp_floor_keeps_rows_of_minus_infinity() -> None:
    """A row whose every term is -inf keeps its -inf log-likelihood (the floor is not applied)."""
    lp = np.array([[0.0, -np.inf], [-800.0, -np.inf]])
    with np.errstate(divide="ignore", invalid="ignore"):
        q, ll, _ = g._responsibilities(lp.copy(), False)
    assert ll == -np.inf
    lp = np.array([[0.0], [-800.0]])
    q, ll, _ = g._responsibilities(lp.copy(), False)
    assert ll == 0.0 and q[1, 0] == np.exp(-700.0) and q[0, 0] == 1.0


@pytest.mark.parametrize("d", [6, 130])
def test_parity_with_sklearn_through_the_wide_full_kernel(d: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full fits at D >= _WIDE_MIN_D (D=130, and D=6 with the threshold lowered) follow
    scikit-learn's trajectory at rtol 1e-6, as the other kernels do."""
    import sys
    import warnings
    from pathlib import Path

    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    import daskem

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_blobs, sklearn_init

    if d < g._WIDE_MIN_D:
        monkeypatch.setattr(g, "_WIDE_MIN_D", d)
    X = make_blobs(n=3000, d=d, k=3, seed=4)
    init = sklearn_init(X, 3, "full", seed=1)
    p = g.GaussianParams.from_precisions(init["weights_init"], init["means_init"], init["precisions_init"], "full")
    assert g._make_plan(p, np.dtype(np.float64)).wide is not None
    opts = dict(covariance_type="full", tol=0.0, max_iter=6, **init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = SkGaussianMixture(3, **opts).fit(X)
        ours = daskem.GaussianMixture(3, accelerate=None, **opts).fit(X)
    np.testing.assert_allclose(ours.history_, ref.lower_bounds_, rtol=1e-6)
    np.testing.assert_allclose(ours.weights_, ref.weights_, rtol=1e-6)
    for name in ("means_", "covariances_", "precisions_cholesky_", "precisions_"):
        # at D=130 the precisions invert a covariance of condition ~1e5: both libraries' inverses
        # agree to ~1e-10 of the matrix's scale (so does daskem's stacked kernel, measured)
        want = getattr(ref, name)
        np.testing.assert_allclose(getattr(ours, name), want, rtol=1e-6, atol=1e-9 * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("k,d", [(3, 1), (3, 4), (10, 64), (2, 30)])
def test_lapack_factors_equal_scipy_linalg_bit_for_bit(k: int, d: int) -> None:
    """The Cholesky factors come from LAPACK directly, the same routines scipy.linalg calls."""
    from scipy import linalg

    rng = np.random.default_rng(k * d)
    a = rng.normal(size=(k, d, d))
    cov = a @ a.transpose(0, 2, 1) + 1e-6 * np.eye(d)
    eye = np.eye(d)
    ref = np.stack([linalg.solve_triangular(linalg.cholesky(c, lower=True), eye, lower=True).T for c in cov])
    u = g.precision_cholesky_from_covariances(cov, "full")
    np.testing.assert_array_equal(u, ref)
    np.testing.assert_array_equal(g.precision_cholesky_from_covariances(cov[0], "tied"), ref[0])
    back = np.stack([(lambda w: w.T @ w)(linalg.solve_triangular(x, eye, lower=False)) for x in u])
    np.testing.assert_array_equal(g.covariances_from_precision_cholesky(u, "full"), back)
    prec = np.einsum("kij,klj->kil", u, u)
    flip = np.stack([linalg.cholesky(p[::-1, ::-1], lower=True)[::-1, ::-1] for p in prec])
    np.testing.assert_array_equal(g.precision_cholesky_from_precisions(prec, "full"), flip)


def test_lapack_factors_refuse_what_scipy_refused() -> None:
    for bad in (np.array([[[1.0, 2.0], [2.0, 1.0]]]), np.array([[[np.nan, 0.0], [0.0, 1.0]]])):
        with pytest.raises(ValueError, match="ill-defined empirical covariance"):
            g.precision_cholesky_from_covariances(bad, "full")


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_wide_scatter_takes_only_the_rows_that_weigh_on_each_component(hard: bool) -> None:
    """Well-separated components at D=70: each component's scatter gathers its own rows only
    (about n/K of them, not n), and the statistics still equal the textbook ones, component by
    component, including a component whose largest responsibility in the data is ~1e-100 (kept:
    what is dropped is relative to each component's largest weight in the block)."""
    rng = np.random.default_rng(11)
    k, d, n = 10, 70, 3000
    centres = rng.normal(scale=3.0, size=(k, d))
    X = centres[rng.integers(k, size=n)] + rng.normal(size=(n, d))
    # one more component near the first centre, far enough that it weighs ~1e-100 on its rows
    far = centres[:1] + 25.0 * np.eye(d)[:1]
    means = np.vstack([centres, far])
    p = g.GaussianParams.from_covariances(np.full(k + 1, 1 / (k + 1)), means, np.tile(np.eye(d), (k + 1, 1, 1)), "full")
    plan = g._make_plan(p, np.dtype(np.float64), features=True)
    assert plan.wide is not None and plan.features is None
    mask = rng.random(n) > 0.1
    ref = _ref_stats(X, p, hard, mask)
    lp = _ref_log_prob(X[mask], p)
    qfar = np.exp(lp[:, k] - logsumexp(lp, axis=1)).max()
    assert 1e-200 < qfar < 1e-50, qfar
    for block_rows in (257, 4096):
        (st,) = g.chunk_statistics(X, [p], hard=hard, train_mask=mask, block_rows=block_rows)
        np.testing.assert_allclose(st.loglik, ref["loglik"], rtol=1e-10)
        for j in range(k + 1 if not hard else k):
            sj = np.abs(ref["s2"][j]).max()
            np.testing.assert_allclose(st.nk[j], ref["nk"][j], rtol=1e-10)
            np.testing.assert_allclose(st.s2[j], ref["s2"][j], rtol=1e-9, atol=1e-9 * sj, err_msg=str(j))
    # the scatter itself: each component's rows gathered, about n/K of the block, not the block
    w0 = g._Workspace(np.dtype(np.float64))
    a = g._design(X, plan, w0)
    q = g._responsibilities(g._log_prob_block(a, plan, w0), hard)[0]
    work = g._Workspace(np.dtype(np.float64))
    acc = {"c2": np.zeros(((k + 1) * d, d))}
    g._scatter_wide(a[:d], q, plan, acc, work)
    assert "yk" not in work._bufs  # never the whole block weighted in place
    assert work._bufs["zg"].size <= d * 2 * n / k


def _separated(k: int, d: int, n: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=scale, size=(k, d))
    return centres[rng.integers(k, size=n)] + rng.normal(size=(n, d)) * rng.uniform(0.5, 1.5, size=d), centres


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("scale", [0.3, 5.0])
def test_wide_bounded_log_prob_leaves_out_only_what_the_floor_takes(dtype: str, scale: float) -> None:
    """The bounded E-step of wide full fits computes a term in full unless its bound says the
    ``exp`` floor takes it: every term it leaves out (-inf) is in truth more than the floor below
    its row's largest, every term it computes equals the plain loop's, and so the responsibilities
    and the log-likelihood are the plain loop's. Separated components (scale 5) leave out most
    terms; overlapping ones (0.3) none, and the block says so (None: the plain loop)."""
    k, d, n = 12, 72, 1500
    X, centres = _separated(k, d, n, scale, seed=int(10 * scale))
    rng = np.random.default_rng(2)
    cov = []
    for _ in range(k):
        a = rng.normal(size=(d, d)) / np.sqrt(d)
        cov.append(a @ a.T + np.eye(d) * 0.3)
    p = g.GaussianParams.from_covariances(np.full(k, 1 / k), centres, np.array(cov), "full")
    plan = g._make_plan(p, np.dtype(dtype))
    assert plan.wide is not None
    a = g._design(X, plan, g._Workspace(np.dtype(dtype)))
    plain = g._log_prob_wide(a, plan, g._Workspace(np.dtype(dtype))).astype(np.float64)
    work = g._Workspace(np.dtype(dtype))
    got = g._log_prob_wide_bounded(a, plan, work)
    floor = -g._exp_floor(np.dtype(dtype))
    if scale < 1.0:
        assert got is None and work.marked(f"unbounded-{id(plan)}")
        return
    got = got.astype(np.float64)
    out = np.isneginf(got)
    assert out.mean() > 0.6
    rtol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(got[~out], plain[~out], rtol=rtol, atol=rtol * np.abs(plain).max())
    assert (plain[out] < (plain.max(axis=0) - floor)[None, :].repeat(k, 0)[out]).all()
    q_got, ll_got, lm_got = g._responsibilities(got.astype(dtype), False)
    q_plain, ll_plain, lm_plain = g._responsibilities(plain.astype(dtype), False)
    np.testing.assert_allclose(ll_got, ll_plain, rtol=1e-12 if dtype == "float64" else 1e-6)
    np.testing.assert_array_equal(q_got == q_got.max(axis=0), q_plain == q_plain.max(axis=0))
    np.testing.assert_allclose(q_got, q_plain, rtol=rtol, atol=1e-300 if dtype == "float64" else 1e-30)


def test_wide_bounded_statistics_near_the_floor_equal_the_reference() -> None:
    """Components placed so that some terms sit within a few nats of the floor on either side,
    and one whose separation shows only in the trailing coordinates (the bound from the leading
    ones cannot leave it out): the statistics equal the textbook ones, component by component."""
    rng = np.random.default_rng(5)
    k, d, n = 10, 64, 2000
    centres = np.zeros((k, d))
    centres[:, 0] = np.arange(k) * 37.0  # neighbours ~685 nats apart on their rows, next ones far
    centres[9] = centres[0]
    centres[9, -1] = 40.0  # apart from component 0 in the last coordinate only
    X = centres[rng.integers(k, size=n)] + rng.normal(size=(n, d))
    # trailing coordinates at most rows' centres: there the bound is the term itself (tight)
    X[: n // 2, d // 2 :] = 0.0
    p = g.GaussianParams.from_covariances(np.full(k, 1 / k), centres, np.tile(np.eye(d), (k, 1, 1)), "full")
    lp = _ref_log_prob(X, p)
    gap = lp.max(axis=1, keepdims=True) - lp
    assert ((gap > 690) & (gap < 700)).any() and ((gap > 700) & (gap < 710)).any()
    plan = g._make_plan(p, np.dtype(np.float64))
    left_out = g._log_prob_wide_bounded(g._design(X, plan), plan, g._Workspace(np.dtype(np.float64)))
    assert left_out is not None and np.isneginf(left_out).mean() > 0.3  # the bounded path, not the plain one
    # what it leaves out is what the floor takes; the terms 690-700 nats down are computed
    out = np.isneginf(left_out.T)
    assert (gap[out] > 700).all() and not out[(gap > 690) & (gap < 700)].any()
    mask = np.ones(n, dtype=bool)
    for hard in (False, True):
        ref = _ref_stats(X, p, hard, mask)
        (st,) = g.chunk_statistics(X, [p], hard=hard)
        np.testing.assert_allclose(st.loglik, ref["loglik"], rtol=1e-12)
        for j in range(k):
            np.testing.assert_allclose(st.nk[j], ref["nk"][j], rtol=1e-10, atol=1e-250)
            sj = np.abs(ref["s2"][j]).max()
            np.testing.assert_allclose(st.s2[j], ref["s2"][j], rtol=1e-9, atol=1e-9 * sj + 1e-250)


def test_the_diagonal_family_takes_blocks_sized_by_its_products() -> None:
    """Without ``block_rows``, diag and spherical sets are summed in blocks of ``diag_block_rows(D, sum K)`` rows
    (the same bits as asking for them), a pass with any full or tied set in blocks of DEFAULT_BLOCK_ROWS."""
    X = _data(n=2 * g.DIAG_BLOCK_ROWS + 123, d=16)
    diag, sph, full = _params(X, "diag"), _params(X, "spherical"), _params(X, "full")
    diag8, sph8 = _params(X, "diag", k=8), _params(X, "spherical", k=8, seed=2)

    def packed(ps, rows=None):
        return np.concatenate([s.pack() for s in g.chunk_statistics(X, ps, block_rows=rows)])

    seen = set()
    for ps in ([diag], [sph], [diag, sph], [diag8], [diag8, sph8]):
        rows = g.diag_block_rows(16, sum(p.n_components for p in ps))
        seen.add(rows)
        np.testing.assert_array_equal(packed(ps), packed(ps, rows))
        assert not np.array_equal(packed(ps), packed(ps, g.DEFAULT_BLOCK_ROWS))  # the two differ in round-off
    assert seen == {g.DIAG_BLOCK_ROWS, 3776, 1888}
    for ps in ([full], [diag, full]):
        np.testing.assert_array_equal(packed(ps), packed(ps, g.DEFAULT_BLOCK_ROWS))


@pytest.mark.parametrize("d", [1, 5, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("k", [1, 4, 8, 16, 32, 64, 256])
def test_diagonal_blocks_keep_the_products_on_the_small_matrix_path_where_they_can(d: int, k: int) -> None:
    """``diag_block_rows``: both products (``sum K x (2D + 1) x rows`` multiply-adds) within ``_GEMM_PIECE``
    when that allows ``_DIAG_MIN_FIT`` rows or more (at most ``DIAG_BLOCK_ROWS``, a multiple of 16, the most
    that fit up to 16); else ``DIAG_BLOCK_ROWS``."""
    rows = g.diag_block_rows(d, k)
    fit = g._GEMM_PIECE // (k * (2 * d + 1))
    if fit >= g._DIAG_MIN_FIT:
        assert rows % 16 == 0 and k * (2 * d + 1) * rows <= g._GEMM_PIECE
        assert rows == g.DIAG_BLOCK_ROWS or fit - rows < 16
    else:
        assert rows == g.DIAG_BLOCK_ROWS
    assert (g.diag_block_rows(16, 8), g.diag_block_rows(64, 8), g.diag_block_rows(256, 64)) == (3776, 960, 3840)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize(("d", "k"), [(40, 8), (64, 16)])
def test_a_chunk_with_sparse_responsibilities_takes_the_wide_kernel(d: int, k: int, hard: bool) -> None:
    """Full fits on the outer-product kernel from D=40: a chunk whose first sub-block finds
    the responsibilities sparse (separated components, or hard EM) takes the wide kernel for
    its other rows; overlapping components keep the outer-product kernel. Either way the
    statistics equal the textbook ones, held-out rows included."""
    rng = np.random.default_rng(5)
    for scale, sparse in ((4.0, True), (0.05, hard)):
        centres = rng.normal(scale=scale, size=(k, d)) + 50.0
        X = centres[rng.integers(k, size=2500)] + rng.standard_normal((2500, d))
        means = centres + rng.normal(scale=0.1, size=(k, d))
        p = g.GaussianParams.from_covariances(np.full(k, 1 / k), means, np.tile(np.eye(d) * 1.2, (k, 1, 1)), "full")
        plan = g._make_plan(p, np.dtype(np.float64), features=True)
        assert plan.features is not None and plan.wide is not None
        work = g._Workspace(np.dtype(np.float64))
        acc = {"loglik": 0.0, "log_map": 0.0, "nk": np.zeros(k), "c1": np.zeros((k, d)), "c2": np.zeros((k * d, d))}
        acc["fm"] = np.zeros(plan.features.moments_shape)
        g._accumulate_block(X[:1000], p, hard, np.dtype(np.float64), acc, plan, work)
        assert work.marked(f"sparse-{id(plan)}") is sparse, (scale, hard)
        mask = rng.random(len(X)) > 0.2
        ref = _ref_stats(X, p, hard, mask)
        for block_rows in (700, 4096):
            (st,) = g.chunk_statistics(X, [p], hard=hard, train_mask=mask, block_rows=block_rows)
            _check(st, ref, 1e-10, np.abs(ref["s1"]).max() + ref["n"], np.abs(ref["s2"]).max())


def test_kept_fraction_counts_the_pairs_the_wide_scatter_computes() -> None:
    """A pair counts when its responsibility is at least ``_SCATTER_DROP`` of its component's
    largest in the sub-block: one-hot rows keep 1/K; a 1e-20 share is kept, a 1e-30 one is not;
    a component with no weight in the sub-block keeps none."""
    q = np.zeros((4, 8))
    q[np.arange(8) % 4, np.arange(8)] = 1.0
    assert g._kept_fraction(q) == 0.25
    q[0, 1] = 1e-20
    q[0, 2] = 1e-30
    assert g._kept_fraction(q) == 9 / 32
    assert g._SCATTER_DROP == 1e-24
    # hard EM: a component no row of the sub-block goes to has no pair (its syrk is skipped)
    q = np.zeros((4, 8))
    q[0, :5] = 1.0
    q[1, 5:] = 1.0
    assert g._kept_fraction(q) == 8 / 32
