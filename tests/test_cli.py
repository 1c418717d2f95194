"""The command line, driven through real subprocesses on real Zarr stores."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import zarr
from _cli_helpers import LOCAL, assert_one_line_error, daskem
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from daskem.cli import build_parser, main
from daskem.io import InputError
from daskem.workflows import parse_k_values

# real processes (the CLI, clusters) or long fits: not in the quick subset
pytestmark = pytest.mark.slow

SUBCOMMANDS = ["demo", "generate", "fit", "select-k", "predict", "score", "run", "submit", "status", "result"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small generated store: 4,000 rows, 3 features, 3 components, chunks of 500 rows."""
    d = tmp_path_factory.mktemp("cli")
    p = daskem(
        "generate",
        d / "data.zarr",
        "--n-samples",
        4000,
        "--n-features",
        3,
        "--n-components",
        3,
        "--chunk-rows",
        500,
        "--seed",
        1,
    )
    assert p.returncode == 0, p.stderr
    return d


def _log_density(model_dir, x):
    """log p(x) from the saved parameters, with scipy (an independent computation)."""
    import daskem

    gm = daskem.load(model_dir)
    comps = [
        multivariate_normal(gm.means_[k], gm.covariances_[k]).logpdf(x) + np.log(gm.weights_[k])
        for k in range(gm.n_components)
    ]
    return logsumexp(np.stack(comps, axis=1), axis=1), np.argmax(np.stack(comps, axis=1), axis=1)


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: daskem {cmd}")


def test_model_options_are_the_estimator_keywords():
    from daskem import GaussianMixture

    fit = build_parser()._subparsers._group_actions[0].choices["fit"]
    flags = {s for a in fit._actions for s in a.option_strings}
    for name in [
        "covariance_type",
        "n_init",
        "max_iter",
        "tol",
        "reg_covar",
        "random_state",
        "init_params",
        "missing",
        "checkpoint",
    ]:
        assert name in GaussianMixture._param_names()
        assert "--" + name.replace("_", "-") in flags


def test_parse_k_values():
    assert parse_k_values("2:5") == [2, 3, 4, 5]
    assert parse_k_values("2:12:4") == [2, 6, 10]
    assert parse_k_values("8,2,4") == [2, 4, 8]
    for bad in ["a:b", "5:2", "0,1", "", "1:2:3:4"]:
        with pytest.raises(InputError):
            parse_k_values(bad)


def test_generate_fit_predict_score(data, tmp_path):
    store = data / "data.zarr"
    truth = json.loads((data / "data.truth.json").read_text())
    assert truth["n_components"] == 3 and len(truth["means"]) == 3
    x = np.asarray(zarr.open_array(str(store), mode="r")[:])
    assert x.shape == (4000, 3)

    out = tmp_path / "fit"
    p = daskem("fit", store, "--k", 3, "--n-init", 2, "--random-state", 0, "--out", out, *LOCAL)
    assert p.returncode == 0, p.stderr
    # progress: iteration i/max_iter of one named run, log-likelihood, delta, time per pass, ETA; the dashboard
    assert "dashboard" in p.stderr
    lines = re.findall(
        r"^iteration +(\d+)/100  run (k=3 init=\d)  loglik +(\S+)  delta +\S+  \S+ m?s/pass  (ETA <= .* \(max_iter\)|done)"
        r".*  running (\d)/2  passes \d+$",
        p.stderr,
        re.M,
    )
    assert lines and lines[-1][3] == "done" and lines[-1][4] == "0", p.stderr
    assert re.search(r"^EM finished in .*: \d of 2 run\(s\) converged", p.stderr, re.M), p.stderr
    for f in ["model/model.json", "model/arrays.npz", "summary.json", "loglik.png", "projection.png"]:
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["n_components"] == 3
    assert len(summary["model"]["runs"]) == 2
    # the fitted means are the true means (well separated data)
    means = np.array(summary["model"]["means"])
    for m in np.array(truth["means"]):
        assert np.min(np.linalg.norm(means - m, axis=1)) < 0.3

    logd, labels_ref = _log_density(out / "model", x)

    # score: one JSON document with the mean log-likelihood, equal to scipy's
    p = daskem("score", out, store, *LOCAL, "--quiet")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["n_samples"] == 4000
    np.testing.assert_allclose(s["mean_loglik"], logd.mean(), rtol=1e-10)
    n_par = 3 * 3 + 3 * 6 + 2
    np.testing.assert_allclose(s["bic"], -2 * logd.sum() + n_par * np.log(4000), rtol=1e-10)

    # predict: labels, responsibilities and anomaly flags, chunked like the input
    pred = tmp_path / "labels.zarr"
    p = daskem("predict", out, store, "--out", pred, "--proba", "--anomaly-quantile", 0.05, *LOCAL)
    assert p.returncode == 0, p.stderr
    g = zarr.open_group(str(pred), mode="r")
    assert set(g.array_keys()) == {"labels", "proba", "log_density", "anomaly"}
    assert g["labels"].chunks == (500,) and g["proba"].chunks == (500, 3)
    np.testing.assert_array_equal(g["labels"][:], labels_ref)
    proba = g["proba"][:]
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(g["log_density"][:], logd, rtol=1e-10)
    # the threshold is the 5% quantile of the training log-density (on a sample of the training rows)
    thr = g.attrs["daskem"]["anomaly_threshold"]
    np.testing.assert_array_equal(g["anomaly"][:], logd < thr)
    assert 0.03 < g["anomaly"][:].mean() < 0.07


