"""select_k: finds K on a 5-component store with every criterion, reproducibly, whatever the chunking."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from _cluster import blob_means, write_blob_store
from dask.callbacks import Callback
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import daskem
from daskem._engine import RowSplit
from daskem.select import choose

N, D, K = 20_000, 3, 5
KS = [3, 4, 5, 6, 7]
# plain EM: converged fits of K=6, 7 score within 2e-4 per row of K=5 on the held-out rows (noise, within
# one standard error: the one-standard-error rule keeps K=5; test_validation_keeps_five_within_one_standard_error)
OPTS = dict(covariance_type="full", n_init=2, random_state=1, chunk_bytes=80_000, accelerate=None)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[str, str]:
    """The same 5-component data in 2000-row and in 3333-row chunks."""
    d = tmp_path_factory.mktemp("selk")
    a = write_blob_store(d / "a.zarr", N, D, K, chunk_rows=2_000, seed=5)
    X = zarr.open_array(a, mode="r")[:]
    b = zarr.create_array(str(d / "b.zarr"), shape=X.shape, chunks=(3_333, D), dtype=X.dtype)
    b[:] = X
    return a, str(d / "b.zarr")


@pytest.fixture(scope="module")
def results(stores) -> dict:
    a, b = stores
    # the same split for every criterion (bic and aic hold nothing out unless asked)
    out = {
        c: daskem.select_k(a, KS, criterion=c, validation_fraction=0.1, **OPTS) for c in ("validation", "bic", "aic")
    }
    out["bic_all_rows"] = daskem.select_k(a, KS, criterion="bic", **OPTS)
    out["rechunked"] = daskem.select_k(b, KS, criterion="validation", **OPTS)
    return out


def _sk_from(model: daskem.GaussianMixture) -> SkGaussianMixture:
    sk = SkGaussianMixture(model.n_components, covariance_type=model.covariance_type)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"):
        setattr(sk, name, getattr(model, name))
    return sk


@pytest.mark.parametrize("criterion", ["validation", "bic", "aic"])
def test_finds_five_components(results, stores, criterion):
    res = results[criterion]
    assert res.best_k == 5
    assert res.criterion == criterion
    assert [row["k"] for row in res.table] == KS
    assert all(
        set(row)
        == {
            "k",
            "train_loglik",
            "validation_loglik",
            "validation_se",
            "bic",
            "icl",
            "aic",
            "df",
            "n_iter",
            "converged",
            "degenerate",
            "failed",
        }
        and row["failed"] is False
        for row in res.table
    )
    assert not res.at_range_edge
    assert not any(row["degenerate"] for row in res.table)
    gm = res.best_model
    assert isinstance(gm, daskem.GaussianMixture) and gm.n_components == 5
    # the right components: every true mean has a fitted mean next to it
    true = blob_means(K, D, seed=5)
    dist = np.linalg.norm(true[:, None, :] - gm.means_[None, :, :], axis=2)
    assert sorted(dist.argmin(axis=1)) == list(range(5))
    assert dist.min(axis=1).max() < 0.1
    np.testing.assert_allclose(gm.weights_, 0.2, atol=0.02)


@pytest.mark.parametrize("accelerate", [None, "squarem"])
def test_validation_keeps_five_within_one_standard_error(stores, accelerate):
    """K=6 and 7 score within about one standard error of the difference (5e-4 to 1.3e-3 per held-out
    row) of K=5, so the one-standard-error rule keeps K=5. With plain EM the highest held-out mean is
    K=6's (5.7e-4 above K=5, whose s.e. is 6.6e-4): the highest mean alone would not choose K=5."""
    opts = {**OPTS, "accelerate": accelerate}
    res = daskem.select_k(stores[0], KS, criterion="validation", validation_fraction=0.1, **opts)
    table = {row["k"]: row for row in res.table}
    top = max(res.table, key=lambda r: r["validation_loglik"])
    assert top["validation_se"] == 0.0
    if accelerate is None:
        assert top["k"] > 5
    assert table[5]["validation_loglik"] >= top["validation_loglik"] - table[5]["validation_se"]
    assert table[4]["validation_loglik"] < top["validation_loglik"] - table[4]["validation_se"]
    assert res.best_k == 5


