"""Outputs never destroy anything daskem did not write; failures are honest and quiet.

Real files, real Zarr stores, the CLI as real subprocesses (issue 10, parts 1 and 2).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from _cli_helpers import LOCAL, assert_one_line_error, daskem, env

import daskem as dk
from daskem import _outputs
from daskem.datasets import check_generate_target, generate_zarr
from daskem.errors import InputError, InputNotFoundError, OutputRefusedError
from daskem.jobs import LOCK_FILE, job_lock, lock_holder

# real processes (the CLI, clusters) or long fits: not in the quick subset
pytestmark = pytest.mark.slow

QUIET = [*LOCAL, "--quiet"]


def tree_hash(path: Path) -> str:
    """Names, modes and bytes of everything under ``path`` (or of the file)."""
    h = hashlib.sha256()
    items = [path] if path.is_file() else sorted(path.rglob("*"))
    for f in items:
        h.update(str(f.relative_to(path.parent)).encode())
        h.update(oct(f.stat().st_mode).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


@contextlib.contextmanager
def _group_killed_at_exit(proc: subprocess.Popen):
    """The test's daskem process group (started with start_new_session) is SIGKILLed when the block ends, so a
    failed test leaves no fit running on (they run with tol 0 and max_iter 100,000)."""
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def leftovers(folder: Path) -> list[str]:
    return sorted(f.name for f in folder.iterdir() if ".tmp-" in f.name or ".old-" in f.name)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A generated store and a fit of it, written by the CLI."""
    d = tmp_path_factory.mktemp("safe")
    p = daskem(
        "generate", d / "data.zarr", "--n-samples", 2000, "--n-features", 2, "--n-components", 2, "--chunk-rows", 500
    )
    assert p.returncode == 0, p.stderr
    p = daskem("fit", d / "data.zarr", "--k", 2, "--random-state", 0, "--out", d / "fit", *QUIET)
    assert p.returncode == 0, p.stderr
    return d


def _foreign(folder: Path) -> Path:
    """A non-empty folder of the user's: a file, a nested file, a Zarr store."""
    folder.mkdir()
    (folder / "important.txt").write_text("do not lose me\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.md").write_text("# notes\n")
    z = zarr.create_array(str(folder / "user.zarr"), shape=(10, 2), chunks=(5, 2), dtype="f8")
    z[:] = np.arange(20.0).reshape(10, 2)
    return folder


def _job_file(folder: Path, data: Path, output: Path | str, n_components: int = 2, extra: str = "") -> Path:
    f = folder / "job.toml"
    f.write_text(
        f'[input]\npath = "{data}"\n[model]\nn_components = {n_components}\nrandom_state = 0\n{extra}'
        f'[output]\npath = "{output}"\n'
    )
    return f


def _command(name: str, world: Path, target: Path, tmp: Path) -> list:
    data = world / "data.zarr"
    if name == "fit":
        return ["fit", data, "--k", 2, "--out", target, *QUIET]
    if name == "select-k":
        return ["select-k", data, "--k", "2:3", "--out", target, *QUIET]
    if name == "predict":
        return ["predict", world / "fit", data, "--out", target, *QUIET]
    if name == "generate":
        return ["generate", target, "--n-samples", 100, "--n-features", 2, "--n-components", 2, "--quiet"]
    if name == "demo":
        return [
            "demo",
            "--out",
            target,
            "--n-samples",
            2000,
            "--n-features",
            2,
            "--n-components",
            2,
            "--k",
            "2",
            *QUIET,
        ]
    if name == "run":
        return ["run", _job_file(tmp, data, target), *QUIET]
    raise AssertionError(name)


COMMANDS = ["fit", "select-k", "predict", "generate", "demo", "run"]
#: commands with an input that the output may not be, hold, or lie in
WITH_INPUT = {"fit", "select-k", "predict", "run"}


