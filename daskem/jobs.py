"""Batch jobs: a TOML job file, run in the foreground or submitted to a cluster.

A job file names the input, the model options (or a K range), the output
folder and, optionally, the cluster::

    [input]
    path = "data.zarr"          # a Zarr store (path or URL) or a .npy file
    array = "X"                 # optional: an array inside a Zarr group

    [model]                     # GaussianMixture keyword arguments
    n_components = 5            # not needed with [select]
    covariance_type = "full"
    n_init = 4
    random_state = 0

    [select]                    # optional: choose K
    k = [2, 4, 6, 8]            # or "2:8"
    criterion = "validation"    # or "bic", "aic"
    validation_fraction = 0.1

    [output]
    path = "results/run1"
    predict = true              # also write labels.zarr
    anomaly_quantile = 0.01     # optional, with predict: anomaly flags

    [cluster]                   # optional; default: a local cluster
    scheduler = "tcp://scheduler:8786"     # or scheduler_file = "..."

Relative paths are taken relative to the job file's folder.

The output folder holds the report (``model/``, ``summary.json``, plots,
``labels.zarr``), the EM checkpoint (``checkpoint/``, written after every
iteration; a job run again resumes from it) and the job state ``job.json``
(``queued``, ``running``, ``done`` or ``failed``). A registry of job ids,
``$DASKEM_HOME/jobs/<id>.json`` (default ``~/.daskem``), points at the output
folder, so ``daskem status``/``result`` find a job from any shell; the state
itself lives with the output, so it survives a scheduler restart.

``submit`` hands the job to a running scheduler as one long-running task
(``fire_and_forget``): the task secedes from its worker's thread pool and
drives the EM loop from the worker through ``worker_client``, so the job goes
on after the submitting process has exited.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import socket
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from .io import InputError, atomic_write_text

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

JOB_STATES = ("queued", "running", "done", "failed")

_SECTIONS = {
    "input": {"path", "array"},
    "model": None,  # checked against GaussianMixture's parameters
    "select": {"k", "criterion", "validation_fraction"},
    "output": {"path", "predict", "proba", "anomaly_quantile"},
    "cluster": {"scheduler", "scheduler_file", "n_workers", "threads_per_worker", "memory_limit"},
}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def daskem_home() -> Path:
    """``$DASKEM_HOME`` or ``~/.daskem``."""
    return Path(os.environ.get("DASKEM_HOME") or Path.home() / ".daskem")


def registry_dir() -> Path:
    """Where job ids are recorded."""
    return daskem_home() / "jobs"


def new_job_id() -> str:
    """A readable, unique job id: ``YYYYmmdd-HHMMSS-xxxxxx``."""
    return f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------
# job files
# --------------------------------------------------------------------------


def _resolve(base: Path, p: str) -> str:
    if "://" in p:
        return p
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q).resolve())


def load_job(path: str | Path) -> dict:
    """Read and check a TOML job file; paths come back absolute.

    Raises
    ------
    InputError
        For a missing or malformed file, unknown sections or keys, or
        missing required keys.
    """
    from .cli import parse_k_values
    from .mixture import GaussianMixture

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such job file: {path}")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid TOML: {exc}") from exc
    unknown = set(doc) - set(_SECTIONS)
    if unknown:
        raise InputError(f"{path}: unknown section(s) {sorted(unknown)}; known: {sorted(_SECTIONS)}")
    for name, keys in _SECTIONS.items():
        sec = doc.get(name, {})
        if not isinstance(sec, dict):
            raise InputError(f"{path}: [{name}] must be a table")
        if keys is not None and set(sec) - keys:
            raise InputError(f"{path}: unknown key(s) {sorted(set(sec) - keys)} in [{name}]; known: {sorted(keys)}")
    base = path.resolve().parent
    inp, out = doc.get("input", {}), doc.get("output", {})
    if "path" not in inp:
        raise InputError(f"{path}: [input] needs a path")
    if "path" not in out:
        raise InputError(f"{path}: [output] needs a path")
    model = dict(doc.get("model", {}))
    valid = set(GaussianMixture._param_names()) - {"weights_init", "means_init", "precisions_init", "verbose"}
    bad = set(model) - valid
    if bad:
        raise InputError(f"{path}: unknown model option(s) {sorted(bad)}; known: {sorted(valid)}")
    select = doc.get("select")
    if select is not None:
        if "k" not in select:
            raise InputError(f'{path}: [select] needs k (a list [2, 4, 8] or a range "2:12")')
        k = select["k"]
        ks = parse_k_values(k) if isinstance(k, str) else parse_k_values(",".join(str(int(v)) for v in k))
        select = {
            "k": ks,
            "criterion": select.get("criterion", "validation"),
            "validation_fraction": float(select.get("validation_fraction", 0.1)),
        }
        if select["criterion"] not in ("validation", "bic", "aic"):
            raise InputError(f"{path}: [select] criterion must be 'validation', 'bic' or 'aic'")
        model.pop("n_components", None)
    elif "n_components" not in model:
        raise InputError(f"{path}: give [model] n_components, or a [select] table with k")
    if model.get("checkpoint"):
        model["checkpoint"] = _resolve(base, model["checkpoint"])
    GaussianMixture(**{"n_components": 1, **model})._validate_params()
    cluster = dict(doc.get("cluster", {}))
    if cluster.get("scheduler_file"):
        cluster["scheduler_file"] = _resolve(base, cluster["scheduler_file"])
    q = out.get("anomaly_quantile")
    if q is not None and not 0 < float(q) < 1:
        raise InputError(f"{path}: [output] anomaly_quantile must be between 0 and 1")
    return {
        "job_file": str(path.resolve()),
        "input": {"path": _resolve(base, inp["path"]), "array": inp.get("array")},
        "model": model,
        "select": select,
        "output": {
            "path": _resolve(base, out["path"]),
            "predict": bool(out.get("predict", False)),
            "proba": bool(out.get("proba", False)),
            "anomaly_quantile": None if q is None else float(q),
        },
        "cluster": cluster,
    }


# --------------------------------------------------------------------------
# state: in the output folder, and a registry of ids
# --------------------------------------------------------------------------


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_state(job: dict, job_id: str, state: str, **fields: Any) -> dict:
    """Record the job's state in ``<output>/job.json`` (atomically)."""
    out = Path(job["output"]["path"])
    old = _read_json(out / "job.json") or {}
    if old.get("id") != job_id:
        old = {}
    doc = {
        **old,
        "id": job_id,
        "state": state,
        "output": str(out),
        "job_file": job.get("job_file"),
        "updated": _now(),
        **fields,
    }
    atomic_write_text(out / "job.json", json.dumps(doc, indent=2, default=str) + "\n")
    return doc