def test_choose_by_validation_takes_the_fewest_parameters_within_one_standard_error():
    nan = float("nan")

    def row(k, v, se, df, degenerate=""):
        return {"k": k, "validation_loglik": v, "validation_se": se, "df": df, "degenerate": degenerate}

    table = [row(2, -3.0, 0.1, 5), row(3, -2.0, 0.05, 8), row(4, -1.97, 0.04, 11), row(5, -1.96, 0.0, 14)]
    assert choose(table, "validation") == 1  # K=3 is 0.04 below the top, within its 0.05: the simplest within
    table[1]["validation_se"] = 0.01
    assert choose(table, "validation") == 2  # K=3 is now outside; K=4 (0.01 below, se 0.04) is the simplest within
    table[2]["validation_se"] = nan
    assert choose(table, "validation") == 3  # no standard error: only the highest qualifies
    table = [row(2, -2.0, 0.5, 5, degenerate="few rows"), row(3, -1.9, 0.0, 8)]
    assert choose(table, "validation") == 1  # never a degenerate row while another is left


def test_table_matches_sklearn_on_the_split_rows(results, stores):
    """Train/validation log-likelihoods, BIC and AIC of every K, recomputed by sklearn on
    the rows the split assigns (the split depends only on the row index and the seed)."""
    res = results["validation"]
    X = zarr.open_array(stores[0], mode="r")[:]
    train = RowSplit(0.1, res.seed).is_train(np.arange(N))
    assert abs((~train).mean() - 0.1) < 0.01
    for row in res.table:
        sk = _sk_from(res.models[row["k"]])
        assert row["train_loglik"] == pytest.approx(sk.score(X[train]), rel=1e-10)
        assert row["validation_loglik"] == pytest.approx(sk.score(X[~train]), rel=1e-10)
        assert row["bic"] == pytest.approx(sk.bic(X[train]), rel=1e-10)
        assert row["aic"] == pytest.approx(sk.aic(X[train]), rel=1e-10)
        assert row["df"] == sk._n_parameters()
        assert row["icl"] == pytest.approx(res.models[row["k"]].icl(X[train]), rel=1e-10)
        assert row["icl"] >= row["bic"]
        assert row["n_iter"] == res.models[row["k"]].n_iter_ >= 1
    # the standard error of each K's held-out mean minus the highest one's, paired over the
    # same rows, recomputed from sklearn's per-row log-likelihoods
    per_row = {row["k"]: _sk_from(res.models[row["k"]]).score_samples(X[~train]) for row in res.table}
    top = max(res.table, key=lambda r: r["validation_loglik"])["k"]
    for row in res.table:
        diff = per_row[row["k"]] - per_row[top]
        se = diff.std(ddof=1) / np.sqrt(diff.size)
        assert row["validation_se"] == pytest.approx(se, rel=1e-6, abs=1e-12), row["k"]
    assert [r["validation_se"] for r in res.table if r["k"] == top] == [0.0]
    assert all(r["validation_se"] > 0 for r in res.table if r["k"] != top)
    # held-out rows were not trained on: the fit on them is worse than on the training rows
    best = res.table[KS.index(5)]
    assert best["validation_loglik"] < best["train_loglik"] + 0.1


def test_same_seed_same_table_and_chunking_does_not_matter(results):
    ref = results["validation"].table
    # three runs with the same seed (the criterion only changes the choice)
    assert results["bic"].table == ref
    assert results["aic"].table == ref
    other = results["rechunked"].table
    for a, b in zip(ref, other):
        assert (a["k"], a["n_iter"], a["converged"]) == (b["k"], b["n_iter"], b["converged"])
        for key in ("train_loglik", "validation_loglik", "bic", "aic"):
            assert b[key] == pytest.approx(a[key], rel=1e-9), (a["k"], key)
        assert b["validation_se"] == pytest.approx(a["validation_se"], rel=1e-6, abs=1e-12), a["k"]
    np.testing.assert_allclose(
        results["rechunked"].best_model.means_, results["validation"].best_model.means_, rtol=1e-9
    )


class _CountGraphs(Callback):
    def __init__(self):
        super().__init__()
        self.n = 0

    def _start(self, dsk):
        self.n += 1