# --------------------------------------------------------------------------
# every command x {non-empty foreign folder, a file, the input, a parent of the input, another daskem kind}
# --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_refused_targets_are_untouched(name, world, tmp_path):
    cases = {"foreign": _foreign(tmp_path / "mine"), "file": tmp_path / "notes.txt"}
    cases["file"].write_text("a file of the user's\n")
    if name in WITH_INPUT:
        cases["input"] = world / "data.zarr"
        cases["parent of the input"] = world
    if name == "generate":
        cases["another daskem kind"] = world / "fit"
    else:
        cases["another daskem kind"] = tmp_path / "other.zarr"
        generate_zarr(cases["another daskem kind"], 20, 2, 2)
    for case, target in cases.items():
        before = tree_hash(target)
        line = assert_one_line_error(daskem(*_command(name, world, target, tmp_path)))
        assert f"refusing to write to {target}:" in line, (case, line)
        if case == "another daskem kind":
            assert "--overwrite" in line, line
        else:
            assert "--overwrite" not in line, line  # no flag ever allows these
            # --overwrite does not change that
            line = assert_one_line_error(daskem(*_command(name, world, target, tmp_path), "--overwrite"))
        assert tree_hash(target) == before, case
        assert leftovers(target.parent) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_new_then_replaced(name, world, tmp_path):
    target = tmp_path / "out"
    p = daskem(*_command(name, world, target, tmp_path))
    assert p.returncode == 0, p.stderr
    kind = {"run": "job"}.get(name, name)
    kind = {"predict": "predictions", "generate": "generated"}.get(kind, kind)
    assert _outputs.output_kind(target) == kind
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask()  # the user's umask, not 0700
    first = target.stat().st_ino
    # the same command again: a daskem output of the same kind is replaced, and the command says so
    args = _command(name, world, target, tmp_path)
    p = daskem(*[a for a in args if a != "--quiet"])
    assert p.returncode == 0, p.stderr
    if name != "run":  # a job resumes into its folder (checked in test_jobs)
        assert f"replaced the previous {_outputs.KINDS[kind]} in {target}" in p.stderr
        assert target.stat().st_ino != first  # a new folder, swapped in
    assert _outputs.output_kind(target) == kind
    assert leftovers(tmp_path) == []


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_overwrite_replaces_another_daskem_kind(world, tmp_path):
    target = tmp_path / "was-generated.zarr"
    generate_zarr(target, 50, 2, 2)
    line = assert_one_line_error(daskem("predict", world / "fit", world / "data.zarr", "--out", target, *QUIET))
    assert "generated store" in line and "--overwrite" in line
    p = daskem("predict", world / "fit", world / "data.zarr", "--out", target, "--overwrite", *LOCAL)
    assert p.returncode == 0, p.stderr
    assert "replaced the previous generated store" in p.stderr
    g = zarr.open_group(str(target), mode="r")
    assert set(g.array_keys()) == {"labels"} and _outputs.output_kind(target) == "predictions"


# --------------------------------------------------------------------------
# the Python API: save(), generate_zarr
# --------------------------------------------------------------------------


def test_save_follows_the_same_rules(world, tmp_path):
    gm = dk.load(world / "fit")  # the folder `daskem fit --out` wrote loads as it is
    assert gm.n_components == 2
    gm.save(tmp_path / "m")  # new
    assert _outputs.output_kind(tmp_path / "m") == "model"
    gm.save(tmp_path / "m")  # same kind: replaced
    (tmp_path / "empty").mkdir()
    gm.save(tmp_path / "empty")  # an empty folder
    assert dk.load(tmp_path / "empty").n_components == 2
    foreign = _foreign(tmp_path / "mine")
    f = tmp_path / "file.txt"
    f.write_text("x")
    for target in (foreign, f, world / "fit", world / "data.zarr"):
        before = tree_hash(target)
        with pytest.raises(OutputRefusedError, match="refusing to write to"):
            gm.save(target)
        assert tree_hash(target) == before
    with pytest.raises(OutputRefusedError, match="it holds a daskem fit"):
        gm.save(world / "fit")
    assert leftovers(tmp_path) == []


