"""The direction of imports inside daskem, read from the source (ast), not by importing it.

Layers, bottom up:

* ``errors``, ``_version``: import nothing of daskem;
* numpy kernels and models -- ``_numeric``, ``_blas``, ``_covariance``,
  ``_gaussian``, ``_missing``, ``_kmeans``, ``_init``, ``_model``, ``_gaussian_model``:
  never Dask or distributed, directly or through another daskem module;
* the engine (``_engine``, the only module that builds Dask graphs) and the
  fit loop (``_fitloop``): never a model nor an estimator, they talk to
  ``_model``'s protocol;
* estimators (``base``, ``mixture``, ``select``);
* front ends (``cli``, ``jobs``) over the workflows: nothing below them
  imports them.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "daskem"

KERNELS = {
    "_numeric",
    "_blas",
    "_covariance",
    "_gaussian",
    "_missing",
    "_init",
    "_model",
    "_gaussian_model",
    "_squarem",
    "_mclust",
    "_kmeans",
}
MODELS_AND_ESTIMATORS = {
    "_covariance",
    "_gaussian",
    "_missing",
    "_init",
    "_gaussian_model",
    "base",
    "mixture",
    "select",
}
FRONT_ENDS = {"cli", "jobs", "__main__"}
DASK = {"dask", "distributed"}

#: modules another branch is reworking (the workflows split): their in-function
#: imports are checked once it is merged (see test_package_imports_are_at_the_top)
PENDING: set[str] = set()


def _modules() -> dict[str, ast.Module]:
    return {f.stem: ast.parse(f.read_text(), filename=str(f)) for f in sorted(PACKAGE.glob("*.py"))}


def _imports(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(daskem modules, top-level third-party packages) that a module imports, anywhere in it."""
    own, other = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.partition(".")[0]
                if top == "daskem":
                    own.add(a.name.split(".")[1] if "." in a.name else "__init__")
                else:
                    other.add(top)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                top = (node.module or "").partition(".")[0]
                if top == "daskem":
                    own.add(node.module.split(".")[1] if "." in node.module else "__init__")
                else:
                    other.add(top)
            elif node.module:  # from .x import y
                own.add(node.module.partition(".")[0])
            else:  # from . import x, y
                own.update(a.name for a in node.names)
    return own, other


@pytest.fixture(scope="module")
def graph() -> dict[str, tuple[set[str], set[str]]]:
    return {name: _imports(tree) for name, tree in _modules().items()}


def _closure(graph: dict, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for dep in graph.get(m, (set(), set()))[0]:
            if dep not in seen and dep in graph:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_rules_see_the_modules(graph) -> None:
    # a rule about modules that are not there could never fail
    assert KERNELS | {"_engine", "_fitloop", "base", "mixture", "select", "errors", "cli", "jobs"} <= set(graph)
    assert "_gaussian" in graph["_gaussian_model"][0] and "dask" in graph["_engine"][1]


def test_errors_and_version_import_nothing_of_daskem(graph) -> None:
    for name in ("errors", "_version"):
        assert graph[name][0] == set(), name


def test_kernels_and_models_never_reach_dask(graph) -> None:
    for name in KERNELS:
        reached = _closure(graph, name) | {name}
        third_party = set().union(*(graph[m][1] for m in reached))
        assert not (third_party & DASK), f"{name} reaches Dask through {sorted(reached)}"
        assert reached <= KERNELS | {"errors", "_version"}, (name, sorted(reached - KERNELS))


def test_the_gaussian_kernel_does_not_import_the_missing_one(graph) -> None:
    assert "_missing" not in _closure(graph, "_gaussian")


def test_engine_and_fit_loop_never_import_a_model_or_an_estimator(graph) -> None:
    for name in ("_engine", "_fitloop"):
        reached = _closure(graph, name)
        assert not (reached & (MODELS_AND_ESTIMATORS | FRONT_ENDS)), (name, sorted(reached))


def test_nothing_below_the_front_ends_imports_them(graph) -> None:
    for name, (own, _) in graph.items():
        if name in FRONT_ENDS | {"workflows"}:
            continue
        assert not (own & FRONT_ENDS), (name, sorted(own & FRONT_ENDS))


def test_jobs_never_imports_cli(graph) -> None:
    """The workflows both front ends use live in ``workflows``; the command line runs job
    files (``daskem run``/``submit``/``status``), so ``cli`` may import ``jobs``, never the reverse."""
    assert "workflows" in graph
    assert "cli" not in graph["jobs"][0] and "cli" not in graph["workflows"][0]
    assert "jobs" not in graph["workflows"][0]


def test_package_imports_are_at_the_top() -> None:
    """An import inside a function must say why (optional or slow) in a comment on its line or the one above."""
    checked = 0
    for f in sorted(PACKAGE.glob("*.py")):
        if f.stem in PENDING:
            continue
        lines = f.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    here, above = lines[sub.lineno - 1], lines[sub.lineno - 2]
                    assert "#" in here or above.strip().startswith("#"), f"{f.name}:{sub.lineno}: {here.strip()}"
        checked += 1
    assert checked >= 15


HEAVY = ("sklearn", "distributed", "dask", "scipy", "zarr", "matplotlib")


@pytest.mark.parametrize(
    "argv", [["--version"], ["--help"], ["fit", "--help"], ["status"], ["result", "no-such-job"]], ids=" ".join
)
def test_the_light_commands_import_no_heavy_package(argv: list[str], tmp_path: Path) -> None:
    """``daskem --help``, ``--version``, ``status`` and ``result`` read no data and fit nothing: they start
    without scikit-learn, Dask, SciPy or Zarr (1.3-2 s of imports on the machines measured), which the
    commands that compute import when they run."""
    code = (
        "import sys\n"
        "from daskem import cli\n"
        "try:\n"
        f"    rc = cli.main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    rc = exc.code\n"
        f"print('RC', rc, sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    env = {**os.environ, "DASKEM_HOME": str(tmp_path), "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    last = out.stdout.strip().splitlines()[-1]
    expected_rc = 2 if argv[0] == "result" else 0
    assert last == f"RC {expected_rc} []", (last, out.stderr[-2000:])
