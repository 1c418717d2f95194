"""``benchmarks/run.py --quick`` runs end to end and writes every section (no timing checks)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# real processes (the CLI, clusters) or long fits: not in the quick subset
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_quick_writes_all_sections(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {"meta", "limits", "cases", "ratios"} <= set(res)
    assert res["meta"]["quick"] is True
    assert res["limits"]["blas_gflops"] and all(v > 0 for v in res["limits"]["blas_gflops"].values())
    assert res["limits"]["zarr_read"]["MB_per_s"] > 0
    assert {"a_full", "b_diag", "c_full_D64", "d_out_of_core"} <= set(res["cases"])
    a = res["cases"]["a_full"]
    for key in ("daskem", "sklearn", "daskem_float32", "daskem_n_init4", "daskem_one_worker"):
        assert a[key]["s_per_iter"] > 0, key
    assert len(a["threaded_scheduler"]) == 3  # Dask threads x BLAS threads variants
    assert set(a["daskem_peak_MiB"]) >= {"client", "worker0"}
    # same data, same init: daskem and scikit-learn reach the same log-likelihood
    sk = a["sklearn"]["loglik_by_m_steps"][a["daskem"]["loglik_m_steps"]]
    assert abs(a["daskem"]["loglik"] - sk) < 1e-6 * abs(sk)
    assert res["ratios"]["a_loglik_rel_diff_vs_sklearn"] < 1e-6
    o = res["cases"]["d_out_of_core"]
    for key in ("diag", "full", "diag_n_init4", "diag_quarter_N"):
        assert o[key]["s_per_iter"] > 0, key
    for key in (
        "a_full_daskem_over_sklearn",
        "a_full_GFLOPs_over_blas_limit",
        "a_float32_speedup_over_float64",
        "a_n_init4_over_n_init1",
        "a_two_workers_speedup",
        "d_diag_over_read_bound",
        "d_diag_n_init4_over_n_init1",
        "d_worker_peak_MiB_at_N_and_4N",
    ):
        assert key in res["ratios"], key
    assert "seconds per iteration" in proc.stdout
    # daskem in process beside the cluster, the peers in turn, the wide cases
    onedal = importlib.util.find_spec("daal4py") is not None
    assert ("not importable" in res["meta"]["onedal"]) != onedal
    for case in ("a_full", "b_diag", "c_full_D64", "e_diag_D256", "e_full_D256", "f_diag_K256"):
        row = res["cases"][case]
        assert row["daskem_in_process"]["s_per_iter"] > 0, case
        assert row["sklearn"]["s_per_iter"] > 0, case
        assert ("onedal" in row) == onedal, case
    assert res["cases"]["e_full_D256"]["D"] == res["cases"]["e_diag_D256"]["D"]
    assert res["limits"]["stream_read"]["GB_per_s"] > 0
    assert res["cases"]["b_diag"]["bandwidth_bound_in_turn"]["s"] > 0
    # in process and on the cluster: the same path from the same parameters
    b = res["cases"]["b_diag"]
    assert abs(b["daskem_in_process"]["loglik"] - b["daskem"]["loglik"]) < 1e-9 * abs(b["daskem"]["loglik"])
    # time to a model: every library's median time and log-likelihood, one scorer
    for name in ("a_full", "b_diag"):
        t = res["time_to_model"][name]
        assert t["daskem"]["median_s"] > 0 and np.isfinite(t["sklearn"]["median_loglik"])
        assert len(t["daskem"]["runs"]) == t["seeds"]
        assert ("onedal" in t) == onedal
    sw = res["chunk_sweep"]
    assert {r["variant"] for r in sw["rows"]} == {"persisted", "streamed", "one task per chunk"}
    assert all(r["tasks_per_pass"] <= 2 * 2 * 2 for r in sw["rows"] if r["variant"] != "one task per chunk")
    assert sw["paper_10TB_1000_workers"]["chunks"] == 100_000
    assert res["targets"] and all(isinstance(t["met"], bool) for t in res["targets"].values())
    assert "[6] targets" in proc.stdout


def test_benchmark_only_runs_the_sections_asked(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "limits,b", "--out", str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["meta"]["sections"] == ["limits", "b"]
    assert set(res["cases"]) == {"b_diag"}
    assert "time_to_model" not in res and "chunk_sweep" not in res
    bad = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "a,zz", "--out", str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "zz" in bad.stderr


def test_a_failing_peer_is_dropped_and_the_others_timed() -> None:
    """oneDAL stops on a covariance it cannot factor: the run records it and goes on."""
    spec = importlib.util.spec_from_file_location("daskem_bench_run", ROOT / "benchmarks" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    calls = []

    def fails() -> dict:
        calls.append(1)
        raise RuntimeError("Error during covariance computation for component on M step\nDetails: ...")

    out = run.interleaved({"ours": lambda: {"all_s": [0.5]}, "onedal": fails}, rounds=3)
    assert out["ours"]["s_per_iter"] == 0.5 and len(out["ours"]["all_s"]) == 3
    assert out["onedal"] == {"error": "RuntimeError: Error during covariance computation for component on M step"}
    assert len(calls) == 1  # not called again once it failed
    with pytest.raises(RuntimeError):
        run.interleaved({"ours": fails}, rounds=1)  # daskem's own variants are never dropped
    res: dict = {}
    with run.section(res, "sweep"):
        raise ValueError("boom")
    assert res["errors"] == {"sweep": "ValueError: boom"}
