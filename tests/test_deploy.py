"""deploy/: the local-cluster script runs on loopback with a job; the other recipes are validated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml  # PyYAML: a dependency of dask itself, so always here
from _cli_helpers import ROOT, daskem, env

from daskem.datasets import generate_zarr
from daskem.jobs import load_job, tomllib

DEPLOY = ROOT / "deploy"


@pytest.mark.cluster
def test_local_cluster_script_runs_a_job_on_loopback(tmp_path):
    state = tmp_path / "cluster"
    e = env(DASK=f"{sys.executable} -m dask", PYTHON=sys.executable, DASKEM_HOME=str(tmp_path / "home"))
    start = subprocess.run(
        [
            "bash",
            str(DEPLOY / "local" / "start-cluster.sh"),
            "-n",
            "2",
            "-t",
            "1",
            "-m",
            "1GiB",
            "-d",
            str(state),
            "-h",
            "127.0.0.1",
        ],
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
    )
    pids = []
    try:
        assert start.returncode == 0, start.stderr + start.stdout
        pids = [int(state.joinpath("scheduler.pid").read_text())] + [
            int(x) for x in state.joinpath("workers.pid").read_text().split()
        ]
        assert len(pids) == 3
        address = json.loads((state / "scheduler.json").read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        generate_zarr(tmp_path / "data.zarr", 4000, 2, 3, seed=7, chunk_rows=500)
        job = tmp_path / "job.toml"
        job.write_text(
            f'[input]\npath = "data.zarr"\n[model]\nrandom_state = 0\n[select]\nk = "2:4"\ncriterion = "bic"\n'
            f'[output]\npath = "results"\npredict = true\n[cluster]\nscheduler_file = "{state}/scheduler.json"\n'
        )
        p = daskem("run", job, DASKEM_HOME=str(tmp_path / "home"))
        assert p.returncode == 0, p.stderr
        assert "cluster at tcp://127.0.0.1" in p.stderr and "2 worker(s)" in p.stderr
        summary = json.loads((tmp_path / "results" / "summary.json").read_text())
        assert summary["best_k"] == 3
    finally:
        stop = subprocess.run(
            ["bash", str(DEPLOY / "local" / "stop-cluster.sh"), "-d", str(state)],
            env=e,
            capture_output=True,
            text=True,
            timeout=60,
        )
        for pid in pids:  # the recorded processes are gone (or going)
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                os.kill(pid, 9)
                pytest.fail(f"process {pid} survived stop-cluster.sh")
    assert stop.returncode == 0, stop.stderr


def _require_keys(path, keys):
    text = path.read_text()
    for k in keys:
        assert f"{k}:" in text, (path, k)


def test_docker_compose_is_valid():
    _require_keys(DEPLOY / "docker" / "compose.yaml", ["services", "scheduler", "worker", "job", "command"])
    doc = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    services = doc["services"]
    assert {"scheduler", "worker", "job"} <= set(services)
    assert services["scheduler"]["command"][:2] == ["dask", "scheduler"]
    assert services["worker"]["command"][:3] == ["dask", "worker", "tcp://scheduler:8786"]
    assert "daskem run" in " ".join(services["job"]["command"])
    assert (DEPLOY / "docker" / "Dockerfile").read_text().count("pip install") == 1
    assert load_job(DEPLOY / "docker" / "job.toml")["cluster"]["scheduler"] == "tcp://scheduler:8786"


def test_kubernetes_manifests_are_valid():
    _require_keys(
        DEPLOY / "kubernetes" / "daskcluster.yaml",
        ["apiVersion", "kind", "metadata", "spec", "worker", "scheduler", "replicas", "service"],
    )
    _require_keys(DEPLOY / "kubernetes" / "job.yaml", ["apiVersion", "kind", "template", "containers", "command"])
    toml = tomllib.loads((DEPLOY / "kubernetes" / "job.toml").read_text())
    assert toml["cluster"]["scheduler"] == "tcp://daskem-scheduler:8786"
    cluster = yaml.safe_load((DEPLOY / "kubernetes" / "daskcluster.yaml").read_text())
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1" and cluster["kind"] == "DaskCluster"
    name = cluster["metadata"]["name"]
    spec = cluster["spec"]
    assert spec["worker"]["replicas"] >= 1
    assert spec["worker"]["spec"]["containers"][0]["args"][:2] == ["dask", "worker"]
    assert spec["scheduler"]["spec"]["containers"][0]["args"][:2] == ["dask", "scheduler"]
    assert spec["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == name
    job = yaml.safe_load((DEPLOY / "kubernetes" / "job.yaml").read_text())
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:2] == ["daskem", "run"] and f"tcp://{name}-scheduler:8786" in cmd


def test_hpc_script_parses_its_arguments():
    p = subprocess.run(
        [sys.executable, str(DEPLOY / "hpc" / "jobqueue_cluster.py"), "--help"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    for flag in ["--system", "--jobs", "--cores", "--memory", "--walltime", "--queue"]:
        assert flag in p.stdout
    doc = tomllib.loads((DEPLOY / "hpc" / "job.toml").read_text())
    assert {"input", "model", "select", "output"} <= set(doc)


def test_every_recipe_has_a_readme():
    for d in ["local", "docker", "kubernetes", "hpc"]:
        assert len((DEPLOY / d / "README.md").read_text()) > 200
