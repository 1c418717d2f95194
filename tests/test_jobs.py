"""Batch jobs: job files, `run` with checkpoints, `submit` to a real cluster, `status`/`result` by id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from _cli_helpers import LOCAL, DaskCluster, assert_one_line_error, daskem, env

from daskem.datasets import generate_zarr
from daskem.io import InputError
from daskem.jobs import load_job

# real processes (the CLI, clusters) or long fits: not in the quick subset
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("jobs")
    generate_zarr(d / "data.zarr", 3000, 2, 3, seed=5, chunk_rows=500)
    return d / "data.zarr"


def _job(folder, store, output="out", extra=""):
    text = f"""
[input]
path = "{store}"

[model]
n_components = 3
n_init = 2
random_state = 0

[output]
path = "{output}"
predict = true
anomaly_quantile = 0.02
{extra}
"""
    f = folder / "job.toml"
    f.write_text(text)
    return f


def test_load_job_resolves_paths_and_refuses_mistakes(tmp_path, store):
    job = load_job(_job(tmp_path, store))
    assert job["output"]["path"] == str(tmp_path / "out")
    assert job["model"] == {"n_components": 3, "n_init": 2, "random_state": 0}
    head = "[input]\npath = 'x'\n[output]\npath = 'y'\n"
    bad = {
        head + "[model]\nn_componentz = 3\n": "n_componentz",
        "[input]\npath = 'x'\n[model]\nn_components = 2\n[output]\npath = 'x'\nbogus = 1\n": "bogus",
        "[input]\narray = 'x'\n[model]\nn_components = 2\n[output]\npath = 'x'\n": r"\[input\] needs a path",
        "[inputs]\npath = 'x'\n": "inputs",
        head: "n_components",
        head + "[model]\nn_components = 2\ncovariance_type = 'bogus'\n": "covariance_type",
        head + "[select]\nk = '5:2'\n": "K values",
        "not toml [": "TOML",
    }
    for text, word in bad.items():
        f = tmp_path / "bad.toml"
        f.write_text(text)
        with pytest.raises(InputError, match=word):
            load_job(f)
    sel = tmp_path / "sel.toml"
    sel.write_text(f"[input]\npath = '{store}'\n[select]\nk = '2:4'\n[output]\npath = 'o'\n")
    assert load_job(sel)["select"] == {
        "k": [2, 3, 4],
        "criterion": "validation",
        "validation_fraction": None,
    }  # select_k then holds out 0.1 for validation, none for bic/icl/aic


def test_job_covariance_type_all_or_a_list_chooses_the_model(tmp_path, store):
    """[model] covariance_type = "all" or a list, with [select]: the model and K chosen together; names
    checked when the file is read; several models without [select] refused."""
    from daskem._covariance import MCLUST_MODELS

    sel = "[select]\nk = '1:3'\ncriterion = 'bic'\n"
    head = f"[input]\npath = '{store}'\n[output]\npath = 'o'\n"
    f = tmp_path / "all.toml"
    f.write_text(head + "[model]\ncovariance_type = 'all'\n" + sel)
    job = load_job(f)
    assert job["select"]["covariance_types"] == list(MCLUST_MODELS) and "covariance_type" not in job["model"]
    f.write_text(head + "[model]\ncovariance_type = ['VVV', 'EEE']\n" + sel)
    assert load_job(f)["select"]["covariance_types"] == ["VVV", "EEE"]
    f.write_text(head + "[model]\ncovariance_type = ['VVV']\n" + sel)
    job = load_job(f)
    assert job["model"]["covariance_type"] == "VVV" and "covariance_types" not in job["select"]
    bad = {
        head + "[model]\ncovariance_type = ['VVV', 'XYZ']\n" + sel: r"\[model\] covariance_type: unknown .*'XYZ'",
        head + "[model]\nn_components = 2\ncovariance_type = 'all'\n": "needs a \\[select\\] table",
        head + "[model]\ncovariance_type = 3\n" + sel: "covariance_type",
    }
    for text, word in bad.items():
        f.write_text(text)
        with pytest.raises(InputError, match=word):
            load_job(f)


def test_run_job_choosing_model_and_k(tmp_path, store):
    """A job with three models and K = 1..3 (BIC): the table has every pair, the summary and the result name
    the chosen model and K (the generated data are three full-covariance components)."""
    job = _job(tmp_path, store, extra="[select]\nk = '1:3'\ncriterion = 'bic'\n")
    job.write_text(job.read_text().replace("n_components = 3", "covariance_type = ['VVV', 'EEE', 'VII']"))
    p = daskem("run", job, *LOCAL, DASKEM_HOME=str(tmp_path / "home"))
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    table = summary["select_k"]["table"]
    assert [(r["covariance_type"], r["k"]) for r in table] == [(t, k) for t in ("VVV", "EEE", "VII") for k in (1, 2, 3)]
    best = min((r for r in table if not r["failed"] and not r["degenerate"]), key=lambda r: r["bic"])
    assert (summary["best_covariance_type"], summary["best_k"]) == (best["covariance_type"], best["k"])
    assert summary["best_k"] == 3 and summary["at_range_edge"] is True
    assert res["best_covariance_type"] == summary["best_covariance_type"] and res["best_k"] == 3
    assert (tmp_path / "out" / "select_k.csv").is_file() and (tmp_path / "out" / "labels.zarr").is_dir()


def test_run_job_with_checkpoint_and_status(tmp_path, store):
    home = tmp_path / "home"
    job = _job(tmp_path, store)
    p = daskem("run", job, *LOCAL, DASKEM_HOME=str(home))
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    out = tmp_path / "out"
    state = json.loads((out / "job.json").read_text())
    assert state["state"] == "done" and state["id"] == res["id"]
    assert (out / "checkpoint" / "checkpoint.json").is_file()  # checkpointed every iteration
    for f in ["model/model.json", "summary.json", "loglik.png", "projection.png", "labels.zarr"]:
        assert (out / f).exists(), f
    g = zarr.open_group(str(out / "labels.zarr"), mode="r")
    assert g["labels"].shape == (3000,) and g["anomaly"].shape == (3000,)
    # findable by id from another process
    p = daskem("status", res["id"], DASKEM_HOME=str(home))
    assert p.returncode == 0 and json.loads(p.stdout)["state"] == "done"
    p = daskem("result", res["id"], DASKEM_HOME=str(home))
    assert json.loads(p.stdout)["lower_bound"] == pytest.approx(res["lower_bound"])
    # run again: resumes from the finished checkpoint (no new initialisation), same model
    p = daskem("run", job, *LOCAL, DASKEM_HOME=str(home))
    assert p.returncode == 0, p.stderr
    assert "resuming from checkpoint" in p.stderr
    assert json.loads(p.stdout)["lower_bound"] == pytest.approx(res["lower_bound"], abs=1e-12)
    p = daskem("status", DASKEM_HOME=str(home))
    lines = p.stdout.strip().splitlines()
    assert lines[0].split("\t") == ["JOB ID", "STATE", "ITERATION", "LOGLIK", "UPDATED", "OUTPUT"]
    assert len(lines) == 1 + 2  # the header, then both runs of the job file
    # a finished job keeps its last progress: EM finished, the iteration reached, the final log-likelihood
    second = json.loads(daskem("status", lines[2].split("\t")[0], DASKEM_HOME=str(home)).stdout)
    progress = second["progress"]
    assert progress["finished"] and progress["n_running"] == 0 and progress["max_iter"] == 100
    assert progress["loglik"] == pytest.approx(res["lower_bound"], abs=1e-12)
    assert lines[2].split("\t")[2] == f"{progress['iteration']}/100"


@pytest.mark.parametrize("stop", ["SIGINT", "SIGKILL"])
def test_status_of_a_running_job(tmp_path, stop):
    """`daskem status` while a job runs: its iteration out of max_iter, log-likelihood and update time; after it
    is stopped, failed (Ctrl-C: recorded by the job; SIGKILL: found by status, the process being gone)."""
    generate_zarr(tmp_path / "data.zarr", 20_000, 4, 6, seed=3, chunk_rows=2_000, separation=1.5)
    home = tmp_path / "home"
    # tol 0: it runs until stopped (max_iter 1,000,000), one pass every few milliseconds
    job = _job(tmp_path, tmp_path / "data.zarr", extra="")
    job.write_text(job.read_text().replace("random_state = 0", "random_state = 0\ntol = 0.0\nmax_iter = 1000000"))
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "daskem", "run", str(job), *LOCAL],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env(DASKEM_HOME=str(home)),
        start_new_session=True,
    )
    try:
        progress_file = tmp_path / "out" / "progress.json"
        deadline = time.monotonic() + 180
        while not (progress_file.exists() and json.loads(progress_file.read_text())["iteration"] >= 3):
            assert proc.poll() is None, (tmp_path / "run.log").read_text()
            assert time.monotonic() < deadline, "the job did not reach iteration 3"
            time.sleep(0.1)
        p = daskem("status", DASKEM_HOME=str(home))
        header, row = p.stdout.strip().splitlines()
        assert header.split("\t") == ["JOB ID", "STATE", "ITERATION", "LOGLIK", "UPDATED", "OUTPUT"]
        job_id, state, iteration, loglik, updated, output = row.split("\t")
        assert state == "running" and output == str(tmp_path / "out")
        i, n = map(int, iteration.split("/"))
        assert i >= 3 and n == 1_000_000
        assert np.isfinite(float(loglik)) and updated.startswith("20")
        p = daskem("status", job_id, DASKEM_HOME=str(home))
        s = json.loads(p.stdout)
        assert s["state"] == "running" and not s["progress"]["finished"]
        assert s["progress"]["iteration"] >= i and s["progress"]["run"] in {"k=3 init=0", "k=3 init=1"}
        assert s["progress"]["n_runs"] == 2 and s["progress"]["seconds_per_pass"] > 0
        assert f"job {job_id}: running; iteration " in p.stderr and "/1000000 of run k=3 init=" in p.stderr
        assert "ETA" in p.stderr and "updated 20" in p.stderr
    finally:
        os.killpg(proc.pid, getattr(signal, stop))  # Ctrl-C: the job stops and records it; SIGKILL: it cannot
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    s = json.loads(daskem("status", job_id, DASKEM_HOME=str(home)).stdout)
    assert s["state"] == "failed" and s["progress"]["iteration"] >= i  # the last recorded progress stays
    assert ("ended without recording a result" in s["error"]) == (stop == "SIGKILL"), s["error"]
    header, row = daskem("status", DASKEM_HOME=str(home)).stdout.strip().splitlines()
    assert row.split("\t")[1] == "failed"


def test_submit_needs_a_cluster(tmp_path, store):
    line = assert_one_line_error(daskem("submit", _job(tmp_path, store), DASKEM_HOME=str(tmp_path / "h")))
    assert "--scheduler" in line


@pytest.mark.cluster
def test_submit_survives_the_submitting_process(tmp_path, store):
    home = tmp_path / "home"
    with DaskCluster(tmp_path, n_workers=1, nthreads=2, DASKEM_HOME=str(home)) as cluster:
        job = _job(tmp_path, store, extra=f'[cluster]\nscheduler = "{cluster.address}"\n')
        p = daskem("submit", job, DASKEM_HOME=str(home))  # this process exits at once
        assert p.returncode == 0, p.stderr
        job_id = p.stdout.strip()
        assert (home / "jobs" / f"{job_id}.json").is_file()
        p = daskem("status", job_id, DASKEM_HOME=str(home))
        assert json.loads(p.stdout)["state"] in ("queued", "running", "done")
        p = daskem("result", job_id, "--wait", "--timeout", 180, DASKEM_HOME=str(home))
        assert p.returncode == 0, (p.stderr, (tmp_path / "out" / "job.log").read_text())
        res = json.loads(p.stdout)
    assert res["state"] == "done" and res["n_components"] == 3
    state = json.loads((tmp_path / "out" / "job.json").read_text())
    assert state["state"] == "done" and state["id"] == job_id
    # ran on the worker, not in the submitting process
    assert "starting on" in (tmp_path / "out" / "job.log").read_text()
    labels = zarr.open_group(str(tmp_path / "out" / "labels.zarr"), mode="r")["labels"][:]
    assert np.bincount(labels, minlength=3).min() > 100


@pytest.mark.cluster
def test_failed_submitted_job_is_reported(tmp_path):
    home = tmp_path / "home"
    bad = tmp_path / "bad.npy"
    x = np.random.default_rng(0).normal(size=(200, 2))
    x[3, 0] = np.nan
    np.save(bad, x)
    with DaskCluster(tmp_path, n_workers=1, nthreads=1, DASKEM_HOME=str(home)) as cluster:
        job = _job(tmp_path, bad, extra=f'[cluster]\nscheduler = "{cluster.address}"\n')
        job_id = daskem("submit", job, DASKEM_HOME=str(home)).stdout.strip()
        p = daskem("result", job_id, "--wait", "--timeout", 120, DASKEM_HOME=str(home))
    assert p.returncode == 1
    assert "failed" in p.stderr and "NaN" in p.stderr
    assert json.loads((tmp_path / "out" / "job.json").read_text())["state"] == "failed"
