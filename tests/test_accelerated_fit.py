"""Accelerated EM (``accelerate='squarem'``) through the real estimator: the fit loop's AcceleratedRun.

What the state machine does on its own is in ``tests/test_squarem.py``; here it is driven by
``GaussianMixture.fit`` and ``select_k`` over numpy input, dask arrays (counted chunk reads, a
failing chunk to interrupt a checkpointed fit) and a LocalCluster.
"""

from __future__ import annotations

import json
import math
import threading
import warnings
from collections import Counter

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import make_blobs, sklearn_init
from sklearn.datasets import load_digits
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import daskem
from daskem._gaussian import GaussianParams

# real processes (the CLI, clusters) or long fits: not in the quick subset
pytestmark = pytest.mark.slow

TYPES = ("full", "tied", "diag", "spherical")


# --------------------------------------------------------------------------
# data and starts
# --------------------------------------------------------------------------


def adversarial(seed: int = 0) -> np.ndarray:
    """Two overlapping blobs, a near-singular (flat, tilted) component and a tiny one, in 3-D."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(1500, 3))
    b = rng.normal(size=(1200, 3)) * [1.5, 0.7, 1.0] + [1.0, 0.5, 0.0]
    flat = rng.normal(size=(600, 3)) * [3.0, 1e-3, 1e-3] + [6.0, -4.0, 2.0]
    flat[:, 1] += 0.3 * flat[:, 0]
    tiny = rng.normal(size=(12, 3)) * 0.2 + [-6.0, 6.0, -3.0]
    X = np.concatenate([a, b, flat, tiny])
    return X[rng.permutation(len(X))]


def overlapping_2d(n: int = 4000, seed: int = 1, noise: float = 0.8) -> np.ndarray:
    """Three overlapping 2-D Gaussians: EM converges slowly (``noise=0.8``: very slowly)."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(3, size=n)
    centres = np.array([[0.0, 0.0], [1.2, 0.4], [0.3, 1.3]])
    return centres[lab] + rng.normal(size=(n, 2)) * noise


def start(X: np.ndarray, k: int, ctype: str, seed: int, reg: float = 1e-6) -> dict:
    """Explicit initial parameters (nearest of k random rows, then those labels' Gaussians), as estimator options.

    Independent of daskem's initialisation, so that the trajectories compared here stay what they are.
    """
    rng = np.random.default_rng(seed)
    X = np.nan_to_num(X, nan=0.0)
    d = X.shape[1]
    for _ in range(100):
        seeds = X[rng.choice(len(X), size=k, replace=False)]
        lab = np.argmin(((X[:, None, :] - seeds[None]) ** 2).sum(-1), axis=1)
        nk = np.bincount(lab, minlength=k).astype(np.float64)
        if nk.min() >= d + 1:
            break
    means = np.stack([X[lab == j].mean(axis=0) for j in range(k)])
    covs = np.stack([np.cov(X[lab == j].T, bias=True).reshape(d, d) + reg * np.eye(d) for j in range(k)])
    cov = {
        "full": covs,
        "tied": np.einsum("k,kij->ij", nk, covs) / nk.sum(),
        "diag": np.diagonal(covs, axis1=1, axis2=2).copy(),
        "spherical": np.diagonal(covs, axis1=1, axis2=2).mean(axis=1),
    }[ctype]
    p = GaussianParams.from_covariances(nk / nk.sum(), means, cov, ctype)
    return {"weights_init": p.weights, "means_init": p.means, "precisions_init": p.precisions}


def sorted_params(gm: daskem.GaussianMixture) -> dict[str, np.ndarray]:
    order = np.lexsort(gm.means_.T[::-1])
    out = {"weights": gm.weights_[order], "means": gm.means_[order]}
    out["covariances"] = gm.covariances_ if gm.covariance_type == "tied" else gm.covariances_[order]
    return out


def fit(X, **opts) -> daskem.GaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", daskem.ConvergenceWarning)
        return daskem.GaussianMixture(**opts).fit(X)


