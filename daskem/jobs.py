"""Batch jobs: a TOML job file, run in the foreground or submitted to a cluster.

A job file names the input, the model options (or a K range), the output
folder and, optionally, the cluster::

    [input]
    path = "data.zarr"          # a Zarr store (path or URL) or a .npy file
    array = "X"                 # optional: an array inside a Zarr group

    [model]                     # GaussianMixture keyword arguments
    n_components = 5            # not needed with [select]
    covariance_type = "full"    # with [select] also "all" (mclust's fourteen) or a list
    n_init = 4                  # ["VVV", "EEE", "VII"]: the model and K chosen together
    random_state = 0

    [select]                    # optional: choose K
    k = [2, 4, 6, 8]            # or "2:8"
    criterion = "validation"    # or "bic", "icl", "aic"
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
iteration; a job run again resumes from it), the job state ``job.json``
(``queued``, ``running``, ``done`` or ``failed``) and its progress
``progress.json`` (after every pass: the iteration out of ``max_iter``, the
log-likelihood of the run the progress lines follow, the time per pass and
the ETA, the update time; what ``daskem status`` shows). It is a daskem output of
kind ``job`` (:mod:`daskem._outputs`): a job is run into a new path, an
empty folder or its own previous output folder, never into a folder daskem
did not write. While a job runs, ``.daskem-lock`` in the output folder names
its process (pid and host): a second ``run`` (or a ``submit``) of the same
job is refused until it ends, or until that process is gone. A job file
edited since the checkpoint was written starts afresh, the old checkpoint
moved aside to ``checkpoint.old-<time>``. A registry of job ids,
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
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from . import _outputs
from ._outputs import atomic_write_text
from .errors import InputError, InputNotFoundError

# scikit-learn, Dask's client and the fit loop are imported where a job is
# checked, run or submitted: ``daskem status`` and ``daskem result`` only read
# JSON files and start in a fraction of the time.

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

JOB_STATES = ("queued", "running", "done", "failed")

#: the job's progress in its output folder: the fit loop's last snapshot (iteration, log-likelihood, ...)
PROGRESS_FILE = "progress.json"

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


def _read_job(path: str | Path) -> tuple[Path, dict]:
    """The job file's TOML, checked for its sections, keys and the two paths it must give."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"no such job file: {path}")
    if not path.is_file():
        raise InputError(f"not a job file: {path} (a folder)")
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
    if "path" not in doc.get("input", {}):
        raise InputError(f"{path}: [input] needs a path")
    if "path" not in doc.get("output", {}):
        raise InputError(f"{path}: [output] needs a path")
    return path, doc


def _paths(path: Path, doc: dict) -> dict:
    base = path.resolve().parent
    return {
        "job_file": str(path.resolve()),
        "input": {"path": _resolve(base, doc["input"]["path"])},
        "output": {"path": _resolve(base, doc["output"]["path"])},
    }


def job_paths(path: str | Path) -> dict:
    """What :func:`check_job_output` reads of a job file (its input and output paths, absolute),
    without the checks of its model options (and their slow imports): a command can refuse the
    output first. Raises what :func:`load_job` raises for the file itself."""
    return _paths(*_read_job(path))


