"""What a person reads from the command line: every option explained with its default, messages in CLI words.

In process (``daskem.cli.main``) and quick: the refusals come before any cluster starts.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest

from daskem import cli


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _default_forms(d: object) -> set[str]:
    forms = {str(d), f"./{d}"}
    if isinstance(d, (int, float)) and not isinstance(d, bool):
        forms |= {f"{d:g}", f"{d:,}"}
    return forms


def test_the_walk_sees_every_command():
    assert set(_commands()) == {"demo", "generate", "fit", "select-k", "predict", "score", "run", "submit", "status",
                                "result"}  # fmt: skip


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_option_has_help_with_its_default(command):
    parser = _commands()[command]
    assert parser.description, command
    checked = 0
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = f"{command} {'/'.join(action.option_strings) or action.dest}"
        assert action.help and len(action.help) > 10, name
        if action.default not in (None, False, argparse.SUPPRESS):
            # the value argparse would use, spelled in the help text
            assert any(f"default: {f})" in action.help for f in _default_forms(action.default)), (name, action.help)
        elif action.option_strings and action.nargs != 0 and not action.required:
            # an optional value without a default: the help says what happens without it
            assert re.search(r"\(default[: ]", action.help), (name, action.help)
        checked += 1
    assert checked >= 2, command


def test_generate_options_are_explained_and_select_k_criterion_too(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "rows to write" in out and "random seed of the parameters and the rows (default: 0)" in out
    with pytest.raises(SystemExit):
        cli.main(["select-k", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "'validation' the smallest K whose mean" in out
        and "one standard error" in out
        and "'bic', 'icl' or 'aic' the lowest" in out
    )
    with pytest.raises(SystemExit):
        cli.main(["status", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "superseded (the job's output folder now holds a later job" in out


def _error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("daskem: error: "), lines
    return lines[0][len("daskem: error: ") :]


@pytest.fixture
def iris_npy(tmp_path):
    from sklearn.datasets import load_iris

    p = tmp_path / "iris.npy"
    np.save(p, load_iris().data)
    return p


def test_refusals_name_the_command_line_options(tmp_path, iris_npy, capsys):
    out = str(tmp_path / "o")
    msg = _error(capsys, ["fit", str(iris_npy), "--k", "3", "--tol", "-1", "--out", out])
    assert msg == "--tol must be a number >= 0, got -1.0"
    msg = _error(capsys, ["fit", str(iris_npy), "--k", "3", "--chunk-bytes", "0", "--out", out])
    assert msg == "--chunk-bytes must be a positive integer, got 0"
    msg = _error(capsys, ["fit", str(iris_npy), "--k", "3", "--random-state", "-1", "--out", out])
    assert msg == "--random-state must be an integer >= 0, got -1"
    msg = _error(capsys, ["fit", str(iris_npy), "--k", "0", "--out", out])
    assert msg == "--k must be an integer >= 1, got 0"
    # generate's --n-components is n_components, as in the Python API; fit's n_components is --k
    msg = _error(capsys, ["generate", str(tmp_path / "g.zarr"), "--n-samples", "10", "--n-features", "2",
                          "--n-components", "20"])  # fmt: skip
    assert msg == "--n-components 20 must be <= --n-samples 10"
    msg = _error(capsys, ["generate", str(tmp_path / "g.zarr"), "--n-samples", "0", "--n-features", "2",
                          "--n-components", "2"])  # fmt: skip
    assert msg == "--n-samples must be an integer >= 1, got 0"
    assert not (tmp_path / "o").exists() and not (tmp_path / "g.zarr").exists()


def test_cli_message_per_command():
    cmds = _commands()
    fit, generate, select = (cli.command_flags(cmds[c]) for c in ("fit", "generate", "select-k"))
    sklearn_words = "n_components=200 must be <= n_samples=1500 (Expected n_samples >= n_components but got " \
                    "n_components = 200, n_samples = 1500)"  # fmt: skip
    assert cli.cli_message(sklearn_words, fit) == "--k 200 must be <= the number of rows (1,500)"
    assert cli.cli_message(
        "k=200 is larger than the number of training rows: about 135 of the 150 rows", select
    ).startswith("--k 200 is larger than")
    assert cli.cli_message("try more values in k_values", select) == "try more values in --k"
    assert (
        cli.cli_message("n_components=3 must be <= n_samples=2", generate)
        == "--n-components 3 must be <= --n-samples 2"
    )
    assert (
        cli.cli_message("run {'k': 8, 'init': 3} failed at iteration 4", fit) == "run k=8 init=3 failed at iteration 4"
    )
    # the Python API keeps scikit-learn's names
    import daskem

    with pytest.raises(daskem.InputError, match=r"n_components=200 must be <= n_samples=150 \(Expected"):
        daskem.GaussianMixture(200).fit(np.random.default_rng(0).normal(size=(150, 2)))


def test_select_k_too_many_components_in_words(iris_npy):
    import daskem

    with pytest.raises(daskem.InputError) as info:
        daskem.select_k(np.load(iris_npy), [2, 200], random_state=0)
    assert (
        str(info.value)
        == "k=200 is larger than the number of training rows: about 135 of the 150 rows, 10% held out for validation"
    )
    with pytest.raises(daskem.InputError, match=r"^k=200 is larger than the number of training rows \(150 rows\)$"):
        daskem.select_k(np.load(iris_npy), [2, 200], criterion="bic")


def test_status_without_jobs_and_with_a_recorded_progress(tmp_path, monkeypatch, capsys):
    """The list's header and columns from the records a job writes (a job folder written by hand here;
    tests/test_jobs.py runs real jobs)."""
    from daskem import jobs

    monkeypatch.setenv("DASKEM_HOME", str(tmp_path / "home"))
    assert cli.main(["status"]) == 0
    assert "no jobs recorded in" in capsys.readouterr().err
    out = tmp_path / "out"
    job = {"output": {"path": str(out)}, "job_file": str(tmp_path / "job.toml")}
    jobs.register("J1", job, mode="run")
    jobs.write_state(job, "J1", "running")
    jobs._progress_writer(out, "J1")(
        {
            "iteration": 12,
            "max_iter": 100,
            "run": "k=8 init=3",
            "loglik": -3.25,
            "n_running": 5,
            "n_runs": 8,
            "eta_seconds": 95.0,
            "finished": False,
        }  # fmt: skip
    )
    assert cli.main(["status"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split("\t") == ["JOB ID", "STATE", "ITERATION", "LOGLIK", "UPDATED", "OUTPUT"]
    assert row.split("\t")[:4] == ["J1", "running", "12/100", "-3.250000"]
    assert cli.main(["status", "J1"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["progress"]["iteration"] == 12
    assert cap.err.startswith("job J1: running; iteration 12/100 of run k=8 init=3, log-likelihood -3.250000; ")
    assert "5 of 8 run(s) running, ETA <= 1 min 35 s (max_iter); updated 20" in cap.err


def test_warnings_read_as_the_command_words_them(capsys):
    import warnings

    flags = cli.command_flags(_commands()["select-k"])
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = cli._warning_printer(flags)
        warnings.warn(
            "validation chose K=8, the largest of the candidates 2..8: try more values in k_values", stacklevel=1
        )
        warnings.warn(
            "1 of 4 run(s) ended degenerate: run {'k': 8, 'init': 3}: component 2 has collapsed", stacklevel=1
        )
    assert capsys.readouterr().err.splitlines() == [
        "daskem: warning: validation chose K=8, the largest of the candidates 2..8: try more values in --k",
        "daskem: warning: 1 of 4 run(s) ended degenerate: run k=8 init=3: component 2 has collapsed",
    ]


def test_model_options_keep_their_flags_in_every_command():
    predict = cli.command_flags(_commands()["predict"])
    msg = "3 of 1,000 rows hold NaN; nothing was written (refit with missing='marginalize' to use the observed entries)"
    assert cli.cli_message(msg, predict).endswith("(refit with --missing marginalize to use the observed entries)")


def test_missing_scheduler_file_is_an_input_not_found_error(tmp_path) -> None:
    """A scheduler file that does not exist is refused before connecting, as a missing input (a FileNotFoundError
    for library callers; exit status 2 and one line on the command line)."""
    from daskem.errors import InputNotFoundError

    missing = tmp_path / "scheduler.json"
    args = argparse.Namespace(scheduler=None, scheduler_file=str(missing), quiet=True)
    with pytest.raises(InputNotFoundError, match="no such scheduler file"):
        with cli.cluster_client(args):
            pass
    # from a job file's [cluster] table too
    args = argparse.Namespace(scheduler=None, scheduler_file=None, quiet=True)
    with pytest.raises(FileNotFoundError, match="no such scheduler file"):
        with cli.cluster_client(args, {"scheduler_file": str(missing)}):
            pass


@pytest.mark.parametrize("command", ["fit", "select-k", "predict", "demo", "run"])
def test_a_refused_output_is_answered_before_the_slow_imports(tmp_path, iris_npy, command):
    """A refused ``--out`` (a folder of the user's) is the one message, given before scikit-learn and
    Dask's arrays are imported: the check costs the interpreter's start, not theirs (a fresh process,
    the modules it holds when it answers)."""
    import subprocess
    import sys

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("do not lose me\n")
    job = tmp_path / "job.toml"
    job.write_text(f'[input]\npath = "{iris_npy}"\n[model]\nn_components = 2\n[output]\npath = "{mine}"\n')
    argv = {
        "fit": ["fit", str(iris_npy), "--k", "2", "--out", str(mine)],
        "select-k": ["select-k", str(iris_npy), "--k", "2:3", "--out", str(mine)],
        "predict": ["predict", str(iris_npy), str(tmp_path / "model"), "--out", str(mine)],
        "demo": ["demo", "--out", str(mine)],
        "run": ["run", str(job)],
    }[command]
    code = (
        "import sys\nfrom daskem import cli\n"
        f"rc = cli.main({argv!r})\n"
        "print(rc, [m for m in ('sklearn', 'dask.array', 'distributed') if m in sys.modules])\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout.split("\n")[0] == "2 []", (p.stdout, p.stderr)
    assert p.stderr.startswith(f"daskem: error: refusing to write to {mine}:"), p.stderr
    assert sorted(q.name for q in mine.iterdir()) == ["notes.txt"]
