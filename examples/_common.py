"""Shared by the examples: sizes (shrunk with DASKEM_EXAMPLE_SMALL=1) and a work folder."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

SMALL = os.environ.get("DASKEM_EXAMPLE_SMALL") == "1"
N_SAMPLES = 6_000 if SMALL else 1_000_000


def workdir(name: str) -> Path:
    """``argv[1]`` if given, else a fresh temporary folder."""
    if len(sys.argv) > 1:
        p = Path(sys.argv[1])
        p.mkdir(parents=True, exist_ok=True)
        return p
    return Path(tempfile.mkdtemp(prefix=f"daskem-{name}-"))


def local_client():
    """A local Dask cluster: small in the tests, sized to the machine otherwise."""
    from distributed import Client, LocalCluster

    kw = {"n_workers": 1, "threads_per_worker": 2, "dashboard_address": ":0"} if SMALL else {}
    cluster = LocalCluster(**kw)
    return Client(cluster), cluster
