"""deploy/: the local-cluster script runs on loopback, with and without TLS; the other recipes are validated.

The cluster tests start real ``dask scheduler``/``dask worker`` processes with
``deploy/local/start-cluster.sh`` and stop them with ``stop-cluster.sh``; every
pid they recorded (and its children) is checked to be gone afterwards, and
killed if it is not, also when the test fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml  # PyYAML: a dependency of dask itself, so always here
from _cli_helpers import ROOT, daskem, env

from daskem.datasets import generate_zarr
from daskem.jobs import load_job, tomllib

# real processes (the CLI, clusters) or long fits: not in the quick subset
pytestmark = pytest.mark.slow

DEPLOY = ROOT / "deploy"
START = DEPLOY / "local" / "start-cluster.sh"
STOP = DEPLOY / "local" / "stop-cluster.sh"
LOOPBACK = {"127.0.0.1", "::1"}


def _script_env(home: Path | str, **extra: str) -> dict:
    """The scripts' environment: this interpreter's dask, DASKEM_HOME in the test's folder."""
    return env(DASK=f"{sys.executable} -m dask", PYTHON=sys.executable, DASKEM_HOME=str(home), **extra)


def _tree_pids(pids: list[int]) -> list[int]:
    """The pids and their children (a nanny's worker process)."""
    out = list(pids)
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            out += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return out


def _listening(pids: list[int]) -> set[tuple[str, int]]:
    """(ip, port) of every listening inet socket of these processes."""
    out = set()
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            for c in psutil.Process(pid).net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.add((c.laddr.ip, c.laddr.port))
    return out


def _recorded_pids(state: Path) -> list[int]:
    pids = []
    for name in ("scheduler.pid", "workers.pid"):
        with contextlib.suppress(FileNotFoundError):
            pids += [int(x) for x in (state / name).read_text().split()]
    return pids


@contextlib.contextmanager
def script_cluster(
    folder: Path, args: list[str], e: dict, cwd: Path | None = None, pass_state: bool = True
) -> Iterator[dict]:
    """Run start-cluster.sh ARGS; yield; stop-cluster.sh and check every process it started is gone.

    ``folder`` is the state folder: passed as ``-d``, or (``pass_state=False``)
    where the script's default is expected.
    """
    d = ["-d", str(folder)] if pass_state else []
    info: dict = {"pids": []}
    try:
        start = subprocess.run(
            ["bash", str(START), *args, *d], env=e, cwd=cwd, capture_output=True, text=True, timeout=150
        )
        info["pids"] = _tree_pids(_recorded_pids(folder))
        assert start.returncode == 0, start.stderr + start.stdout
        info["stdout"] = start.stdout
        yield info
    finally:
        info["pids"] = sorted(set(info["pids"]) | set(_tree_pids(_recorded_pids(folder))))
        stop = subprocess.run(["bash", str(STOP), *d], env=e, cwd=cwd, capture_output=True, text=True, timeout=60)
        survivors = []
        for pid in info["pids"]:
            deadline = time.monotonic() + 30
            while psutil.pid_exists(pid) and time.monotonic() < deadline:
                with contextlib.suppress(psutil.NoSuchProcess):
                    if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                        break
                time.sleep(0.2)
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    survivors.append(pid)
                    os.kill(pid, signal.SIGKILL)
    assert stop.returncode == 0, stop.stderr
    assert not survivors, f"processes {survivors} survived stop-cluster.sh"
    assert not (folder / "scheduler.json").exists() and not (folder / "security.yaml").exists()


# --------------------------------------------------------------------------
# start-cluster.sh: options
# --------------------------------------------------------------------------


def _usage_options(text: str) -> set[str]:
    block = text.split("options:", 1)[1].split("environment:", 1)[0]
    out = set()
    for line in block.splitlines():  # "  -n, --workers N   text", "      --tls   text"
        m = re.match(r"\s+(-\w)?(?:, )?(--[\w-]+)?", line)
        out |= {t for t in m.groups() if t} if m else set()
    return out


def _parsed_options(script: Path) -> set[str]:
    """The options the script's argument loop handles (its ``case`` patterns)."""
    src = script.read_text()
    loop = src[src.index("while [[ $# -gt 0 ]]") :]
    loop = loop[: loop.index("\ndone")]
    out = set()
    for line in loop.splitlines():
        m = re.match(r"\s*(-[^)]*)\)", line)
        if m:
            out |= {t.strip() for t in m.group(1).split("|") if "*" not in t}
    return out