def assert_monotone(history, what="") -> None:
    h = np.asarray(history, dtype=np.float64)
    # round-off of a mean log-likelihood over a few thousand rows: its last bits
    assert np.diff(h).min(initial=0.0) >= -1e-11 * max(1.0, np.abs(h).max()), (what, np.diff(h).min())


# --------------------------------------------------------------------------
# (a) monotone accepted log-likelihood on adversarial data
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ctype", TYPES)
def test_accepted_loglik_never_decreases_on_adversarial_data(ctype):
    X = adversarial()
    n_extrapolated = n_rejected = 0
    for seed in range(3):
        opts = dict(n_components=4, covariance_type=ctype, tol=1e-8, max_iter=500, **start(X, 4, ctype, seed))
        plain = fit(X, accelerate=None, **opts)
        acc = fit(X, accelerate="squarem", **opts)
        (run,) = acc.runs_
        assert run["accelerate"] == "squarem" and acc.converged_
        assert_monotone(acc.lower_bounds_, (ctype, seed))
        assert acc.lower_bound_ == acc.lower_bounds_[-1]
        assert acc.lower_bound_ >= max(acc.lower_bounds_) - 1e-11 * abs(acc.lower_bound_)
        assert len(acc.lower_bounds_) <= acc.n_iter_
        # never ends below plain EM from the same start at the same tol (up to round-off)
        assert acc.lower_bound_ >= plain.lower_bound_ - 1e-9, (seed, acc.lower_bound_, plain.lower_bound_)
        n_extrapolated += run["n_extrapolations"]
        n_rejected += run["n_rejected"]
    assert n_extrapolated > 0
    if ctype in ("full", "diag"):
        # the safeguard was exercised (else this says nothing about it); with one covariance for all
        # or one variance per component no extrapolation of these starts overshoots
        assert n_rejected > 0


@pytest.mark.filterwarnings("ignore:.*Port.*:UserWarning")
def test_accelerated_fit_of_a_dask_array_on_a_local_cluster_equals_the_numpy_fit():
    from distributed import Client, LocalCluster

    X = adversarial(1)
    opts = dict(n_components=4, covariance_type="full", tol=1e-8, max_iter=300, accelerate="squarem")
    opts.update(start(X, 4, "full", 0))
    local = fit(X, **opts)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        dist = fit(da.from_array(X, chunks=(700, 3)), cache=False, **opts)
    assert_monotone(dist.lower_bounds_)
    assert dist.runs_[0]["n_extrapolations"] > 0 and dist.converged_
    # other chunks sum in another order: the round-off differs, and with it, after a while, some
    # accept/reject decision; the trajectories agree at first and end at the same optimum
    np.testing.assert_allclose(dist.lower_bounds_[:10], local.lower_bounds_[:10], rtol=1e-10)
    # (near the flat component, nearby optima 3e-7 apart: one path ends above plain EM's limit, the
    # other a little below it)
    assert dist.lower_bound_ == pytest.approx(local.lower_bound_, abs=1e-6)
    # (a flat optimum: two overlapping blobs; 1e-7 in L leaves ~3e-3 in their means)
    np.testing.assert_allclose(sorted_params(dist)["means"], sorted_params(local)["means"], atol=1e-2)


# --------------------------------------------------------------------------
# (b) accelerate=None is scikit-learn's trajectory
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ctype", ["full", "diag"])
def test_accelerate_none_is_sklearn_step_by_step(ctype):
    X = make_blobs(n=3000, d=3, k=3, seed=4)
    opts = dict(covariance_type=ctype, tol=1e-8, max_iter=200, **sklearn_init(X, 3, ctype))
    ref = SkGaussianMixture(3, **opts).fit(X)
    ours = daskem.GaussianMixture(3, accelerate=None, **opts).fit(X)
    assert ref.n_iter_ > 3
    assert ours.n_iter_ == ref.n_iter_ and ours.converged_ == ref.converged_
    np.testing.assert_allclose(ours.lower_bounds_, ref.lower_bounds_, rtol=1e-9)
    np.testing.assert_allclose(ours.means_, ref.means_, rtol=1e-7, atol=1e-9)
    assert "accelerate" not in ours.runs_[0]
    # hard EM stays plain whatever accelerate says: the same fit with both settings
    hard = [fit(X, n_components=3, algorithm="hard", accelerate=a, **opts) for a in (None, "squarem")]
    assert hard[0].lower_bounds_ == hard[1].lower_bounds_ and "accelerate" not in hard[1].runs_[0]