def register(job_id: str, job: dict, mode: str, **fields: Any) -> None:
    """Record ``job_id`` → output folder in the registry (``$DASKEM_HOME/jobs``)."""
    doc = {
        "id": job_id,
        "mode": mode,
        "output": job["output"]["path"],
        "job_file": job.get("job_file"),
        "submitted": _now(),
        "host": socket.gethostname(),
        **fields,
    }
    atomic_write_text(registry_dir() / f"{job_id}.json", json.dumps(doc, indent=2, default=str) + "\n")


def job_status(job_id: str) -> dict:
    """The registry entry merged with the state recorded in the output folder."""
    reg = _read_json(registry_dir() / f"{job_id}.json")
    if reg is None:
        raise InputError(
            f"no job {job_id!r} in {registry_dir()} (set DASKEM_HOME to the registry the job was submitted to)"
        )
    state = _read_json(Path(reg["output"]) / "job.json")
    if state is None or state.get("id") != job_id:
        if state is not None and state.get("id") != job_id:
            return {**reg, "state": "superseded", "note": f"output folder now holds job {state.get('id')}"}
        return {**reg, "state": "queued"}
    return {**reg, **state}


def list_jobs() -> list[dict]:
    """Every recorded job, oldest first."""
    d = registry_dir()
    if not d.is_dir():
        return []
    out = []
    for f in sorted(d.glob("*.json")):
        try:
            out.append(job_status(f.stem))
        except InputError:
            continue
    return out


def job_result(job_id: str) -> dict:
    """The result of a finished job: its output folder and its summary."""
    s = job_status(job_id)
    if s["state"] != "done":
        raise InputError(f"job {job_id} is {s['state']}, not done")
    out = Path(s["output"])
    summary = _read_json(out / "summary.json") or {}
    model = summary.get("model", {})
    return {
        "id": job_id,
        "state": "done",
        "output": str(out),
        "summary": str(out / "summary.json"),
        "model_dir": str(out / "model"),
        "n_components": model.get("n_components"),
        "best_k": summary.get("best_k"),
        "lower_bound": model.get("lower_bound"),
        "converged": model.get("converged"),
        "labels": str(out / "labels.zarr") if (out / "labels.zarr").exists() else None,
    }


# --------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------


def _move_into(src: Path, dest: Path) -> None:
    """Move every entry of ``src`` into ``dest``, replacing each with a rename."""
    for item in sorted(src.iterdir()):
        target = dest / item.name
        old = None
        if target.exists():
            old = dest / f".{item.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(item, target)
        if old is not None:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


