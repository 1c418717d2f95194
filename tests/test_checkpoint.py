"""Checkpoints: a fit killed with SIGKILL resumes to the uninterrupted result; a foreign checkpoint is refused."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _cluster import repo_env, write_blob_store

import daskem

FIT_OPTIONS = dict(
    n_components=4,
    covariance_type="full",
    tol=0.0,
    max_iter=30,
    n_init=2,
    init_params="k-means++",
    random_state=7,
    cache=False,
    chunk_bytes=200_000,
)

# a fit in its own process: streamed from Zarr, checkpointed, verbose; saves the model
SCRIPT = """
import json, sys
import daskem
store, ckpt, out, opts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
gm = daskem.GaussianMixture(checkpoint=ckpt, verbose=1, **opts).fit(store)
gm.save(out)
"""


def _checkpoint_iter(ckpt: Path) -> int:
    try:
        doc = json.loads((ckpt / "checkpoint.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return -1
    return max(r["n_iter"] for r in doc["runs"])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    # 120k x 6 rows in 5k-row chunks: each pass reads 24 chunks from disk
    return write_blob_store(tmp_path_factory.mktemp("ckpt") / "x.zarr", 120_000, 6, 4, chunk_rows=5_000, seed=3)


@pytest.mark.filterwarnings("ignore::daskem.ConvergenceWarning")
def test_sigkill_then_resume_gives_the_uninterrupted_result(store, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "model"
    cmd = [sys.executable, "-c", SCRIPT, store, str(ckpt), str(out), json.dumps(FIT_OPTIONS)]
    log1 = open(tmp_path / "first.log", "wb")
    first = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, env=repo_env())
    try:
        deadline = time.monotonic() + 120
        while _checkpoint_iter(ckpt) < 3:
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "the fit did not reach iteration 3"
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(timeout=30) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
        log1.close()
    killed_at = _checkpoint_iter(ckpt)
    assert 3 <= killed_at < FIT_OPTIONS["max_iter"]
    assert not out.exists()

    second = subprocess.run(cmd, capture_output=True, text=True, env=repo_env(), timeout=300)
    assert second.returncode == 0, second.stderr
    m = re.search(r"resuming from checkpoint .* at iteration (\d+)", second.stderr)
    assert m, second.stderr
    resumed_at = int(m.group(1))
    assert resumed_at >= killed_at
    # the second process ran only the iterations that were left, and no initialisation
    second_iters = len(re.findall(r"^iteration +\d+/\d+  run ", second.stderr, re.M))
    assert second_iters == FIT_OPTIONS["max_iter"] - resumed_at
    assert "initialised" not in second.stderr

    resumed = daskem.load(out)
    ref = daskem.GaussianMixture(**FIT_OPTIONS).fit(store)
    assert resumed.n_iter_ == ref.n_iter_ == FIT_OPTIONS["max_iter"]
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_allclose(getattr(resumed, name), getattr(ref, name), rtol=1e-10, atol=0, err_msg=name)
    np.testing.assert_allclose(resumed.history_, ref.history_, rtol=1e-12)
    assert resumed.lower_bound_ == pytest.approx(ref.lower_bound_, rel=1e-12)
    # one state file left beside the JSON: nothing half-written accumulates
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "checkpoint.json",
        json.loads((ckpt / "checkpoint.json").read_text())["arrays"],
    ]


def test_checkpoint_of_other_data_or_options_is_refused(tmp_path):
    a = write_blob_store(tmp_path / "a.zarr", 4_000, 3, 2, chunk_rows=1_000, seed=1)
    b = write_blob_store(tmp_path / "b.zarr", 4_000, 3, 2, chunk_rows=1_000, seed=2)
    ckpt = tmp_path / "ckpt"
    opts = dict(n_components=2, max_iter=3, random_state=0, checkpoint=ckpt)
    daskem.GaussianMixture(**opts).fit(a)
    saved = (ckpt / "checkpoint.json").read_text()

    with pytest.raises(daskem.InputError, match=r"other data or options \(differs in: sample_sha256\)"):
        daskem.GaussianMixture(**opts).fit(b)
    with pytest.raises(daskem.InputError, match=r"differs in: specs"):
        daskem.GaussianMixture(**{**opts, "n_components": 3}).fit(a)
    with pytest.raises(daskem.InputError, match=r"differs in: specs"):
        daskem.GaussianMixture(**{**opts, "covariance_type": "diag"}).fit(a)
    with pytest.raises(daskem.InputError, match=r"differs in: seed"):
        daskem.GaussianMixture(**{**opts, "random_state": 1}).fit(a)
    with pytest.raises(daskem.InputError, match=r"differs in: .*shape"):
        daskem.GaussianMixture(**opts).fit(np.arange(30.0).reshape(10, 3) % 7)
    # a refusal leaves the checkpoint as it was
    assert (ckpt / "checkpoint.json").read_text() == saved
    # the same arguments again resume the finished fit: nothing to run, same result
    again = daskem.GaussianMixture(**opts).fit(a)
    ref = daskem.GaussianMixture(**{**opts, "checkpoint": None}).fit(a)
    np.testing.assert_allclose(again.means_, ref.means_, rtol=1e-10)
