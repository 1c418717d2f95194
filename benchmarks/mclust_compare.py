"""daskem's choice of covariance model and K next to R mclust's, and the time of both on 200,000 rows.

For each of the eight data sets of the mclust fixtures (``tests/fixtures/mclust``:
faithful, iris, diabetes, banknote, wdbc, thyroid, wreath, chevron) it puts
mclust's ``Mclust(X)`` choice (its defaults: the fourteen models, G = 1..9,
BIC) next to daskem's ``select_model(X, range(1, 10), "all", criterion="bic")``
(model, G and BIC in mclust's sign: higher is better) and says whether they
agree. Then it times both on a 200,000-row resample of banknote (rows drawn
with replacement, plus Gaussian noise of 0.02, a fifth of the data's 0.1
rounding step, so that no two rows are equal), written once to a CSV that
both read: R's time is ``system.time`` around ``Mclust`` only (measured inside
R; mclust starts from a hierarchical clustering of a random 2,000-row subset,
``mclust.options("subset")``), daskem's is ``time.perf_counter`` around
``select_model`` only (in process, the threaded scheduler, the data in
memory).

mclust's side comes from ``Rscript`` (R with mclust installed) when it is on
the PATH (``--mclust auto``, the default, or ``rscript``); otherwise, or with
``--mclust saved``, from ``benchmarks/results/mclust_choices.json``, written by
``--save-mclust`` (R only: the choices and the timing, merged into the file;
made with mclust 6.0.0). mclust takes long on two of the cases: wdbc (30
columns; its EVE and VVE fits took 26 and 27 CPU-minutes for G = 1..9) and
the 200,000 rows. wdbc's saved choice was made model by model
(``mclustBIC(X, G = 1:9, modelNames = m)`` for each of the fourteen, the
same hierarchical start as ``Mclust(X)``, which fits them all in one call;
the best BIC; the seconds summed): 53 CPU-minutes in all.

``--merge`` adds the data sets (or the timing) of this run to an earlier
``--out`` file, so that the long cases can be run on their own.

A benchmark, not a test: nothing is asserted. The timing of a busy machine
says little; the JSON records the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import daskem

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "mclust"
RESULTS = ROOT / "benchmarks" / "results"
SAVED = RESULTS / "mclust_choices.json"
DATASETS = ("faithful", "iris", "diabetes", "banknote", "wdbc", "thyroid", "wreath", "chevron")
K_VALUES = range(1, 10)
NOISE = 0.02

#: one JSON line per file: Mclust(X) with its defaults, timed inside R
R_SCRIPT = r"""
suppressMessages(library(mclust))
set.seed(0)
for (f in commandArgs(trailingOnly = TRUE)) {
  X <- as.matrix(read.csv(f))
  t <- system.time(m <- Mclust(X, verbose = FALSE))
  cat(sprintf('{"file":"%s","model":"%s","G":%d,"bic":%.17g,"loglik":%.17g,"seconds":%.3f,"cpu_seconds":%.3f,"mclust":"%s"}\n',
              f, m$modelName, m$G, m$bic, m$loglik, t[["elapsed"]], t[["user.self"]] + t[["sys.self"]],
              as.character(packageVersion("mclust"))))
}
"""


def data_file(name: str) -> Path:
    for suffix in (".csv", ".csv.gz"):
        p = FIXTURES / f"{name}{suffix}"
        if p.exists():
            return p
    raise FileNotFoundError(f"no fixture data for {name} in {FIXTURES}")


def load(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)


def run_mclust(files: list[Path], timeout: float = 3600) -> list[dict]:
    """``Mclust(X)`` on every file, through Rscript (one R process)."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "mclust_choose.R"
        script.write_text(R_SCRIPT)
        proc = subprocess.run(
            ["Rscript", str(script), *map(str, files)], capture_output=True, text=True, timeout=timeout, check=False
        )
    if proc.returncode:
        raise RuntimeError(f"Rscript failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def daskem_choice(X: np.ndarray) -> dict:
    """daskem's select_model(X, 1..9, all models, BIC), timed around select_model only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # range-edge, degenerate and failed-restart warnings: in the table
        t0, c0 = time.perf_counter(), time.process_time()
        res = daskem.select_model(X, K_VALUES, "all", criterion="bic", random_state=0)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    row = next(r for r in res.table if r["covariance_type"] == res.best_covariance_type and r["k"] == res.best_k)
    return {
        "model": res.best_covariance_type,
        "G": int(res.best_k),
        "bic": -float(row["bic"]),  # mclust's sign: higher is better
        "loglik": float(row["loglik"]),
        "seconds": seconds,
        "cpu_seconds": cpu,  # every thread of this process (the threaded scheduler's too)
        "n_passes": int(res.n_passes),
        "failed_pairs": sum(bool(r["failed"]) for r in res.table),
        "degenerate_pairs": sum(bool(r["degenerate"]) for r in res.table),
    }


def resample(n_rows: int, seed: int = 0) -> np.ndarray:
    """``n_rows`` rows of banknote drawn with replacement, plus N(0, NOISE²) noise."""
    X = load(data_file("banknote"))
    rng = np.random.default_rng(seed)
    return X[rng.integers(0, X.shape[0], n_rows)] + rng.normal(0.0, NOISE, (n_rows, X.shape[1]))


def save_mclust(files: dict[str, Path], saved: dict, rows: int | None) -> int:
    """Run mclust on ``files`` (and on the resample of ``rows`` rows) and merge the results into SAVED."""
    for name, r in zip(files, run_mclust(list(files.values()))):
        saved["choices"][name] = {k: v for k, v in r.items() if k != "file"}
        print(name, saved["choices"][name], flush=True)
    if rows:
        with tempfile.TemporaryDirectory() as tmp:
            csv = write_resample(Path(tmp), rows)
            r = run_mclust([csv])[0]
        saved["timing"] = {"mclust": {k: v for k, v in r.items() if k != "file"}, "rows": rows, "noise_sd": NOISE}
        print("timing", saved["timing"], flush=True)
    SAVED.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"wrote {SAVED}")
    return 0


def write_resample(folder: Path, rows: int) -> Path:
    """The banknote resample as the CSV both read."""
    csv = folder / "banknote_resample.csv"
    X = resample(rows)
    np.savetxt(csv, X, delimiter=",", fmt="%.10g", header=",".join(f"x{i}" for i in range(X.shape[1])), comments="")
    return csv


def cpu_text(t: dict) -> str:
    return f"{t['cpu_seconds']:8.1f} s" if t.get("cpu_seconds") is not None else "       ? s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mclust", choices=["auto", "rscript", "saved"], default="auto")
    ap.add_argument("--save-mclust", action="store_true", help=f"run mclust only and merge its results into {SAVED}")
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--rows", type=int, default=200_000, help="rows of the banknote resample (default: 200000)")
    ap.add_argument("--no-timing", action="store_true", help="skip the timing on the resample")
    ap.add_argument("--out", default=str(RESULTS / "mclust_compare.json"))
    ap.add_argument(
        "--merge",
        action="store_true",
        help="merge into the --out file: its rows of other data sets (and its timing, with --no-timing) are kept",
    )
    args = ap.parse_args(argv)

    use_r = args.mclust == "rscript" or (args.mclust == "auto" and shutil.which("Rscript"))
    if args.mclust == "rscript" and not shutil.which("Rscript"):
        ap.error("Rscript is not on the PATH")
    saved = json.loads(SAVED.read_text()) if SAVED.exists() else {"choices": {}, "timing": None}
    if not use_r and not saved["choices"]:
        ap.error(f"no Rscript and no saved mclust results ({SAVED})")
    source = "Rscript" if use_r else f"saved ({SAVED.name})"

    files = {name: data_file(name) for name in args.datasets}
    if args.save_mclust:
        if not shutil.which("Rscript"):
            ap.error("--save-mclust needs Rscript")
        return save_mclust(files, saved, None if args.no_timing else args.rows)
    if use_r:
        r_rows = run_mclust(list(files.values()))
        mclust = {name: r for name, r in zip(files, r_rows)}
    else:
        mclust = {name: saved["choices"][name] for name in files}

    rows = []
    print(f"mclust: {source}; daskem {daskem.__version__}")
    header = f"{'data':<9} {'n':>5} {'d':>3} | {'mclust':<10} {'BIC':>12} | {'daskem':<10} {'BIC':>12} | agree"
    print(header)
    print("-" * len(header))
    for name, path in files.items():
        X = load(path)
        m, dk = mclust[name], daskem_choice(X)
        agree = m["model"] == dk["model"] and int(m["G"]) == dk["G"]
        row = {"data": name, "n": int(X.shape[0]), "d": int(X.shape[1]), "mclust": m, "daskem": dk, "agree": agree}
        rows.append(row)
        print(
            f"{name:<9} {X.shape[0]:>5} {X.shape[1]:>3} | {m['model'] + ',' + str(m['G']):<10} {m['bic']:>12.3f} | "
            f"{dk['model'] + ',' + str(dk['G']):<10} {dk['bic']:>12.3f} | {'yes' if agree else 'NO'}",
            flush=True,
        )
    print(f"agree on {sum(r['agree'] for r in rows)} of {len(rows)} (model and G)")

    timing = None
    if not args.no_timing:
        with tempfile.TemporaryDirectory() as tmp:
            csv = write_resample(Path(tmp), args.rows)
            Xr = load(csv)  # exactly what R reads
            load_before = os.getloadavg()
            r_time = run_mclust([csv])[0] if use_r else (saved.get("timing") or {}).get("mclust")
            if r_time and not use_r and saved["timing"].get("rows") != args.rows:
                r_time = None  # saved for another size
            dk_time = daskem_choice(Xr)
            load_after = os.getloadavg()
        timing = {
            "rows": int(Xr.shape[0]),
            "d": int(Xr.shape[1]),
            "noise_sd": NOISE,
            "mclust": r_time,
            "mclust_source": source,
            "daskem": dk_time,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "cpus": os.cpu_count(),
        }
        print(f"\nbanknote resample, {Xr.shape[0]:,} x {Xr.shape[1]} (load average before {load_before[0]:.2f}):")
        if r_time:
            print(
                f"  mclust Mclust(X):          {r_time['seconds']:8.1f} s wall, {cpu_text(r_time)} CPU -> "
                f"{r_time['model']},{r_time['G']}"
            )
        print(
            f"  daskem select_model(...):  {dk_time['seconds']:8.1f} s wall, {cpu_text(dk_time)} CPU -> "
            f"{dk_time['model']},{dk_time['G']} ({dk_time['n_passes']} passes)"
        )

    doc = {
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
        },
        "daskem": daskem.__version__,
        "mclust_source": source,
        "k_values": list(K_VALUES),
        "criterion": "bic",
        "rows": rows,
        "timing": timing,
    }
    if args.merge and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        mine = {r["data"] for r in rows}
        merged = [r for r in old.get("rows", []) if r["data"] not in mine] + rows
        doc["rows"] = sorted(merged, key=lambda r: DATASETS.index(r["data"]))
        doc["timing"] = timing or old.get("timing")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