def test_a_bad_accelerate_is_refused():
    for bad in ("SQUAREM", "yes", 1, ["squarem"]):
        with pytest.raises(daskem.InputError, match="accelerate must be None or 'squarem'"):
            daskem.GaussianMixture(2, accelerate=bad).fit(make_blobs(n=100, d=2, k=2))


# --------------------------------------------------------------------------
# (c) same optimum as plain EM
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ctype", TYPES)
def test_accelerated_fit_ends_at_plain_em_optimum(ctype):
    # reg_covar moves EM's fixed point off the likelihood's maximum; a negligible one keeps them equal
    X = overlapping_2d(2000, noise=0.4)
    opts = dict(n_components=3, covariance_type=ctype, reg_covar=1e-12, max_iter=5000, **start(X, 3, ctype, 0))
    plain = fit(X, accelerate=None, tol=1e-15, **opts)
    # tol is on the log-likelihood, whose gap is quadratic in the parameters' error: tol=1e-10
    # leaves the weights ~3e-6 from the optimum (an L gap of 1e-11), tol=1e-12 within 4e-7
    acc = fit(X, accelerate="squarem", tol=1e-12, **opts)
    assert plain.converged_ and acc.converged_
    assert plain.n_iter_ > 50  # slow enough that the comparison means something
    assert acc.n_iter_ < plain.n_iter_
    a, b = sorted_params(plain), sorted_params(acc)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6, err_msg=key)
    assert acc.lower_bound_ == pytest.approx(plain.lower_bound_, abs=1e-10)


# --------------------------------------------------------------------------
# (d) checkpoint: interrupted mid-acceleration, resumed = uninterrupted
# --------------------------------------------------------------------------


class Interrupted(RuntimeError):
    pass


