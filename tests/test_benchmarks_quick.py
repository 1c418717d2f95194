"""``benchmarks/run.py --quick`` runs end to end and writes every section (no timing checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
        timeout=240,
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
