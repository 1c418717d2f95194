"""Every script in examples/ runs on small data (DASKEM_EXAMPLE_SMALL=1)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from _cli_helpers import ROOT, env

# real processes (the CLI, clusters) or long fits: not in the quick subset
pytestmark = pytest.mark.slow

EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))


def test_examples_are_found():
    assert set(EXAMPLES) >= {"quickstart.py", "select_k.py", "anomaly_detection.py", "cluster_fit.py"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, tmp_path):
    p = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), str(tmp_path)],
        cwd=ROOT / "examples",
        env=env(DASKEM_EXAMPLE_SMALL="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert " ok:" in p.stdout
