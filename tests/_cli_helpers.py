"""Helpers for the command-line, job and deploy tests: run ``python -m daskem`` in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: a small local cluster for every computing command
LOCAL = ["--n-workers", "1", "--threads-per-worker", "2", "--memory-limit", "2GiB"]


def env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", **extra}


def daskem(*args: str, cwd: Path | None = None, timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``python -m daskem ARGS`` and return the completed process (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "daskem", *map(str, args)],
        cwd=cwd,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(p: subprocess.CompletedProcess, code: int = 2) -> str:
    """Exit ``code``, one readable line on stderr, no traceback."""
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    assert "error" in lines[0]
    return lines[0]


class DaskCluster:
    """A real ``dask scheduler`` + ``dask worker`` as subprocesses, stopped by pid."""

    def __init__(self, folder: Path, n_workers: int = 1, nthreads: int = 2, **extra_env: str):
        self.folder = folder
        self.scheduler_file = folder / "scheduler.json"
        self.env = env(**extra_env)
        self.procs: list[subprocess.Popen] = []
        self.n_workers = n_workers
        self.nthreads = nthreads

    def __enter__(self) -> DaskCluster:
        dask = [sys.executable, "-m", "dask"]
        log = open(self.folder / "cluster.log", "w")
        self.procs.append(
            subprocess.Popen(
                [
                    *dask,
                    "scheduler",
                    "--scheduler-file",
                    str(self.scheduler_file),
                    "--port",
                    "0",
                    "--dashboard-address",
                    ":0",
                    "--host",
                    "127.0.0.1",
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        deadline = time.monotonic() + 60
        self.address = ""
        while not self.address and time.monotonic() < deadline:
            # the scheduler writes its file in place: under load it can be seen empty or half-written
            try:
                self.address = json.loads(self.scheduler_file.read_text())["address"]
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.2)
        assert self.address, (self.folder / "cluster.log").read_text()
        for i in range(self.n_workers):
            self.procs.append(
                subprocess.Popen(
                    [
                        *dask,
                        "worker",
                        "--scheduler-file",
                        str(self.scheduler_file),
                        "--nthreads",
                        str(self.nthreads),
                        "--memory-limit",
                        "2GiB",
                        "--name",
                        f"w{i}",
                        "--host",
                        "127.0.0.1",
                    ],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        from distributed import Client

        with Client(self.address, timeout="30s") as c:
            c.wait_for_workers(self.n_workers, timeout=60)
        return self

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