class FailingBlocks:
    """Counts block reads; raises once ``fail_after`` reads were made (a worker lost mid-pass)."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_after: int | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise Interrupted(f"interrupted at read {self.calls}")
        return x


def test_interrupted_checkpointed_fit_resumes_to_the_uninterrupted_one(tmp_path):
    X = overlapping_2d(3000, noise=0.6)
    chunk, reader = 500, FailingBlocks()
    n_chunks = len(X) // chunk
    Xd = da.from_array(X, chunks=(chunk, 2)).map_blocks(reader, dtype=X.dtype)
    opts = dict(n_components=3, covariance_type="full", tol=1e-9, max_iter=400, accelerate="squarem", cache=False)
    opts.update(start(X, 3, "full", 1))
    with dask.config.set(scheduler="synchronous"):
        ref = fit(Xd, **opts)
        assert ref.runs_[0]["n_extrapolations"] >= 3
        # reads outside the passes (the checkpoint's data fingerprint), from a complete checkpointed fit
        reader.calls = 0
        fit(Xd, checkpoint=tmp_path / "full", **opts)
        n_other = reader.calls - ref.n_passes_ * n_chunks
        init_passes = ref.n_passes_ - ref.n_iter_
        stages = Counter()
        for em_pass in range(2, 13):
            ckpt = tmp_path / f"ckpt{em_pass}"
            # die half-way through the pass after `em_pass` EM passes
            reader.calls, reader.fail_after = 0, n_other + (init_passes + em_pass) * n_chunks + n_chunks // 2
            with pytest.raises(Interrupted):
                fit(Xd, checkpoint=ckpt, **opts)
            reader.fail_after = None
            saved = json.loads((ckpt / "checkpoint.json").read_text())
            (run,) = saved["runs"]
            assert saved["run_class"] == "AcceleratedRun" and run["n_iter"] == em_pass
            stages[run["strategy"]["meta"]["stage"]] += 1
            resumed = fit(Xd, checkpoint=ckpt, **opts)
            assert resumed.lower_bounds_ == ref.lower_bounds_, em_pass
            assert resumed.n_iter_ == ref.n_iter_ and resumed.converged_ == ref.converged_
            assert resumed.runs_[0]["n_rejected"] == ref.runs_[0]["n_rejected"]
            for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
                np.testing.assert_array_equal(getattr(resumed, name), getattr(ref, name), err_msg=name)
            # the resumed fit made only the passes that were left
            assert resumed.n_passes_ == ref.n_iter_ - em_pass
    # interrupted at every stage of a cycle: before an EM pass, and before an extrapolated point's
    assert stages["A"] and stages["B"] and stages["C"], stages
    # a checkpoint of a plain fit is not resumed by an accelerated one
    with pytest.raises(daskem.InputError, match="differs in: specs"):
        fit(X, checkpoint=tmp_path / "full", **{**opts, "accelerate": None})


# --------------------------------------------------------------------------
# (e) restarts and candidate Ks share every pass: one read of each chunk per pass
# --------------------------------------------------------------------------


class CountingBlocks:
    """Counts the reads of each block (thread-safe)."""

    def __init__(self) -> None:
        self.reads: Counter = Counter()
        self.lock = threading.Lock()

    def __call__(self, x: np.ndarray, block_info=None) -> np.ndarray:
        with self.lock:
            self.reads[block_info[0]["chunk-location"][0]] += 1
        return x


def test_restarts_and_ks_share_every_accelerated_pass():
    X = overlapping_2d(6000, noise=0.6)
    reader = CountingBlocks()
    Xd = da.from_array(X, chunks=(750, 2)).map_blocks(reader, dtype=X.dtype)
    opts = dict(n_init=3, tol=1e-6, max_iter=300, cache=False, random_state=0, covariance_type="diag")
    with dask.config.set(scheduler="threads"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", daskem.ConvergenceWarning)
            res0 = daskem.select_k(Xd, [2, 3, 4], **{**opts, "max_iter": 0})
            init_passes = res0.n_passes - 1  # the scoring pass
            reader.reads.clear()
            res = daskem.select_k(Xd, [2, 3, 4], accelerate="squarem", **opts)
    runs = [r for gm in res.models.values() for r in gm.runs_]
    assert len(runs) == 9 and all(r["accelerate"] == "squarem" for r in runs)
    assert sum(r["n_extrapolations"] for r in runs) > 0
    # every chunk was read once per pass, and no more
    assert sorted(reader.reads) == list(range(8))
    assert set(reader.reads.values()) == {res.n_passes}
    # the passes: initialisation, EM as long as the longest of the nine runs, one scoring pass
    longest = max(r["n_iter"] for r in runs)
    assert res.n_passes == init_passes + longest + 1
    # the nine runs' own passes (151: eight end after their first pass, from starts converged on the
    # sample, where EM's rate there and the surrogate's gain bound what is left; one takes 143) were made
    # in the longest run's passes: every run advanced in shared passes
    assert sum(r["n_iter"] for r in runs) >= longest + 8
    assert all(gm.n_passes_ == res.n_passes for gm in res.models.values())


# --------------------------------------------------------------------------
# (e') a restart far below another of its K stops: fewer passes, the same model
# --------------------------------------------------------------------------


def unequal_restarts(seed: int = 4, n_init: int = 3) -> tuple[np.ndarray, dict]:
    """The demo's kind of data (5 overlapping components in 4-D) where k-means++ restarts find different optima.

    With seed 4 and 3 restarts the first finds the best optimum in 13 passes; the other two land
    0.12 per row below it and creep for 19 and 22 passes: they stop when the first has converged.
    With seed 1 and 4 restarts the last lands 0.32 below and stops after 7 passes, when the third
    has converged, and the first goes on to 16.
    """
    from daskem.datasets import make_truth, sample_chunk

    truth = make_truth(4, 5, seed=seed, separation=3.0)
    X, _ = sample_chunk(truth, 30_000, np.random.default_rng(seed))
    return X, dict(n_components=5, n_init=n_init, init_params="k-means++", random_state=seed, max_iter=300)


def test_a_restart_far_below_another_stops_and_the_chosen_model_is_the_same(monkeypatch):
    X, opts = unequal_restarts()
    gm = fit(X, **opts)
    with monkeypatch.context() as m:
        m.setattr(daskem._fitloop, "DOMINANCE", math.inf)
        full = fit(X, **opts)
    assert not any(r["dominated"] for r in full.runs_)
    stopped = [r for r in gm.runs_ if r["dominated"]]
    assert len(stopped) == 2 and not any(r["converged"] for r in stopped)
    best = max(r["lower_bound"] for r in full.runs_)
    for r, r_full in zip(gm.runs_, full.runs_):
        if r["dominated"]:
            # stopped sooner, far below the kept run, and (run to its end) it stayed far below
            assert r["n_iter"] < r_full["n_iter"]
            assert best - r_full["lower_bound"] > 0.1
        else:
            assert r == r_full
    # the passes the creeping restarts no longer set; the kept run and its model are the same, bit for bit
    assert gm.n_passes_ < full.n_passes_ - 5
    assert gm.converged_ and gm.lower_bound_ == full.lower_bound_ and gm.lower_bound_ == best
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_array_equal(getattr(gm, name), getattr(full, name), err_msg=name)
    # plain EM: every restart runs to its own end, as scikit-learn's do
    plain = fit(X, **opts, accelerate=None)
    assert not any(r["dominated"] for r in plain.runs_)
    assert all(r["converged"] for r in plain.runs_)


def test_a_checkpoint_keeps_the_stopped_restarts_stopped(tmp_path):
    X, opts = unequal_restarts(seed=1, n_init=4)
    chunk, reader = 5000, FailingBlocks()
    n_chunks = len(X) // chunk
    Xd = da.from_array(X, chunks=(chunk, 4)).map_blocks(reader, dtype=X.dtype)
    opts = {**opts, "cache": False}
    with dask.config.set(scheduler="synchronous"):
        ref = fit(Xd, **opts)
        stopped_at = max(r["n_iter"] for r in ref.runs_ if r["dominated"])
        longest = max(r["n_iter"] for r in ref.runs_)
        assert stopped_at + 2 < longest
        reader.calls = 0
        fit(Xd, checkpoint=tmp_path / "full", **opts)
        n_other = reader.calls - ref.n_passes_ * n_chunks
        init_passes = ref.n_passes_ - longest
        # die in the pass after the restarts below stopped
        ckpt = tmp_path / "ckpt"
        reader.calls, reader.fail_after = 0, n_other + (init_passes + stopped_at + 1) * n_chunks + n_chunks // 2
        with pytest.raises(Interrupted):
            fit(Xd, checkpoint=ckpt, **opts)
        reader.fail_after = None
        saved = json.loads((ckpt / "checkpoint.json").read_text())
        assert [r["dominated"] for r in saved["runs"]] == [r["dominated"] for r in ref.runs_]
        resumed = fit(Xd, checkpoint=ckpt, **opts)
    assert resumed.runs_ == ref.runs_
    assert resumed.n_passes_ == longest - stopped_at - 1
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(ref, name), err_msg=name)


# --------------------------------------------------------------------------
# (f) missing values and float32
# --------------------------------------------------------------------------


def test_accelerated_fit_with_missing_values_ends_at_plain_em_optimum():
    rng = np.random.default_rng(5)
    X = overlapping_2d(3000, noise=0.5, seed=2)
    X = np.column_stack([X, X[:, 0] - X[:, 1] + rng.normal(scale=0.3, size=len(X))])
    X[rng.random(X.shape) < 0.1] = np.nan
    opts = dict(n_components=3, covariance_type="full", missing="marginalize", max_iter=3000, random_state=0)
    plain = fit(X, accelerate=None, tol=1e-12, **opts)
    acc = fit(X, accelerate="squarem", tol=1e-10, **opts)
    assert plain.converged_ and acc.converged_ and acc.runs_[0]["n_extrapolations"] > 0
    assert_monotone(acc.lower_bounds_)
    assert acc.lower_bound_ == pytest.approx(plain.lower_bound_, abs=1e-8)
    a, b = sorted_params(plain), sorted_params(acc)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-4, err_msg=key)
    assert acc.n_iter_ < plain.n_iter_


@pytest.mark.parametrize("ctype", ["full", "diag"])
def test_accelerated_fit_in_float32_ends_close_to_plain_em_optimum(ctype):
    X = overlapping_2d(4000, noise=0.5, seed=3)
    opts = dict(n_components=3, covariance_type=ctype, max_iter=2000, dtype="float32", **start(X, 3, ctype, 2))
    ref = fit(X, accelerate=None, tol=1e-12, **{**opts, "dtype": "float64"})
    plain = fit(X, accelerate=None, tol=1e-7, **opts)
    acc = fit(X, accelerate="squarem", tol=1e-7, **opts)
    assert acc.runs_[0]["n_extrapolations"] > 0 and acc.n_iter_ < acc.max_iter
    # float32 kernels: the log-likelihood carries ~1e-7 relative noise, on which plain EM's rule stops a
    # little early; the accelerated fit ends closer to the float64 optimum than plain EM does
    assert plain.lower_bound_ == pytest.approx(ref.lower_bound_, abs=1e-5)
    assert acc.lower_bound_ == pytest.approx(ref.lower_bound_, abs=1e-6)
    assert acc.lower_bound_ >= plain.lower_bound_ - 1e-7
    np.testing.assert_allclose(sorted_params(acc)["means"], sorted_params(ref)["means"], atol=5e-3)
    assert acc.n_passes_ < plain.n_passes_


# --------------------------------------------------------------------------
# (g) fewer passes on a slowly converging case; passes in the progress lines
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ctype", ["full", "diag"])
def test_accelerated_fit_needs_fewer_passes_to_the_same_tight_tolerance(ctype, capsys):
    X = overlapping_2d()
    opts = dict(n_components=3, covariance_type=ctype, tol=1e-9, max_iter=5000, **start(X, 3, ctype, 2))
    plain = fit(X, accelerate=None, **opts)
    acc = fit(X, accelerate="squarem", verbose=1, verbose_interval=1000, **opts)
    assert plain.converged_ and acc.converged_
    assert plain.n_iter_ >= 100  # slowly converging, or the comparison says nothing
    assert acc.n_passes_ <= 0.5 * plain.n_passes_, (acc.n_passes_, plain.n_passes_)
    assert acc.lower_bound_ >= plain.lower_bound_ - 1e-9
    # the progress lines count the passes over the data (initialisation included)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("iter")]
    assert lines and lines[0].split("passes")[1].split()[0] == str(acc.n_passes_ - acc.n_iter_ + 1)


# --------------------------------------------------------------------------
# (h) the default: accelerated, scale-invariant, every pass counted
# --------------------------------------------------------------------------


def test_the_default_fit_is_accelerated_and_n_passes_counts_every_read():
    assert daskem.GaussianMixture().accelerate == "squarem"
    X = overlapping_2d(6000, noise=0.6)
    reader = CountingBlocks()
    Xd = da.from_array(X, chunks=(750, 2)).map_blocks(reader, dtype=X.dtype)
    with dask.config.set(scheduler="synchronous"):
        gm = daskem.GaussianMixture(3, random_state=0, cache=False).fit(Xd)
    (run,) = gm.runs_
    assert run["accelerate"] == "squarem"
    # initialisation (a sample: the 6,000 rows are all in it, so the run starts where its candidate's EM,
    # continued until converged on them, ended: without a hard pass) + EM: every chunk read once per pass
    assert sorted(reader.reads) == list(range(8))
    assert set(reader.reads.values()) == {gm.n_passes_}
    assert gm.n_passes_ == 1 + gm.n_iter_
    # from a start that has not converged yet (k-means++ seeds and the hard pass) the run extrapolates
    reader.reads.clear()
    with dask.config.set(scheduler="synchronous"):
        pp = daskem.GaussianMixture(3, random_state=0, cache=False, init_params="k-means++").fit(Xd)
    assert pp.runs_[0]["n_extrapolations"] > 0
    assert set(reader.reads.values()) == {pp.n_passes_} and pp.n_passes_ == 2 + pp.n_iter_
    # hard EM stays plain whatever the default says, and starts from the hard pass (its candidates' EM was soft)
    hard = daskem.GaussianMixture(3, random_state=0, algorithm="hard").fit(X)
    assert "accelerate" not in hard.runs_[0]
    assert hard.n_passes_ == 2 + hard.n_iter_


@pytest.mark.parametrize("ctype", ["full", "diag"])
def test_the_accelerated_fit_does_not_depend_on_the_units_of_the_columns(ctype):
    """X and X diag(s) + b, s from 1e-3 to 1e3: the same accelerated path (step lengths measured in the
    model's unit-free metric), up to round-off that the extrapolations amplify a little. Seeded by
    k-means++ (standardised sample rows): the default start has already converged on these 3,000 rows."""
    rng = np.random.default_rng(0)
    X = np.column_stack([overlapping_2d(3000, noise=0.6), rng.normal(size=3000)])
    s = np.array([1e-3, 1.0, 1e3])
    Y = X * s + np.array([5.0, -300.0, 2e4])
    kw = dict(n_components=3, covariance_type=ctype, reg_covar=0.0, tol=1e-6, random_state=0)
    kw["init_params"] = "k-means++"
    a, b = fit(X, **kw), fit(Y, **kw)
    assert a.runs_[0]["n_extrapolations"] > 0
    assert b.n_iter_ == a.n_iter_ and b.runs_[0]["n_rejected"] == a.runs_[0]["n_rejected"]
    assert b.lower_bound_ + np.log(s).sum() == pytest.approx(a.lower_bound_, rel=1e-7)
    np.testing.assert_allclose(b.weights_, a.weights_, rtol=1e-5)
    np.testing.assert_allclose((b.means_ - [5.0, -300.0, 2e4]) / s, a.means_, rtol=0, atol=1e-5)


def test_two_estimators_of_the_same_k_fitted_together_do_not_stop_each_other():
    """``fit_models`` given the same K and structure twice: each estimator's restarts compete only among themselves."""
    X, opts = unequal_restarts(seed=10, n_init=2)
    fitted = daskem.GaussianMixture(**opts).fit(X)
    # the second restart lands 0.14 per row below the first and, as a restart of the same fit, stops
    assert [r["dominated"] for r in fitted.runs_] == [False, True]
    one = {**opts, "n_init": 1}
    a, b = daskem.GaussianMixture(**one), daskem.GaussianMixture(**one)
    with warnings.catch_warnings():
        warnings.simplefilter("error", daskem.ConvergenceWarning)
        daskem.GaussianMixture.fit_models(X, [a, b])
    for est in (a, b):
        (run,) = est.runs_
        assert run["converged"] and not run["dominated"]


@pytest.mark.parametrize("ctype", ["full", "diag"])
def test_data_no_larger_than_the_sample_is_fitted_in_three_or_four_passes(ctype):
    """scikit-learn's digits (1,797 rows, all in the initialisation's sample): the start is EM's
    optimum on every row already, so the fit only confirms it (the sample, two or three passes).
    An EM step that goes down there by ``reg_covar``'s bias, before any extrapolation, stops the run
    as plain EM's rule would; it had restarted SQUAREM's cycle and taken 5-7 passes (issue 12)."""
    X = load_digits().data.astype(np.float64)
    passes = []
    for seed in range(5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = daskem.GaussianMixture(10, covariance_type=ctype, random_state=seed).fit(X)
        assert gm.converged_
        passes.append(gm.n_passes_)
    assert max(passes) <= 4 and passes.count(3) >= 3, passes


def separated(n: int = 40_000, seed: int = 3) -> np.ndarray:
    """Six well-separated 5-D Gaussians, more rows than the initialisation's sample (20,000)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(6, 5))
    return centres[rng.integers(6, size=n)] + rng.standard_normal((n, 5))


@pytest.mark.parametrize("ctype", ["full", "diag"])
def test_em_rate_measured_on_the_sample_ends_a_fast_fit_after_its_first_pass(ctype):
    """Well-separated components: EM's rate on the sample is about 0 (``prior_rate``), so what is left after
    the first EM step, bounded by the surrogate's gain times ``c^2 / (1 - c)``, is 0 and the fit ends there:
    the sample, then one EM pass (it took two, and before the sample's rate three). The model is plain EM's
    optimum from the same start, and the lower bound (EM's, at the result) is its log-likelihood and no
    more; counted chunk reads."""
    X = separated()
    reader = CountingBlocks()
    Xd = da.from_array(X, chunks=(5000, 5)).map_blocks(reader, dtype=X.dtype)
    with dask.config.set(scheduler="synchronous"):
        gm = fit(Xd, n_components=6, covariance_type=ctype, random_state=0, cache=False)
    (run,) = gm.runs_
    assert gm.converged_ and run["prior_rate"] is not None and run["prior_rate"] < 0.05
    assert gm.n_passes_ == 2 and gm.n_iter_ == 1
    assert set(reader.reads.values()) == {2}
    # the history keeps the measured log-likelihood (at the start); the result's bound is above it
    assert len(gm.lower_bounds_) == 1 and gm.lower_bound_ > gm.lower_bounds_[0] + 1e-4
    plain = fit(X, n_components=6, covariance_type=ctype, random_state=0, accelerate=None, tol=1e-10)
    assert gm.lower_bound_ == pytest.approx(plain.lower_bound_, abs=1e-9)
    assert gm.score(X) == pytest.approx(plain.score(X), abs=1e-9)
    assert gm.lower_bound_ <= gm.score(X) + 1e-12
    # on overlapping components the rate is large and the rule waits for more cycles, as before
    slow = fit(overlapping_2d(30_000, noise=0.6), n_components=3, covariance_type=ctype, random_state=0)
    assert slow.runs_[0]["prior_rate"] > 0.3 and slow.n_iter_ > 2


def test_the_rate_probe_stays_within_its_work_budget():
    """:func:`_fitloop.probe_rates` measures every accelerated run on at most 10,000 sample rows and spends at
    most ``PROBE_WORK`` on all of them: one K=60 model in 48 dimensions (full: 141,180 statistics values a
    row) fits on the 3,000 sample rows; two would need fewer than 2,000 rows and get no prior (the rule
    without it). A sample that holds every row gets no probe either (EM on it is the fit's own)."""
    from daskem import _engine, _fitloop
    from daskem._gaussian_model import GaussianModel

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=10.0, size=(60, 48))
    X = centres[np.arange(6000) % 60] + rng.standard_normal((6000, 48))
    model = GaussianModel()

    def passes_over(rows: int, sample_rows: int) -> _fitloop.Passes:
        Xw, _ = _engine.prepare_data(
            da.from_array(X[:rows], chunks=(1000, 48)), "auto", in_memory=True, dtype="float64"
        )
        return _fitloop.Passes(Xw, model, seed=0, sample_rows=sample_rows)

    passes = passes_over(6000, 3000)

    def run(i: int) -> _fitloop.AcceleratedRun:
        means = centres + 0.1 * i
        return _fitloop.AcceleratedRun(
            GaussianParams.from_covariances(np.full(60, 1 / 60), means, np.stack([np.eye(48)] * 60), "full"),
            tag={"init": i},
        )

    one = [run(0)]
    _fitloop.probe_rates(passes, model, one)  # no sample drawn yet: no probe, and no pass spent on one
    assert one[0].prior_rate is None and passes.n_passes == 0
    passes.sample()
    _fitloop.probe_rates(passes, model, one)
    # (about 1.15 here: 50 rows a component in 48 dimensions move the covariances far from this start; a
    # rate of 1 or more bounds nothing, and the rule goes on as without it)
    assert one[0].prior_rate is not None and one[0].prior_rate >= 0.0
    two = [run(0), run(1)]
    _fitloop.probe_rates(passes, model, two)
    assert [r.prior_rate for r in two] == [None, None] and passes.n_passes == 1
    whole = passes_over(3000, 3000)
    whole.sample()
    one = [run(0)]
    _fitloop.probe_rates(whole, model, one)
    assert one[0].prior_rate is None