def run_job(job: dict, job_id: str, *, verbose: int = 0) -> dict:
    """Run a loaded job with the active Dask client; returns :func:`job_result`'s fields.

    The EM state is checkpointed to ``<output>/checkpoint`` after every
    iteration (unless ``[model] checkpoint`` names another folder); the report
    is built in a temporary folder and its entries renamed into the output
    folder, so a failed job leaves the previous good result in place.
    """
    from .cli import anomaly_threshold, fit_and_report, load_model_dir, open_data, store_chunk_rows, write_predictions

    out = Path(job["output"]["path"])
    if out.exists() and not out.is_dir():
        raise InputError(f"the output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    write_state(job, job_id, "running", started=_now(), host=socket.gethostname(), pid=os.getpid(), error=None)
    t0 = time.perf_counter()
    try:
        options = dict(job["model"])
        options.setdefault("checkpoint", str(out / "checkpoint"))
        X = open_data(job["input"]["path"], job["input"]["array"], options.get("chunk_bytes"))
        work = out / f".work-{job_id}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            extra = {"command": "job", "job_id": job_id, "job": job}
            sel = job["select"]
            if sel is not None:
                fit_and_report(
                    X,
                    work / "report",
                    k_values=sel["k"],
                    criterion=sel["criterion"],
                    validation_fraction=sel["validation_fraction"],
                    options=options,
                    verbose=verbose,
                    extra=extra,
                )
            else:
                opts = {k: v for k, v in options.items() if k != "n_components"}
                fit_and_report(
                    X, work / "report", k=int(options["n_components"]), options=opts, verbose=verbose, extra=extra
                )
            if job["output"]["predict"]:
                gm, summary = load_model_dir(work / "report")
                q = job["output"]["anomaly_quantile"]
                write_predictions(
                    gm,
                    X,
                    work / "report" / "labels.zarr",
                    proba=job["output"]["proba"],
                    anomaly_threshold=None if q is None else anomaly_threshold(summary, q),
                    store_rows=store_chunk_rows(job["input"]["path"], job["input"]["array"]),
                    attrs={"job_id": job_id, "anomaly_quantile": q},
                )
            _move_into(work / "report", out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except BaseException as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        write_state(
            job,
            job_id,
            "failed",
            finished=_now(),
            error=f"{type(exc).__name__}: {msg}",
            seconds=time.perf_counter() - t0,
        )
        raise
    write_state(job, job_id, "done", finished=_now(), seconds=time.perf_counter() - t0, result=str(out))
    return job_result_from_folder(job_id, out)


def job_result_from_folder(job_id: str, out: Path) -> dict:
    summary = _read_json(out / "summary.json") or {}
    model = summary.get("model", {})
    return {
        "output": str(out),
        "summary": str(out / "summary.json"),
        "n_components": model.get("n_components"),
        "best_k": summary.get("best_k"),
        "lower_bound": model.get("lower_bound"),
        "converged": model.get("converged"),
    }


def _job_task(job: dict, job_id: str, home: str | None) -> str:
    """The long-running task of a submitted job (runs on a worker)."""
    from distributed import worker_client

    if home:
        os.environ.setdefault("DASKEM_HOME", home)
    out = Path(job["output"]["path"])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "job.log", "a") as log, contextlib.redirect_stderr(log):
        print(f"{_now()} job {job_id} starting on {socket.gethostname()}", file=log, flush=True)
        try:
            with worker_client() as client, client.as_current():
                run_job(job, job_id, verbose=1)
        except BaseException:
            traceback.print_exc(file=log)
            raise
        print(f"{_now()} job {job_id} done", file=log, flush=True)
    return str(out)


def submit(job: dict, *, connect_timeout: str = "20s") -> str:
    """Hand a loaded job to the running cluster named in ``job['cluster']``; return its id.

    Raises
    ------
    InputError
        Without a scheduler address or file (a local cluster would die with
        the submitting process), or when the scheduler cannot be reached.
    """
    from distributed import Client, fire_and_forget

    from .security import find_security

    c = job["cluster"]
    if not (c.get("scheduler") or c.get("scheduler_file")):
        raise InputError(
            "submit needs a running cluster: pass --scheduler ADDRESS or --scheduler-file FILE, or set "
            "[cluster] scheduler in the job file (use `daskem run` to run on a local cluster)"
        )
    if c.get("scheduler_file") and not Path(c["scheduler_file"]).exists():
        raise InputError(f"no such scheduler file: {c['scheduler_file']}")
    try:
        client = Client(
            c.get("scheduler"),
            scheduler_file=c.get("scheduler_file"),
            # TLS: the security.yaml beside the scheduler file (deploy/local/start-cluster.sh)
            security=find_security(c.get("scheduler"), c.get("scheduler_file")),
            timeout=connect_timeout,
        )
    except (OSError, TimeoutError) as exc:
        raise InputError(f"cannot connect to the Dask scheduler: {exc}") from exc
    try:
        job_id = new_job_id()
        register(job_id, job, mode="submit", scheduler=client.scheduler.address)
        write_state(job, job_id, "queued", submitted=_now())
        key = f"daskem-job-{job_id}"
        fut = client.submit(_job_task, job, job_id, os.environ.get("DASKEM_HOME"), key=key, pure=False)
        fire_and_forget(fut)
        # make sure the scheduler holds the task before this process goes away
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if client.run_on_scheduler(_scheduler_has, key):
                break
            time.sleep(0.1)
        else:  # pragma: no cover - defensive
            raise RuntimeError(f"the scheduler did not receive job {job_id}")
    finally:
        client.close()
    return job_id


def _scheduler_has(key: str, dask_scheduler: Any = None) -> bool:
    return key in dask_scheduler.tasks