def load_job(path: str | Path) -> dict:
    """Read and check a TOML job file; paths come back absolute.

    Raises
    ------
    InputError
        For a missing or malformed file, unknown sections or keys, or
        missing required keys.
    """
    path, doc = _read_job(path)
    from .mixture import GaussianMixture  # lazy: see the top
    from .workflows import parse_covariance_types, parse_k_values  # lazy: see the top

    base = path.resolve().parent
    inp, out = doc.get("input", {}), doc.get("output", {})
    model = dict(doc.get("model", {}))
    valid = set(GaussianMixture().get_params()) - {"weights_init", "means_init", "precisions_init", "verbose"}
    bad = set(model) - valid
    if bad:
        raise InputError(f"{path}: unknown model option(s) {sorted(bad)}; known: {sorted(valid)}")
    select = doc.get("select")
    types = model.get("covariance_type")
    if types is not None:
        types = parse_covariance_types(types, option=f"{path}: [model] covariance_type")
        if len(types) > 1 and select is None:
            raise InputError(
                f"{path}: [model] covariance_type with several models needs a [select] table with k "
                "(the model and K are chosen together)"
            )
        model["covariance_type"] = types[0]
    if select is not None:
        if "k" not in select:
            raise InputError(f'{path}: [select] needs k (a list [2, 4, 8] or a range "2:12")')
        k = select["k"]
        ks = parse_k_values(k) if isinstance(k, str) else parse_k_values(",".join(str(int(v)) for v in k))
        select = {
            "k": ks,
            "criterion": select.get("criterion", "validation"),
            # None: 0.1 held out for criterion 'validation', nothing for 'bic', 'icl' and 'aic'
            "validation_fraction": (
                None if select.get("validation_fraction") is None else float(select["validation_fraction"])
            ),
        }
        if select["criterion"] not in ("validation", "bic", "icl", "aic"):
            raise InputError(f"{path}: [select] criterion must be 'validation', 'bic', 'icl' or 'aic'")
        model.pop("n_components", None)
        if types is not None and len(types) > 1:
            select["covariance_types"] = types
            model.pop("covariance_type")
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
    paths = _paths(path, doc)
    return {
        "job_file": paths["job_file"],
        "input": {**paths["input"], "array": inp.get("array")},
        "model": model,
        "select": select,
        "output": {
            **paths["output"],
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
    out = {**reg, **state}
    if out.get("state") == "running" and not _lock_holder_alive(state):
        # killed (SIGKILL, out of memory, the machine restarted): it could not record its end
        out["state"] = "failed"
        out["error"] = (
            f"its process (pid {state.get('pid')} on {state.get('host')}) ended without recording a result "
            "(killed?); run the job again to resume from its checkpoint"
        )
    progress = _read_json(Path(reg["output"]) / PROGRESS_FILE)
    if progress is not None and progress.get("id") == job_id:
        out["progress"] = {k: v for k, v in progress.items() if k != "id"}
    return out


def _progress_writer(out: Path, job_id: str) -> Callable[[dict], None]:
    """An observer of the fit loop (:func:`daskem._fitloop.observe_progress`): ``<output>/progress.json``."""

    def write(snapshot: dict) -> None:
        doc = {"id": job_id, "updated": _now(), **snapshot}
        atomic_write_text(out / PROGRESS_FILE, json.dumps(doc, default=str) + "\n")

    return write


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
        "best_covariance_type": summary.get("best_covariance_type"),
        "lower_bound": model.get("lower_bound"),
        "converged": model.get("converged"),
        "labels": str(out / "labels.zarr") if (out / "labels.zarr").exists() else None,
    }


# --------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------

#: the lock file in a job's output folder while the job runs
LOCK_FILE = ".daskem-lock"

#: the words of the error that ``Checkpoint.load`` raises for a checkpoint of other options
_OTHER_OPTIONS = "written for other data or options"

_held_locks: set[str] = set()


def check_job_output(
    job: dict, *, overwrite: bool = False, option: str | None = "--overwrite"
) -> _outputs.OutputTarget:
    """Check the job's ``[output] path`` before any work (a new path, an empty folder, or a job folder).

    Raises
    ------
    OutputRefusedError
        For a folder daskem did not write, a file, the input, a folder that
        holds the input or the job file, or a daskem output of another kind
        (unless ``overwrite``).
    """
    return _outputs.check_output(
        job["output"]["path"],
        "job",
        inputs=[job["input"]["path"], job.get("job_file")],
        overwrite=overwrite,
        option=option,
    )


def _process_created(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def _lock_holder_alive(doc: dict) -> bool:
    """Whether the process named in a lock still runs (always True for another host: it cannot be checked)."""
    if doc.get("host") != socket.gethostname():
        return True
    pid = doc.get("pid")
    if not isinstance(pid, int):
        return False
    created = _process_created(pid)
    if created is None:
        return False
    started = doc.get("process_created")
    return started is None or abs(created - float(started)) < 2.0


def _in_use(folder: str | Path, holder: dict | None) -> InputError:
    who = ""
    if holder is not None:
        who = f" ({holder.get('command')}, pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')})"
    return InputError(
        f"the job output {folder} is in use by another daskem{who}; wait for it to finish "
        f"(daskem status), or delete {Path(folder) / LOCK_FILE} if no daskem process runs there"
    )


@contextlib.contextmanager
def job_lock(folder: str | Path, what: str) -> Iterator[Path]:
    """Hold ``folder/.daskem-lock`` (pid and host of this process) for the block.

    A lock whose process is gone (same host) is stale and taken over. The
    lock is re-entrant within one process and removed at the end.

    Raises
    ------
    InputError
        When another live process holds the lock.
    """
    lock = Path(folder) / LOCK_FILE
    key = str(lock.resolve())
    if key in _held_locks:
        yield lock
        return
    doc = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_created": _process_created(os.getpid()),
        "command": what,
        "since": _now(),
    }
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = _read_json(lock)
            if holder is None:  # being written right now, or unreadable: look again
                time.sleep(0.2)
                holder = _read_json(lock)
            if holder is None or _lock_holder_alive(holder):
                raise _in_use(folder, holder) from None
            # stale: take it over (and give it back if another process took it over first)
            stale = lock.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(lock, stale)
                moved = _read_json(stale)
                if moved is not None and _lock_holder_alive(moved):
                    with contextlib.suppress(FileExistsError):
                        os.link(stale, lock)
                    stale.unlink(missing_ok=True)
                    raise _in_use(folder, moved) from None
                stale.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(doc) + "\n")
        break
    else:  # pragma: no cover - five stale takeovers lost in a row
        raise InputError(f"could not lock the job output {folder}; try again")
    _held_locks.add(key)
    try:
        yield lock
    finally:
        _held_locks.discard(key)
        if (_read_json(lock) or {}).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)