def test_select_k_cli(data, tmp_path):
    out = tmp_path / "sk"
    p = daskem(
        "select-k",
        data / "data.zarr",
        "--k",
        "2:4",
        "--random-state",
        0,
        # kmeans costs the same 2 passes as k-means++ now; one k-means++ start (seed 0)
        # leaves K=3 in a poor local optimum (-5.18 against -5.09 per row) and BIC then picks 4
        "--init-params",
        "kmeans",
        "--criterion",
        "bic",
        "--out",
        out,
        *LOCAL,
    )
    assert p.returncode == 0, p.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_k"] == 3
    assert [r["k"] for r in summary["select_k"]["table"]] == [2, 3, 4]
    assert set(summary["select_k"]["table"][0]) >= {
        "k",
        "train_loglik",
        "validation_loglik",
        "bic",
        "aic",
        "n_iter",
        "converged",
    }
    assert (out / "select_k.png").is_file() and (out / "model" / "model.json").is_file()


def test_bad_input_exits_2_with_one_line(data, tmp_path):
    store = data / "data.zarr"
    assert_one_line_error(daskem("fit", tmp_path / "missing.zarr", "--k", 2, "--out", tmp_path / "o"))
    assert_one_line_error(daskem("fit", store, "--k", 0, "--out", tmp_path / "o"))
    assert_one_line_error(daskem("fit", store, "--k", 2, "--out", tmp_path / "o", "--covariance-type", "bogus"))
    assert_one_line_error(daskem("fit", store, "--out", tmp_path / "o"))  # --k missing
    assert_one_line_error(daskem("select-k", store, "--k", "9:2", "--out", tmp_path / "o"))
    assert_one_line_error(daskem("predict", tmp_path / "nomodel", store, "--out", tmp_path / "l.zarr"))
    assert_one_line_error(daskem("status", "no-such-job", DASKEM_HOME=str(tmp_path / "home")))
    assert_one_line_error(
        daskem(
            "fit",
            store,
            "--k",
            2,
            "--out",
            tmp_path / "o",
            "--scheduler",
            "tcp://127.0.0.1:1",
            DASKEM_CONNECT_TIMEOUT="3s",
        )
    )
    assert not (tmp_path / "o").exists()


def test_model_with_other_dimension_is_refused(data, tmp_path):
    other = tmp_path / "d4.npy"
    np.save(other, np.random.default_rng(0).normal(size=(100, 4)))
    out = tmp_path / "fit4"
    assert daskem("fit", other, "--k", 2, "--out", out, *LOCAL, "--quiet").returncode == 0
    line = assert_one_line_error(daskem("predict", out, data / "data.zarr", "--out", tmp_path / "l.zarr"))
    assert f"data.zarr has 3 features (columns), but the model in {out} was fitted on 4" in line
    assert_one_line_error(daskem("score", out, data / "data.zarr"))
    assert not (tmp_path / "l.zarr").exists()