@pytest.mark.filterwarnings("ignore::daskem.ConvergenceWarning")
@pytest.mark.filterwarnings("ignore:validation chose:UserWarning")
@pytest.mark.parametrize("init_params, init_passes", [("random", 1), ("k-means++", 2)])
def test_all_k_share_the_passes(stores, init_params, init_passes):
    """Every K and restart advances in the same passes, initialisation included:
    3 Ks cost the passes of 1."""
    counts = {}
    for ks in ([4], [3, 4, 5]):
        with _CountGraphs() as cb:
            res = daskem.select_k(
                stores[0], ks, init_params=init_params, tol=0.0, max_iter=4, n_init=2, random_state=0, cache=False
            )
        assert all(row["n_iter"] == 4 for row in res.table)
        counts[len(ks)] = cb.n
    # the init (a sample; for k-means++ also one hard pass), four EM passes, one scoring pass
    assert counts == {1: init_passes + 5, 3: init_passes + 5}


@pytest.mark.filterwarnings("ignore:validation chose:UserWarning")
def test_kmeans_init_passes_are_shared_across_k(stores):
    counts = {}
    for ks in ([4], [3, 4, 5]):
        with _CountGraphs() as cb:
            with pytest.warns(daskem.ConvergenceWarning):
                daskem.select_k(stores[0], ks, tol=0.0, max_iter=2, n_init=2, random_state=0, cache=False)
        counts[len(ks)] = cb.n
    # Lloyd runs until the slowest restart of any K converges, so 3 Ks may need
    # a few more Lloyd passes than 1 K, never 3 times as many
    assert counts[3] < 2 * counts[1]


def test_bic_holds_nothing_out_by_default(results, stores):
    """criterion='bic' (and 'icl', 'aic'): every row is trained on and scored, as mclust does."""
    res = results["bic_all_rows"]
    assert res.validation_fraction == 0.0 and res.best_k == 5 and not res.at_range_edge
    X = zarr.open_array(stores[0], mode="r")[:]
    for row in res.table:
        sk = _sk_from(res.models[row["k"]])
        assert np.isnan(row["validation_loglik"])
        assert row["train_loglik"] == pytest.approx(sk.score(X), rel=1e-10)
        assert row["bic"] == pytest.approx(sk.bic(X), rel=1e-10)
    # the table differs from the one on 90% of the rows
    assert res.table[0]["bic"] != results["bic"].table[0]["bic"]
    # validation_fraction=0 says the same explicitly
    zero = daskem.select_k(X[:3000], [4, 5, 6], criterion="icl", validation_fraction=0, **OPTS)
    assert zero.validation_fraction == 0.0 and zero.best_k == 5


def test_a_choice_at_the_edge_of_the_range_is_flagged(stores):
    X = zarr.open_array(stores[0], mode="r")[:3000]
    with pytest.warns(UserWarning, match="largest of the candidates 2..4"):
        res = daskem.select_k(X, [2, 3, 4], criterion="bic", **OPTS)
    assert res.best_k == 4 and res.at_range_edge
    with pytest.warns(UserWarning, match="smallest"):
        res = daskem.select_k(np.random.default_rng(0).normal(size=(3000, 2)), [1, 2], criterion="bic")
    assert res.best_k == 1 and res.at_range_edge


def test_bad_arguments_are_refused(stores):
    a = stores[0]
    with pytest.raises(daskem.InputError, match="criterion"):
        daskem.select_k(a, KS, criterion="loglik")
    with pytest.raises(daskem.InputError, match="validation_fraction"):
        daskem.select_k(a, KS, validation_fraction=1.0)
    with pytest.raises(daskem.InputError, match="needs held-out rows"):
        daskem.select_k(a, KS, criterion="validation", validation_fraction=0)
    with pytest.raises(daskem.InputError, match="k_values"):
        daskem.select_k(a, [])
    with pytest.raises(daskem.InputError, match="means_init"):
        daskem.select_k(a, KS, means_init=np.zeros((3, D)))
    with pytest.raises(daskem.InputError, match="unknown option"):
        daskem.select_k(a, KS, n_clusters=3)
    with pytest.raises(daskem.InputError, match="covariance_type"):
        daskem.select_k(a, KS, covariance_type="round")
    with pytest.raises(daskem.InputError, match="larger than"):
        daskem.select_k(np.zeros((10, 2)), [2, 20])