def lock_holder(folder: str | Path) -> dict | None:
    """The live process holding the job lock of ``folder``, or None."""
    doc = _read_json(Path(folder) / LOCK_FILE)
    return doc if doc is not None and _lock_holder_alive(doc) else None


@contextlib.contextmanager
def job_output(
    job: dict, what: str, *, overwrite: bool = False, target: _outputs.OutputTarget | None = None
) -> Iterator[Path]:
    """Check, create (or adopt) and lock the job's output folder for the block."""
    if target is None:
        target = check_job_output(job, overwrite=overwrite)
    out = _outputs.ensure_folder(target)
    with job_lock(out, what):
        yield out


def _move_aside(checkpoint: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = checkpoint.with_name(f"{checkpoint.name}.old-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = checkpoint.with_name(f"{checkpoint.name}.old-{stamp}-{n}")
    os.replace(checkpoint, dest)
    return dest


def _is_checkpoint(folder: Path) -> bool:
    return (folder / "checkpoint.json").is_file()


def _move_into(src: Path, dest: Path) -> None:
    """Move every entry of ``src`` into ``dest``, replacing each with a rename (not the marker)."""
    for item in sorted(src.iterdir()):
        if item.name == _outputs.MARKER:
            continue
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


def _say_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_job(
    job: dict,
    job_id: str,
    *,
    verbose: int = 0,
    fresh: bool = False,
    overwrite: bool = False,
    say: Callable[[str], None] = _say_stderr,
) -> dict:
    """Run a loaded job with the active Dask client; returns :func:`job_result`'s fields.

    The output folder is checked, created and locked first
    (:func:`job_output`). The EM state is checkpointed to
    ``<output>/checkpoint`` after every iteration (unless ``[model]
    checkpoint`` names another folder); a checkpoint written for other options
    (an edited job file), or any checkpoint with ``fresh``, is moved aside to
    ``checkpoint.old-<time>`` and the job starts afresh, with one line through
    ``say``. The report is built in a temporary folder and its entries renamed
    into the output folder, so a failed job leaves the previous good result in
    place.
    """
    with job_output(job, "run", overwrite=overwrite) as out:
        return _run_locked(job, job_id, out, verbose=verbose, fresh=fresh, say=say)


def _run_locked(job: dict, job_id: str, out: Path, *, verbose: int, fresh: bool, say: Callable[[str], None]) -> dict:
    from ._fitloop import observe_progress  # lazy: see the top
    from .workflows import open_data  # lazy: see the top

    write_state(
        job,
        job_id,
        "running",
        started=_now(),
        host=socket.gethostname(),
        pid=os.getpid(),
        process_created=_process_created(os.getpid()),
        error=None,
    )
    t0 = time.perf_counter()
    try:
        options = dict(job["model"])
        options.setdefault("checkpoint", str(out / "checkpoint"))
        checkpoint = Path(options["checkpoint"])
        if fresh and _is_checkpoint(checkpoint):
            say(f"daskem: --fresh: moved the checkpoint {checkpoint} to {_move_aside(checkpoint)}; starting afresh")
        X = open_data(job["input"]["path"], job["input"]["array"], options.get("chunk_bytes"))
        # work folders of earlier runs that were killed (this process holds the lock)
        for old in out.glob(".work-*"):
            shutil.rmtree(old, ignore_errors=True)
        work = out / f".work-{job_id}"
        work.mkdir()
        try:
            with observe_progress(_progress_writer(out, job_id)):
                try:
                    _fit_job(job, job_id, X, work, options, verbose)
                except InputError as exc:
                    if _OTHER_OPTIONS not in str(exc) or not _is_checkpoint(checkpoint):
                        raise
                    moved = _move_aside(checkpoint)
                    say(
                        f"daskem: the checkpoint {checkpoint} belongs to other data or options (the job file "
                        f"changed); moved it to {moved.name} and starting afresh"
                    )
                    shutil.rmtree(work / "report", ignore_errors=True)
                    _fit_job(job, job_id, X, work, options, verbose)
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


def _fit_job(job: dict, job_id: str, X: Any, work: Path, options: dict, verbose: int) -> None:
    from .workflows import (  # lazy: see the top
        anomaly_threshold,
        fit_and_report,
        load_model_dir,
        store_chunk_rows,
        write_predictions,
    )

    extra = {"command": "job", "job_id": job_id, "job": job}
    sel = job["select"]
    report = work / "report"
    if sel is not None:
        fit_and_report(
            X,
            report,
            k_values=sel["k"],
            criterion=sel["criterion"],
            validation_fraction=sel["validation_fraction"],
            covariance_types=sel.get("covariance_types"),
            options=options,
            verbose=verbose,
            extra=extra,
        )
    else:
        opts = {k: v for k, v in options.items() if k != "n_components"}
        fit_and_report(X, report, k=int(options["n_components"]), options=opts, verbose=verbose, extra=extra)
    if job["output"]["predict"]:
        gm, summary = load_model_dir(report)
        q = job["output"]["anomaly_quantile"]
        write_predictions(
            gm,
            X,
            report / "labels.zarr",
            proba=job["output"]["proba"],
            anomaly_threshold=None if q is None else anomaly_threshold(summary, q),
            store_rows=store_chunk_rows(job["input"]["path"], job["input"]["array"]),
            attrs={"job_id": job_id, "anomaly_quantile": q},
        )


def job_result_from_folder(job_id: str, out: Path) -> dict:
    summary = _read_json(out / "summary.json") or {}
    model = summary.get("model", {})
    return {
        "output": str(out),
        "summary": str(out / "summary.json"),
        "n_components": model.get("n_components"),
        "best_k": summary.get("best_k"),
        "best_covariance_type": summary.get("best_covariance_type"),
        "lower_bound": model.get("lower_bound"),
        "converged": model.get("converged"),
    }


def _job_task(job: dict, job_id: str, home: str | None, fresh: bool = False) -> str:
    """The long-running task of a submitted job (runs on a worker)."""
    from distributed import worker_client  # slow import: only on a worker, for a submitted job

    if home:
        os.environ.setdefault("DASKEM_HOME", home)
    with job_output(job, "submit") as out:
        with open(out / "job.log", "a") as log, contextlib.redirect_stderr(log):
            print(f"{_now()} job {job_id} starting on {socket.gethostname()}", file=log, flush=True)
            try:
                with worker_client() as client, client.as_current():
                    run_job(job, job_id, verbose=1, fresh=fresh, say=lambda m: print(m, file=log, flush=True))
            except BaseException:
                traceback.print_exc(file=log)
                raise
            print(f"{_now()} job {job_id} done", file=log, flush=True)
    return str(out)


def submit(job: dict, *, connect_timeout: str = "20s", overwrite: bool = False, fresh: bool = False) -> str:
    """Hand a loaded job to the running cluster named in ``job['cluster']``; return its id.

    The output folder is checked and created first; a job whose output folder
    is locked by a running ``run`` or ``submit`` is refused.

    Raises
    ------
    InputError
        Without a scheduler address or file (a local cluster would die with
        the submitting process), when the scheduler cannot be reached, or when
        the job is running already.
    OutputRefusedError
        For an output path daskem will not write to.
    """
    from distributed import Client, fire_and_forget  # lazy: see the top

    from .security import find_security  # lazy: see the top

    c = job["cluster"]
    if not (c.get("scheduler") or c.get("scheduler_file")):
        raise InputError(
            "submit needs a running cluster: pass --scheduler ADDRESS or --scheduler-file FILE, or set "
            "[cluster] scheduler in the job file (use `daskem run` to run on a local cluster)"
        )
    if c.get("scheduler_file") and not Path(c["scheduler_file"]).exists():
        raise InputNotFoundError(f"no such scheduler file: {c['scheduler_file']}")
    target = check_job_output(job, overwrite=overwrite)
    out = _outputs.ensure_folder(target)
    holder = lock_holder(out)
    if holder is not None:
        raise _in_use(out, holder)
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
        fut = client.submit(_job_task, job, job_id, os.environ.get("DASKEM_HOME"), fresh, key=key, pure=False)
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
