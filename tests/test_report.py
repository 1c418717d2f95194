"""Reports: summary JSON, plots, PCA projection of covariances, anomaly thresholds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import daskem
from daskem.report import (
    log_density_quantiles,
    pca_basis,
    plot_loglik,
    plot_projection,
    plot_select_k,
    threshold_from_quantiles,
    write_report,
    write_summary,
)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(loc=c, scale=s, size=(400, 3)) for c, s in ((0, 1.0), (6, 0.5), (-6, 2.0))])
    gm = daskem.GaussianMixture(n_components=3, n_init=2, random_state=0).fit(x)
    return gm, x


def test_pca_basis_and_projected_covariances():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 4)) * [5.0, 2.0, 0.5, 0.1]
    mean, basis, explained = pca_basis(x)
    np.testing.assert_allclose(basis.T @ basis, np.eye(2), atol=1e-12)
    # the first axes are the high-variance coordinates
    assert abs(basis[0, 0]) > 0.99 and abs(basis[1, 1]) > 0.99
    assert explained[0] > explained[1] > 0
    # a covariance projected through the basis is the covariance of the projected rows
    cov = np.cov(x.T)
    np.testing.assert_allclose(basis.T @ cov @ basis, np.cov(((x - mean) @ basis).T), rtol=1e-10, atol=1e-9)


def test_plots_are_pngs(tmp_path, fitted):
    gm, x = fitted
    for p in (
        plot_loglik(gm.runs_, tmp_path / "a.png"),
        plot_projection(gm, x, tmp_path / "b.png"),
        plot_select_k(
            [
                {
                    "k": k,
                    "train_loglik": -5.0 + k / 10,
                    "validation_loglik": -5.1 + k / 20,
                    "bic": 100.0 - k,
                    "aic": 90.0 - k,
                    "n_iter": 3,
                    "converged": True,
                }
                for k in (2, 3, 4)
            ],
            tmp_path / "c.png",
            best_k=3,
        ),
    ):
        data = p.read_bytes()
        assert data[:8] == PNG and len(data) > 20_000  # a real picture, not an empty canvas


def test_threshold_is_the_training_quantile(fitted):
    gm, x = fitted
    q = log_density_quantiles(gm, x)
    s = gm.score_samples(x)
    for level in (0.01, 0.05, 0.5):
        assert threshold_from_quantiles(q, level) == pytest.approx(np.quantile(s, level), rel=1e-6, abs=1e-9)
    assert np.mean(s < threshold_from_quantiles(q, 0.05)) == pytest.approx(0.05, abs=0.002)


def test_summary_is_standard_json(tmp_path):
    write_summary(tmp_path / "s.json", {"a": math.nan, "b": [1.0, math.inf], "c": np.float64(2.5), "d": np.arange(2)})
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc == {"a": None, "b": [1.0, None], "c": 2.5, "d": [0, 1]}


def test_write_report(tmp_path, fitted):
    gm, x = fitted
    summary = write_report(tmp_path, gm, x, extra={"note": "x"})
    assert summary["plots"] == {
        "loglik": "loglik.png",
        "projection": "projection.png",
        "classification": "classification.png",
    }
    for name in summary["plots"].values():
        assert (tmp_path / name).read_bytes()[:8] == PNG
    again = daskem.load(tmp_path / "model")
    np.testing.assert_array_equal(again.means_, gm.means_)
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["model"]["n_components"] == 3 and doc["note"] == "x"
    assert len(doc["training_log_density_quantiles"]["value"]) == 1001


@pytest.mark.parametrize("k_values", [None, (2, 3)], ids=["fit", "select-k"])
def test_the_report_reads_no_more_data_than_the_fit(tmp_path, k_values) -> None:
    """``fit`` and ``select-k`` report on the training rows the fit drew for its initialisation: a real
    Zarr store's chunks are each read once per counted pass, and never again for the plots and the
    training log-density quantiles (which drew 20,000 rows anew, a whole pass over a large store)."""
    import dask
    import dask.array as da
    import zarr
    from conftest import CountingStore, make_blobs, write_zarr
    from zarr.storage import LocalStore

    from daskem import workflows

    X = make_blobs(n=30_000, d=3, k=3, seed=4)
    path = write_zarr(tmp_path / "x.zarr", X, chunk_rows=3_000)
    store = CountingStore(LocalStore(path, read_only=True))
    z = zarr.open_array(store, mode="r")
    Xd = da.from_zarr(z, chunks=z.chunks)
    options = {"random_state": 0, "covariance_type": "full", "cache": False}
    with dask.config.set(scheduler="threads"):
        summary = workflows.fit_and_report(
            Xd, tmp_path / "out", k=None if k_values else 3, k_values=k_values, options=options, verbose=0
        )
    reads = {key: n for key, n in store.reads.items() if key.startswith("c/")}
    passes = summary["model"]["n_passes"]
    assert len(reads) == 10 and set(reads.values()) == {passes}, (passes, sorted(set(reads.values())))
    assert len(summary["training_log_density_quantiles"]["value"]) == 1001
