"""Progress that says how long: one named run per line, iteration i/max_iter, ETA; through logging (``daskem.fit``)."""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import pytest
from conftest import make_blobs
from sklearn.datasets import load_iris

import daskem
from daskem import _fitloop
from daskem._fitloop import AcceleratedRun, Progress, Run, format_seconds, observe_progress, passes_to_tol

LINE = re.compile(
    r"^iteration +(?P<it>\d+)/(?P<max>\d+)  run (?P<run>k=\d+ init=\d+)  loglik (?P<ll> ?-?\d+\.\d+)  "
    r"delta +(?P<delta>\S+)  (?P<spp>\S+ m?s)/pass  (?P<eta>ETA <= \S+( \S+)*? \(max_iter\)"
    r"(, ~\S+( \S+)*? \(at the current rate\))?|done)  running (?P<live>\d+)/(?P<runs>\d+)  passes (?P<passes>\d+)$"
)


def _lines(text: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


@pytest.fixture(scope="module")
def iris() -> np.ndarray:
    return load_iris().data


def test_verbose_lines_go_to_the_daskem_logger_at_info(iris, caplog, capsys):
    caplog.set_level(logging.INFO, logger="daskem")
    # plain EM: one accepted point per pass, so the lines match lower_bounds_ one to one; from k-means++
    # seeds (the default's start on iris is its candidates' EM, a few iterations from the end)
    gm = daskem.GaussianMixture(
        3, verbose=2, random_state=0, tol=1e-6, max_iter=300, accelerate=None, init_params="k-means++"
    ).fit(iris)
    records = [r for r in caplog.records if r.name == "daskem.fit"]
    assert records and all(r.levelno == logging.INFO for r in records)
    lines = _lines("\n".join(r.getMessage() for r in records))
    # one line per iteration of the one run, numbered out of max_iter, its log-likelihood and change
    assert [int(m["it"]) for m in lines] == list(range(1, gm.n_iter_ + 1))
    assert {m["max"] for m in lines} == {"300"} and {m["run"] for m in lines} == {"k=3 init=0"}
    np.testing.assert_allclose([float(m["ll"]) for m in lines], gm.lower_bounds_, atol=5e-7)
    deltas = np.diff(gm.lower_bounds_)
    np.testing.assert_allclose([float(m["delta"]) for m in lines[1:]], deltas, rtol=1e-3, atol=1e-12)
    assert lines[0]["delta"].strip() == "-" and lines[-1]["eta"] == "done" and lines[-1]["live"] == "0"
    assert any("(at the current rate)" in m["eta"] for m in lines)  # EM's linear tail gives an estimate
    # the record carries the numbers; the closing line says how it ended
    snap = records[-2].daskem_progress
    assert snap["iteration"] == gm.n_iter_ and snap["max_iter"] == 300 and snap["run"] == "k=3 init=0"
    assert records[0].getMessage().startswith("initialised 1 run(s) in ")
    assert records[-1].getMessage().startswith("EM finished in ") and "1 of 1 run(s) converged" in records[-1].msg
    # logging shows them: not printed a second time
    assert "iteration" not in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_verbose_prints_when_logging_would_not_show_the_lines(iris, capsys):
    logger = logging.getLogger("daskem")
    assert not logger.isEnabledFor(logging.INFO)  # logging as a notebook leaves it: WARNING
    gm = daskem.GaussianMixture(3, verbose=1, verbose_interval=5, random_state=0, max_iter=7, tol=0.0).fit(iris)
    err = capsys.readouterr().err
    lines = _lines(err)
    assert [int(m["it"]) for m in lines] == [1, 5, 7]  # every verbose_interval, and the last
    assert {m["max"] for m in lines} == {"7"} and gm.n_iter_ == 7
    assert "initialised 1 run(s)" in err and "EM finished" in err and "0 of 1 run(s) converged" in err
    assert "1 reached max_iter (7)" in err


def test_verbose_zero_says_nothing(iris, caplog, capsys):
    caplog.set_level(logging.DEBUG, logger="daskem")
    daskem.GaussianMixture(3, random_state=0).fit(iris)
    assert not [r for r in caplog.records if r.name.startswith("daskem") and r.levelno >= logging.INFO]
    assert capsys.readouterr().err == ""


def test_select_k_follows_one_named_run_until_it_stops(capsys):
    """With many runs the column never follows whichever run leads: one named run until it stops."""
    X = make_blobs(3000, 3, 4, seed=3)
    # k-means++ seeds: runs that stop at different iterations
    daskem.select_k(X, [2, 3, 4, 5], n_init=2, random_state=0, verbose=1, max_iter=200, init_params="k-means++")
    err = capsys.readouterr().err
    lines = _lines(err)
    assert {m["runs"] for m in lines} == {"8"}
    stops = re.findall(r"^run (k=\d+ init=\d+) (converged|reached max_iter|failed) at iteration (\d+)", err, re.M)
    followed = [lines[0]["run"]]
    for prev, m in zip(lines, lines[1:]):
        if m["run"] != prev["run"]:
            # a switch only after the followed run stopped, and it was said
            assert (prev["run"], "converged", prev["it"]) in stops
            followed.append(m["run"])
        else:
            assert float(m["ll"]) >= float(prev["ll"]) - 1e-9 and int(m["it"]) == int(prev["it"]) + 1
    assert len(followed) >= 2 and len(set(followed)) == len(followed)
    live = [int(m["live"]) for m in lines]
    assert live == sorted(live, reverse=True) and live[-1] == 0


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_observers_get_every_pass_whatever_verbose(iris, capsys):
    seen: list[dict] = []
    with observe_progress(seen.append):
        gm = daskem.GaussianMixture(3, n_init=2, random_state=1, max_iter=50).fit(iris)
    assert capsys.readouterr().err == ""
    assert [s["finished"] for s in seen] == [False] * (len(seen) - 1) + [True]
    passes = [s for s in seen if not s["finished"]]
    assert len(passes) == max(r["n_iter"] for r in gm.runs_)
    for s in passes:  # the runs advance together: every live run is at the followed run's iteration
        left = 50 - s["iteration"] if s["n_running"] else 0
        assert s["eta_seconds"] == pytest.approx(left * s["seconds_per_pass"], rel=1e-9)
    assert seen[-1]["loglik"] == pytest.approx(gm.lower_bound_, abs=1e-12) and seen[-1]["n_runs"] == 2
    # outside the block: nobody is called
    daskem.GaussianMixture(3, random_state=1, max_iter=3).fit(iris)
    assert seen[-1]["finished"] and len(seen) == len(passes) + 1


def test_passes_to_tol_is_given_only_at_a_steady_rate():
    run = Run(params=None, tag={"k": 2, "init": 0})
    run.history = [-10 + (1 - 0.5**t) for t in range(8)]  # changes 0.5, 0.25, ...: ratio 0.5
    d = run.history[-1] - run.history[-2]
    tol = d * 0.5**5 * 1.01  # five more halvings bring the change below tol
    assert passes_to_tol(run, tol) == 5
    run.history[-2] -= 0.003  # an irregular step: no honest estimate
    assert passes_to_tol(run, tol) is None
    run.history = [-3.0, -2.0, -1.5, -1.6, -1.55, -1.52]  # a decrease
    assert passes_to_tol(run, 1e-3) is None
    fast = AcceleratedRun(params=None, tag={"k": 2, "init": 0})
    fast.history = [-10 + (1 - 0.5**t) for t in range(8)]
    assert passes_to_tol(fast, tol) is None  # its passes are not EM steps


def test_progress_follows_its_run_while_it_runs():
    """Unit check of the choice: the leader is kept even when another run overtakes it."""
    a, b = Run(None, tag={"k": 2, "init": 0}), Run(None, tag={"k": 3, "init": 0})
    a.history, b.history = [-5.0], [-6.0]
    a.n_iter = b.n_iter = 1
    p = Progress(max_iter=10, tol=1e-3)
    p(_fitloop.IterationInfo(1, [a, b], 0.1, 2, [a, b], n_passes=3))
    assert p.snapshot["run"] == "k=2 init=0"
    a.history.append(-4.9)
    b.history.append(-4.0)  # b now leads: a is still followed
    a.n_iter = b.n_iter = 2
    p(_fitloop.IterationInfo(2, [a, b], 0.1, 2, [a, b], n_passes=4))
    assert p.snapshot["run"] == "k=2 init=0" and p.snapshot["loglik"] == -4.9
    assert p.snapshot["eta_seconds"] == pytest.approx(8 * p.snapshot["seconds_per_pass"])
    a.done = a.converged = True
    b.history.append(-3.9)
    b.n_iter = 3
    p(_fitloop.IterationInfo(3, [a, b], 0.1, 1, [b], n_passes=5))
    assert p.snapshot["run"] == "k=3 init=0" and p.snapshot["n_running"] == 1 and p.snapshot["iteration"] == 3


@pytest.mark.parametrize(
    "seconds, text",
    [(0.0027, "2.7 ms"), (0.41, "0.41 s"), (3.21, "3.2 s"), (36.4, "36 s"), (252, "4 min 12 s"), (7500, "2 h 05 min")],
)
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text
    assert format_seconds(math.inf) == "?"