@pytest.mark.parametrize("script", [START, STOP], ids=["start", "stop"])
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_cluster_scripts_help_is_help_and_matches_their_options(tmp_path, script, flag):
    e = _script_env(tmp_path / "home")
    p = subprocess.run(["bash", str(script), flag], env=e, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: ") and p.stderr == ""
    assert _usage_options(p.stdout) == _parsed_options(script)
    assert not (tmp_path / "home").exists()  # help starts nothing and writes nothing
    bad = subprocess.run(["bash", str(script), "--no-such-option"], env=e, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--help" in bad.stderr and not (tmp_path / "home").exists()


def test_start_cluster_refuses_workers_on_other_hosts_behind_loopback(tmp_path):
    e = _script_env(tmp_path / "home")
    p = subprocess.run(["bash", str(START), "-H", "node1 node2"], env=e, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "--listen" in p.stderr
    assert not (tmp_path / "home").exists()


# --------------------------------------------------------------------------
# the local recipe, as its README says, on loopback
# --------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.mark.slow
@pytest.mark.cluster
def test_local_recipe_listens_on_loopback_and_leaves_the_repository_clean(tmp_path):
    """The README's commands, from a copy of the repository's recipe and .gitignore, with HOME in tmp_path."""
    repo = tmp_path / "repo"
    (repo / "deploy").mkdir(parents=True)
    shutil.copytree(DEPLOY / "local", repo / "deploy" / "local")
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "recipe")
    before = _git(repo, "status", "--porcelain", "--untracked-files=all")
    home = tmp_path / "home"
    home.mkdir()
    e = _script_env("", HOME=str(home))  # DASKEM_HOME empty: the default, ~/.daskem
    state = home / ".daskem" / "cluster"
    with script_cluster(state, ["-n", "1", "-t", "1", "-m", "1GiB"], e, cwd=repo, pass_state=False):
        assert (state / "scheduler.json").is_file()
        assert not (state / "security.yaml").exists()  # one host: no TLS
        address = json.loads((state / "scheduler.json").read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        assert len(_recorded_pids(state)) == 2
        sockets = _listening(_tree_pids(_recorded_pids(state)))
        assert int(address.rsplit(":", 1)[1]) in {port for _, port in sockets}
        assert {ip for ip, _ in sockets} <= LOOPBACK, sockets
        gen = daskem(
            "generate", "deploy/local/data.zarr", "--n-samples", "4000", "--n-features", "2", "--n-components", "3",
            "--chunk-rows", "1000", cwd=repo, HOME=str(home), DASKEM_HOME="",
        )  # fmt: skip
        assert gen.returncode == 0, gen.stderr
        run = daskem("run", "deploy/local/job.toml", cwd=repo, HOME=str(home), DASKEM_HOME="")  # as the README
        assert run.returncode == 0, run.stderr
        assert "cluster at tcp://127.0.0.1" in run.stderr and "1 worker(s)" in run.stderr
        assert json.loads((repo / "deploy" / "local" / "results" / "summary.json").read_text())["best_k"] == 3
        assert list((home / ".daskem" / "jobs").iterdir())  # the job id went to ~/.daskem/jobs
    assert _git(repo, "status", "--porcelain", "--untracked-files=all") == before


# --------------------------------------------------------------------------
# several hosts: TLS, tried on loopback
# --------------------------------------------------------------------------


def _stranger_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key of someone else's CA."""
    folder.mkdir()
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=stranger", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


_TRY_CLIENTS = """
import json, sys, time
from distributed import Client, Security

address, ca, cert, key = sys.argv[1:]
out = {}
for name, security in [
    ("plain", None),
    # it trusts the scheduler's CA; the scheduler does not trust the stranger's certificate
    ("stranger", Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True)),
]:
    t0 = time.monotonic()
    try:
        with Client(address, security=security, timeout="10s") as c:
            c.submit(sum, [1, 2]).result()
        out[name] = {"connected": True}
    except Exception as exc:
        out[name] = {"connected": False, "error": type(exc).__name__, "seconds": time.monotonic() - t0}
print(json.dumps(out))
"""


def _try_clients(address: str, ca: str, cert: Path, key: Path) -> dict:
    """Connect without a certificate, and with a stranger's, in a separate process."""
    p = subprocess.run(
        [sys.executable, "-c", _TRY_CLIENTS, address, ca, str(cert), str(key)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.cluster
def test_tls_cluster_refuses_a_client_without_its_certificate_and_daskem_uses_it(tmp_path, monkeypatch):
    from distributed import Client

    from daskem.errors import InputError
    from daskem.jobs import job_status
    from daskem.security import find_security, load_security

    state, home = tmp_path / "cluster state", tmp_path / "home"  # a space: paths are quoted
    e = _script_env(home)
    generate_zarr(tmp_path / "data.zarr", 3000, 2, 2, seed=3, chunk_rows=1000)
    stranger_cert, stranger_key = _stranger_certificate(tmp_path / "stranger")
    with script_cluster(state, ["--tls", "-n", "1", "-t", "1", "-m", "1GiB"], e) as c:
        sched_file, sec_file = state / "scheduler.json", state / "security.yaml"
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tls://127.0.0.1:")
        assert str(sec_file) in c["stdout"]
        sockets = _listening(_tree_pids(_recorded_pids(state)))
        assert sockets and {ip for ip, _ in sockets} <= LOOPBACK, sockets
        # the config: a Dask config file, private, naming files that exist; the CA's key is gone
        cfg = yaml.safe_load(sec_file.read_text())["distributed"]["comm"]
        assert cfg["require-encryption"] is True
        assert {cfg["tls"]["ca-file"], cfg["tls"]["client"]["cert"], cfg["tls"]["client"]["key"]} <= {
            str(p) for p in (state / "tls").iterdir()
        }
        assert stat.S_IMODE(sec_file.stat().st_mode) & 0o077 == 0
        assert stat.S_IMODE((state / "tls").stat().st_mode) == 0o700
        assert not (state / "tls" / "ca-key.pem").exists()

        # the daskem CLI finds security.yaml beside the scheduler file (started now, checked below)
        out = tmp_path / "fit"
        fit = subprocess.Popen(
            [sys.executable, "-m", "daskem", "fit", str(tmp_path / "data.zarr"), "--k", "2", "--out", str(out),
             "--scheduler-file", str(sched_file)],
            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        # and `daskem submit` too: the job then runs on the worker, which has the cluster's certificate
        job = tmp_path / "job.toml"
        job.write_text(
            f'[input]\npath = "data.zarr"\n[model]\nn_components = 2\nrandom_state = 0\n'
            f'[output]\npath = "submitted"\n[cluster]\nscheduler_file = "{sched_file}"\n'
        )
        submit = subprocess.Popen(
            [sys.executable, "-m", "daskem", "submit", str(job)],
            env=env(DASKEM_HOME=str(home)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            # a plain client, and one with a certificate of another CA, are refused (in a process of
            # their own: a Client that failed to start can hang the next one in the same process)
            refused = _try_clients(address, cfg["tls"]["ca-file"], stranger_cert, stranger_key)
            assert refused["plain"]["connected"] is False and refused["stranger"]["connected"] is False, refused
            assert refused["stranger"]["error"] in ("FatalCommClosedError", "CommClosedError", "SSLError"), refused
            assert refused["plain"]["seconds"] < 30 and refused["stranger"]["seconds"] < 30, refused  # not hanging

            # the written config lets a client in
            with Client(scheduler_file=str(sched_file), security=load_security(sec_file), timeout="30s") as client:
                assert client.submit(sum, [1, 2]).result(timeout=30) == 3

            _, err = fit.communicate(timeout=240)
            job_id, submit_err = submit.communicate(timeout=240)
        finally:
            for p in (fit, submit):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert fit.returncode == 0, err
        assert f"cluster at {address}" in err
        assert (out / "summary.json").is_file() or (out / "model").is_dir()
        assert submit.returncode == 0, submit_err
        monkeypatch.setenv("DASKEM_HOME", str(home))
        deadline = time.monotonic() + 180
        while (status := job_status(job_id.strip()))["state"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert status["state"] == "done", status

        # the address alone: daskem says what to pass, before any work
        with pytest.raises(InputError, match="--security"):
            find_security(address)
    # the certificates stay for the next start; the config goes with the cluster
    assert (state / "tls" / "client.pem").is_file()


# --------------------------------------------------------------------------
# the local cluster the CLI starts
# --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.cluster
def test_cli_local_cluster_listens_on_loopback_only():
    from daskem.cli import cluster_client

    me = psutil.Process()
    children_before = {p.pid for p in me.children(recursive=True)}
    args = argparse.Namespace(
        quiet=True, scheduler=None, scheduler_file=None, n_workers=1, threads_per_worker=1, memory_limit="1GiB"
    )
    with cluster_client(args) as client:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        sched_port = int(client.scheduler.address.rsplit(":", 1)[1])
        dash_port = client.scheduler_info()["services"]["dashboard"]
        workers = [p.pid for p in me.children(recursive=True) if p.pid not in children_before]
        assert workers
        mine = _listening([me.pid])
        bound = {ip for ip, port in mine if port in (sched_port, dash_port)}
        assert {port for _, port in mine} >= {sched_port, dash_port}
        assert bound <= LOOPBACK, mine
        theirs = _listening(workers)
        assert theirs and {ip for ip, _ in theirs} <= LOOPBACK, theirs


# --------------------------------------------------------------------------
# docker, kubernetes, hpc: parsed and checked
# --------------------------------------------------------------------------


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


def _published_on(port: object) -> str:
    """The host address a compose port mapping publishes on ('' = every interface)."""
    if isinstance(port, dict):  # long syntax
        return str(port.get("host_ip", "")) if port.get("published") else "none"
    text = str(port).split("/")[0]
    if text.startswith("["):  # [::1]:8786:8786
        return text[1 : text.index("]")]
    parts = text.split(":")
    return parts[0] if len(parts) == 3 else ("none" if len(parts) == 1 else "")


def test_docker_compose_publishes_nothing_beyond_this_host():
    doc = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    published = {}
    for name, svc in doc["services"].items():
        assert svc.get("network_mode") != "host", name
        for port in svc.get("ports", []):
            published[(name, str(port))] = _published_on(port)
    assert ("scheduler", "127.0.0.1:8786:8786") in published  # the host's daskem can submit
    assert all(host in LOOPBACK | {"none"} for host in published.values()), published
    assert _published_on("8786:8786") == "" and _published_on("8786") == "none"  # the checker itself
    assert "127.0.0.1" in (DEPLOY / "docker" / "README.md").read_text()


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


def _walk(node: object) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_kubernetes_exposes_nothing_outside_the_cluster():
    docs = [
        (path.name, doc)
        for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    assert len(docs) >= 3
    for name, doc in docs:
        assert doc.get("kind") not in ("Ingress", "Route"), name
        for node in _walk(doc):
            assert node.get("type") not in ("LoadBalancer", "NodePort"), (name, node)
            assert "hostPort" not in node and not node.get("hostNetwork"), (name, node)
            assert "externalIPs" not in node, (name, node)
    cluster = yaml.safe_load((DEPLOY / "kubernetes" / "daskcluster.yaml").read_text())
    assert cluster["spec"]["scheduler"]["service"]["type"] == "ClusterIP"
    # the NetworkPolicy lets in the cluster's pods and the Job of job.yaml
    policy = yaml.safe_load((DEPLOY / "kubernetes" / "networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy"
    name = cluster["metadata"]["name"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"dask.org/cluster-name": name}
    allowed = [peer.get("podSelector", {}).get("matchLabels") for peer in policy["spec"]["ingress"][0]["from"]]
    job = yaml.safe_load((DEPLOY / "kubernetes" / "job.yaml").read_text())
    assert job["spec"]["template"]["metadata"]["labels"] in allowed
    assert {"dask.org/cluster-name": name} in allowed
    assert "ClusterIP" in (DEPLOY / "kubernetes" / "README.md").read_text()


def test_hpc_script_parses_its_arguments():
    p = subprocess.run(
        [sys.executable, str(DEPLOY / "hpc" / "jobqueue_cluster.py"), "--help"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    for flag in ["--system", "--jobs", "--cores", "--memory", "--walltime", "--queue", "--tls"]:
        assert flag in p.stdout
    doc = tomllib.loads((DEPLOY / "hpc" / "job.toml").read_text())
    assert {"input", "model", "select", "output"} <= set(doc)
    assert "protocol" in (DEPLOY / "hpc" / "README.md").read_text()


def test_every_recipe_has_a_readme():
    for d in ["local", "docker", "kubernetes", "hpc"]:
        assert len((DEPLOY / d / "README.md").read_text()) > 200