def test_generate_zarr_rules_and_zarr_reads_the_marker(tmp_path):
    p = tmp_path / "g.zarr"
    generate_zarr(p, 100, 2, 2, seed=1)
    a = zarr.open_array(str(p), mode="r")[:]
    assert a.shape == (100, 2) and _outputs.output_kind(p) == "generated"
    truth = json.loads((tmp_path / "g.truth.json").read_text())
    assert truth["daskem_output"] == "generated" and truth["seed"] == 1
    generate_zarr(p, 100, 2, 2, seed=2)  # replaced, with its truth
    assert json.loads((tmp_path / "g.truth.json").read_text())["seed"] == 2
    assert not np.array_equal(zarr.open_array(str(p), mode="r")[:], a)
    user = tmp_path / "user.zarr"
    zarr.create_array(str(user), shape=(4, 2), chunks=(2, 2), dtype="f8")[:] = 1.0
    before = tree_hash(user)
    with pytest.raises(OutputRefusedError, match="a Zarr store daskem did not write"):
        generate_zarr(user, 10, 2, 2)
    assert tree_hash(user) == before
    # a truth file of the user's beside a new store is refused too
    (tmp_path / "new.truth.json").write_text("{}")
    with pytest.raises(OutputRefusedError, match="new.truth.json"):
        generate_zarr(tmp_path / "new.zarr", 10, 2, 2)
    assert not (tmp_path / "new.zarr").exists()


def test_outputs_get_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        generate_zarr(tmp_path / "u.zarr", 10, 2, 2)
        target = _outputs.check_output(tmp_path / "m", "model")
        with _outputs.atomic_output(target) as tmp:
            (tmp / "x").write_text("1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "u.zarr").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "m" / "x").stat().st_mode) == 0o640


# --------------------------------------------------------------------------
# killed while replacing: the old output or the new one, never a mix or nothing
# --------------------------------------------------------------------------


def _store_digest(p: Path) -> str:
    return hashlib.sha256(np.ascontiguousarray(zarr.open_array(str(p), mode="r")[:]).tobytes()).hexdigest()


@pytest.mark.slow
def test_sigkill_while_replacing_leaves_old_or_new(tmp_path):
    args = ["--n-samples", 300_000, "--n-features", 4, "--n-components", 3, "--chunk-rows", 5000, "--quiet"]
    ref = tmp_path / "ref"
    ref.mkdir()
    assert daskem("generate", ref / "new.zarr", *args, "--seed", 2).returncode == 0
    new = _store_digest(ref / "new.zarr")
    target = tmp_path / "out.zarr"
    assert daskem("generate", target, *args, "--seed", 1).returncode == 0
    old = _store_digest(target)
    seen = set()
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "daskem", "--version"], env=env(), capture_output=True)
    startup = time.monotonic() - start  # the kills spread over start-up, generation and the swap
    rng = np.random.default_rng(0)
    for delay in sorted(rng.uniform(0.5 * startup, 2.5 * startup + 1.0, size=6)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "daskem", "generate", str(target), *map(str, args), "--seed", "2"],
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        check_generate_target(target)  # what the next daskem command on this path does first
        assert target.is_dir() and _outputs.output_kind(target) == "generated"
        digest = _store_digest(target)
        assert digest in (old, new), delay
        seen.add("new" if digest == new else "old")
        assert leftovers(tmp_path) == []
        if digest == new:  # back to the old store for the next kill
            assert daskem("generate", target, *args, "--seed", 1).returncode == 0
    assert p.returncode == 0


def test_leftover_of_a_killed_swap_is_put_back(tmp_path):
    """Without renameat2 the swap is two renames; a process killed between them is repaired."""
    target = _outputs.check_output(tmp_path / "fit", "fit")
    with _outputs.atomic_output(target) as tmp:
        (tmp / "summary.json").write_text('{"old": true}')
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".fit.old-{_outputs._HOST}-{dead.pid}-abcdef"
    os.replace(tmp_path / "fit", aside)  # what a kill between the two renames leaves
    half = tmp_path / f".fit.tmp-{_outputs._HOST}-{dead.pid}-123456"
    half.mkdir()
    mine = tmp_path / ".fit.old-keep"  # not daskem's name pattern: never touched
    mine.mkdir()
    _outputs.check_output(tmp_path / "fit", "fit")
    assert json.loads((tmp_path / "fit" / "summary.json").read_text()) == {"old": True}
    assert not aside.exists() and not half.exists() and mine.exists()