def test_failure_leaves_existing_output_in_place(data, tmp_path):
    out = tmp_path / "keep"
    good = tmp_path / "good.npy"
    np.save(good, np.random.default_rng(1).normal(size=(300, 2)))
    assert daskem("fit", good, "--k", 2, "--out", out, *LOCAL, "--quiet").returncode == 0
    before = {f.relative_to(out): f.read_bytes() for f in out.rglob("*") if f.is_file()}
    bad = tmp_path / "nan.npy"
    x = np.random.default_rng(0).normal(size=(500, 2))
    x[7, 1] = np.nan
    np.save(bad, x)
    p = daskem("fit", bad, "--k", 2, "--out", out, *LOCAL, "--quiet")
    line = assert_one_line_error(p)
    assert "NaN" in line and "--missing marginalize" in line  # the CLI's flag names, not Python keywords
    assert {f.relative_to(out): f.read_bytes() for f in out.rglob("*") if f.is_file()} == before
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".keep")] == []  # no temp folder left


def test_demo_small(tmp_path):
    out = tmp_path / "demo"
    p = daskem(
        "demo",
        "--out",
        out,
        "--n-samples",
        20000,
        "--n-features",
        2,
        "--n-components",
        3,
        "--k",
        "2:4",
        "--separation",
        8,
        *LOCAL,
    )
    assert p.returncode == 0, p.stderr
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["demo"]["chosen_k"] == 3
    assert summary["demo"]["label_agreement"] > 0.95
    for f in ["loglik.png", "select_k.png", "projection.png"]:
        assert (out / "report" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert zarr.open_group(str(out / "labels.zarr"), mode="r")["labels"].shape == (20000,)


def test_local_clusters_run_without_the_worker_profiler(monkeypatch) -> None:
    """daskem's own clusters turn distributed's statistical profiler off (8-15% on the kernel)."""
    from daskem import cli

    monkeypatch.delenv("DASKEM_WORKER_PROFILE", raising=False)
    assert cli.local_cluster_config() == {"distributed.worker.profile.enabled": False}
    args = argparse.Namespace(n_workers=1, threads_per_worker=1, memory_limit=None, quiet=True)
    with cli.cluster_client(args) as client:
        flags = client.run(lambda: __import__("dask").config.get("distributed.worker.profile.enabled"))
    assert list(flags.values()) == [False]
    monkeypatch.setenv("DASKEM_WORKER_PROFILE", "1")
    assert cli.local_cluster_config() == {}


# ------------------------------------------------------------------------------------------------
# choosing the covariance model and K together


@pytest.fixture(scope="module")
def iris_npy(tmp_path_factory):
    """R's iris (the mclust fixture's CSV) as a .npy file."""
    from pathlib import Path

    csv = Path(__file__).parent / "fixtures" / "mclust" / "iris.csv"
    f = tmp_path_factory.mktemp("iris") / "iris.npy"
    np.save(f, np.loadtxt(csv, delimiter=",", skiprows=1))
    return f


def test_select_k_chooses_model_and_k_cli(iris_npy, tmp_path):
    """--covariance-type all: one row per (model, K) in summary.json and select_k.csv, mclust's choice on iris
    (VEV, G=2; tests/test_mclust_fit.py), the printed table; a comma list whose range is too narrow says so."""
    from daskem._covariance import MCLUST_MODELS

    out = tmp_path / "all"
    p = daskem(
        "select-k", iris_npy, "--k", "1:3", "--covariance-type", "all", "--criterion", "bic",
        "--random-state", 0, "--tol", "1e-6", "--max-iter", 1000, "--out", out, *LOCAL,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    summary = json.loads((out / "summary.json").read_text())
    table = summary["select_k"]["table"]
    assert [(r["covariance_type"], r["k"]) for r in table] == [(t, k) for t in MCLUST_MODELS for k in (1, 2, 3)]
    assert (summary["best_covariance_type"], summary["best_k"]) == ("VEV", 2)
    assert summary["select_k"]["best_covariance_type"] == "VEV" and summary["at_range_edge"] is False
    assert summary["model"]["covariance_type"] == "VEV" and summary["model"]["n_components"] == 2
    assert set(table[0]) >= {"loglik", "df", "bic", "icl", "aic", "n_iter", "converged", "degenerate", "failed"}
    chosen = next(r for r in table if (r["covariance_type"], r["k"]) == ("VEV", 2))
    assert chosen["bic"] == min(r["bic"] for r in table if not r["failed"] and not r["degenerate"])
    csv = (out / "select_k.csv").read_text().splitlines()
    assert len(csv) == 1 + 14 * 3 and csv[0].startswith("covariance_type,k,loglik,")
    assert "best model VEV, K = 2 (bic)" in p.stderr
    printed = [line.split() for line in p.stderr.splitlines() if line.split()[:1] in ([t] for t in MCLUST_MODELS)]
    assert [(w[0], int(w[1])) for w in printed] == [(t, k) for t in MCLUST_MODELS for k in (1, 2, 3)]
    assert (out / "select_k.png").is_file() and (out / "model" / "model.json").is_file()

    out2 = tmp_path / "list"
    p = daskem(
        "select-k", iris_npy, "--k", "1:2", "--covariance-type", "VVV,EEE,VII", "--criterion", "bic",
        "--random-state", 0, "--out", out2, *LOCAL,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    summary = json.loads((out2 / "summary.json").read_text())
    assert [(r["covariance_type"], r["k"]) for r in summary["select_k"]["table"]] == [
        (t, k) for t in ("VVV", "EEE", "VII") for k in (1, 2)
    ]
    assert (summary["best_covariance_type"], summary["best_k"]) == ("VVV", 2) and summary["at_range_edge"] is True
    assert "note: K = 2 is the largest of the range 1..2" in p.stderr


def test_select_k_refuses_an_unknown_model_before_work(iris_npy, tmp_path):
    out = tmp_path / "o"
    p = daskem("select-k", iris_npy, "--k", "1:3", "--covariance-type", "VVV,XYZ", "--out", out, *LOCAL)
    line = assert_one_line_error(p)
    assert "--covariance-type" in line and "'XYZ'" in line and "all" in line
    assert not out.exists()
    line = assert_one_line_error(
        daskem("select-k", iris_npy, "--k", "1:3", "--covariance-type", "all,VVV", "--out", out)
    )
    assert "--covariance-type" in line and not out.exists()


def test_parse_covariance_types_and_the_table_lines():
    from daskem._covariance import MCLUST_MODELS
    from daskem.cli import selection_table_lines
    from daskem.workflows import parse_covariance_types

    assert parse_covariance_types("all") == list(MCLUST_MODELS)
    assert parse_covariance_types(" VVV, EEE,VII ") == ["VVV", "EEE", "VII"]
    assert parse_covariance_types(["full", "EII"]) == ["full", "EII"]
    for bad in ["VVV,,XYZ", "", ["VVV", 3], "all,VVV"]:
        with pytest.raises(InputError, match="--covariance-type"):
            parse_covariance_types(bad)
    nan = float("nan")
    row = dict(loglik=-10.0, train_loglik=-1.0, validation_loglik=nan, bic=30.0, icl=31.0, aic=25.0, df=5)
    table = [
        {"covariance_type": "VVV", "k": 1, **row, "n_iter": 2, "converged": True, "degenerate": "", "failed": False},
        {"covariance_type": "VVV", "k": 2, **row, "n_iter": 0, "converged": False, "degenerate": "", "failed": True},
        {"covariance_type": "EII", "k": 2, **row, "n_iter": 9, "converged": True, "degenerate": "few rows"},
    ]
    lines = selection_table_lines(table)
    assert lines[0].split() == ["model", "K", "loglik", "df", "BIC", "ICL", "AIC", "iter", "conv", "note"]
    assert lines[1].split() == ["VVV", "1", "-10.000", "5", "30.00", "31.00", "25.00", "2", "yes"]
    assert lines[2].endswith("failed") and lines[3].endswith("degenerate: few rows")
    # a select_k table (no model, no total): the mean per row; a validation column when rows were held out
    lines = selection_table_lines([{k: v for k, v in table[0].items() if k not in ("covariance_type", "loglik")}
                                   | {"validation_loglik": -1.5}])  # fmt: skip
    assert lines[0].split() == ["K", "train", "df", "BIC", "ICL", "AIC", "validation", "se", "iter", "conv", "note"]