def test_two_rename_swap_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(_outputs, "_exchange", lambda a, b: False)
    for text in ("one", "two"):
        target = _outputs.check_output(tmp_path / "m", "model")
        with _outputs.atomic_output(target) as tmp:
            (tmp / "x").write_text(text)
    assert (tmp_path / "m" / "x").read_text() == "two" and leftovers(tmp_path) == []


# --------------------------------------------------------------------------
# honest failures
# --------------------------------------------------------------------------


def test_predict_nan_with_missing_error_writes_nothing(world, tmp_path):
    x = np.random.default_rng(0).normal(size=(1000, 2))
    x[[3, 50, 700], 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    out = tmp_path / "labels.zarr"
    line = assert_one_line_error(daskem("predict", world / "fit", tmp_path / "nan.npy", "--out", out, *QUIET))
    assert "3 of 1,000 rows hold NaN" in line and "--missing marginalize" in line
    assert not out.exists() and leftovers(tmp_path) == []


def test_missing_inputs_are_file_not_found(tmp_path):
    for call in (lambda: dk.open_array(tmp_path / "no.zarr"), lambda: dk.load(tmp_path / "nomodel")):
        with pytest.raises(FileNotFoundError) as e:
            call()
        assert isinstance(e.value, InputNotFoundError) and isinstance(e.value, InputError)
    assert "no such" in assert_one_line_error(daskem("fit", tmp_path / "no.zarr", "--k", 2, "--out", tmp_path / "o"))


def test_csv_is_not_a_zarr_store(tmp_path):
    csv = tmp_path / "x.csv"
    np.savetxt(csv, np.ones((5, 2)), delimiter=",")
    line = assert_one_line_error(daskem("fit", csv, "--k", 2, "--out", tmp_path / "o"))
    assert f"not a Zarr store or .npy file: {csv}" in line and "np.save" in line
    with pytest.raises(InputError, match="not a Zarr store or .npy file"):
        dk.open_array(csv)


def test_reg_covar_zero_on_singular_data_names_the_flag(tmp_path):
    x = np.zeros((300, 2))
    x[:150] = 1.0
    np.save(tmp_path / "s.npy", x)
    line = assert_one_line_error(
        daskem("fit", tmp_path / "s.npy", "--k", 2, "--reg-covar", 0, "--out", tmp_path / "o", *QUIET)
    )
    assert "--reg-covar" in line and "reg_covar" not in line
    assert not (tmp_path / "o").exists()


def test_cli_message_translates_keywords_only():
    from daskem.cli import cli_message

    assert cli_message("increase reg_covar, or fit with missing='marginalize'") == (
        "increase --reg-covar, or fit with --missing marginalize"
    )
    assert cli_message("n_components=5 must be <= n_samples=3") == "--k 5 must be <= the number of rows (3)"
    assert cli_message("no such Zarr store: /data/reg_covar/tol.zarr") == "no such Zarr store: /data/reg_covar/tol.zarr"


def _long_fit_data(folder: Path) -> Path:
    p = folder / "long.zarr"
    generate_zarr(p, 100_000, 6, 8, seed=3, chunk_rows=10_000, separation=2.0)
    return p


@pytest.mark.slow
def test_ctrl_c_during_fit(world, tmp_path):
    data = _long_fit_data(tmp_path)
    out, ck = tmp_path / "fit", tmp_path / "ck"
    import shutil

    shutil.copytree(world / "fit", out)  # a previous fit of the user's, to keep
    before = tree_hash(out)
    args = ["fit", data, "--k", 10, "--tol", 0, "--max-iter", 100000, "--checkpoint", ck, "--out", out, *QUIET]
    proc = subprocess.Popen(
        [sys.executable, "-m", "daskem", *map(str, args)],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    with _group_killed_at_exit(proc):
        deadline = time.monotonic() + 180
        while not (ck / "checkpoint.json").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (ck / "checkpoint.json").exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole group, workers included
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"daskem: interrupted; the checkpoint at {ck} is intact; rerun the same command to resume"], err
    assert tree_hash(out) == before and leftovers(tmp_path) == []
    doc = json.loads((ck / "checkpoint.json").read_text())
    with np.load(ck / doc["arrays"], allow_pickle=False) as npz:
        assert all(np.isfinite(npz[k]).all() for k in npz.files)
    assert doc["runs"] and doc["stage"]


# --------------------------------------------------------------------------
# jobs: the lock, an edited job file
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_second_run_of_a_running_job_is_refused(tmp_path):
    data = _long_fit_data(tmp_path)
    job = _job_file(tmp_path, data, "out", n_components=10, extra="tol = 0.0\nmax_iter = 100000\n")
    out = tmp_path / "out"
    home = str(tmp_path / "home")
    first = subprocess.Popen(
        [sys.executable, "-m", "daskem", "run", str(job), *QUIET],
        env=env(DASKEM_HOME=home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    with _group_killed_at_exit(first):
        deadline = time.monotonic() + 120
        while not (out / LOCK_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / LOCK_FILE).exists()
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == first.pid and holder["host"]
        line = assert_one_line_error(daskem("run", job, *QUIET, DASKEM_HOME=home))
        assert "is in use by another daskem" in line and f"pid {first.pid}" in line
        line = assert_one_line_error(
            daskem("submit", job, "--scheduler", "tcp://127.0.0.1:1", DASKEM_HOME=home, DASKEM_CONNECT_TIMEOUT="2s")
        )
        assert "is in use by another daskem" in line
        # Ctrl-C on the job: exit 130, one line, the lock released
        while not (out / "checkpoint" / "checkpoint.json").exists() and time.monotonic() < deadline + 60:
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGINT)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 130, err
        assert [ln for ln in err.splitlines() if ln.strip()] == [
            f"daskem: interrupted; the checkpoint at {out / 'checkpoint'} is intact; rerun the same command to resume"
        ]
        assert not (out / LOCK_FILE).exists()


def test_stale_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "run"}))
    assert lock_holder(tmp_path) is None
    with job_lock(tmp_path, "test") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from daskem.jobs import job_lock\n"
                "try:\n with job_lock(sys.argv[1], 'x'): pass\nexcept ValueError as e: print(e)",
                str(tmp_path),
            ],
            env=env(),
            capture_output=True,
            text=True,
        )
        assert "in use by another daskem" in other.stdout, other.stderr
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.slow
def test_edited_job_starts_afresh_with_the_old_checkpoint_aside(world, tmp_path):
    home = str(tmp_path / "home")
    job = _job_file(tmp_path, world / "data.zarr", "out", n_components=2)
    assert daskem("run", job, *QUIET, DASKEM_HOME=home).returncode == 0
    _job_file(tmp_path, world / "data.zarr", "out", n_components=3)  # edited
    p = daskem("run", job, *QUIET, DASKEM_HOME=home)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "belongs to other data or options" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    aside = [f.name for f in (tmp_path / "out").iterdir() if f.name.startswith("checkpoint.old-")]
    assert len(aside) == 1 and aside[0] in lines[0]
    assert json.loads(p.stdout)["n_components"] == 3
    # --fresh: the checkpoint moved aside without a mismatch
    p = daskem("run", job, "--fresh", *QUIET, DASKEM_HOME=home)
    assert p.returncode == 0 and "--fresh: moved the checkpoint" in p.stderr, p.stderr
    assert len([f for f in (tmp_path / "out").iterdir() if f.name.startswith("checkpoint.old-")]) == 2


def test_ctrl_c_landing_in_a_finalizer_is_not_lost():
    """Python ignores an exception raised in ``__del__``: a Ctrl-C that lands while a finalizer
    runs (a Dask Future released between passes) must still stop the command."""
    script = (
        "import os, signal, time\n"
        "from daskem import cli\n"
        "signal.signal(signal.SIGINT, cli._on_interrupt)\n"
        "class Finalized:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(0.01)\n"
        "try:\n"
        "    Finalized()\n"
        "    time.sleep(2.0)\n"
        "    print('not interrupted')\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted')\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env())
    assert p.stdout.strip() == "interrupted", p.stderr
