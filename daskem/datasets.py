"""Synthetic Gaussian-mixture data, written to Zarr chunk by chunk (out-of-core).

``daskem generate`` and ``daskem demo`` use :func:`generate_zarr`: every row
chunk is drawn from its own seeded generator, written, and dropped, so the
store may be far larger than memory. The true parameters are saved in the
array's attributes and in a JSON file next to the store
(``OUT.zarr`` → ``OUT.truth.json``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _outputs
from .errors import InputError


@dataclass(frozen=True)
class MixtureTruth:
    """Parameters of a synthetic mixture (full covariances)."""

    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, D)
    covariances: np.ndarray  # (K, D, D)

    def to_json(self) -> dict:
        return {
            "n_components": int(self.weights.shape[0]),
            "n_features": int(self.means.shape[1]),
            "weights": self.weights.tolist(),
            "means": self.means.tolist(),
            "covariances": self.covariances.tolist(),
        }

    @classmethod
    def from_json(cls, doc: dict) -> MixtureTruth:
        return cls(np.asarray(doc["weights"]), np.asarray(doc["means"]), np.asarray(doc["covariances"]))


def make_truth(n_features: int, n_components: int, seed: int = 0, separation: float = 6.0) -> MixtureTruth:
    """Draw mixture parameters with well separated, anisotropic components.

    Parameters
    ----------
    n_features, n_components : int
    seed : int
    separation : float
        Scale of the spread of the means relative to the component widths
        (widths are about 1).
    """
    rng = np.random.default_rng([seed, 1])
    weights = rng.dirichlet(np.full(n_components, 4.0))
    means = rng.normal(scale=separation, size=(n_components, n_features))
    covs = np.empty((n_components, n_features, n_features))
    for k in range(n_components):
        q, _ = np.linalg.qr(rng.normal(size=(n_features, n_features)))
        scales = rng.uniform(0.3, 1.5, size=n_features)
        covs[k] = (q * scales**2) @ q.T
    return MixtureTruth(weights, means, covs)


def sample_chunk(truth: MixtureTruth, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows and their component labels."""
    k = truth.weights.shape[0]
    labels = rng.choice(k, size=n, p=truth.weights)
    chol = np.linalg.cholesky(truth.covariances)
    z = rng.standard_normal((n, truth.means.shape[1]))
    x = truth.means[labels] + np.einsum("nij,nj->ni", chol[labels], z)
    return x, labels


def truth_path(store: str | Path) -> Path:
    """Where :func:`generate_zarr` saves the true parameters of ``store``."""
    p = Path(store)
    name = p.name[: -len(".zarr")] if p.name.endswith(".zarr") else p.name
    return p.parent / f"{name}.truth.json"


def generate_zarr(
    path: str | Path,
    n_samples: int,
    n_features: int,
    n_components: int,
    *,
    seed: int = 0,
    chunk_rows: int = 100_000,
    dtype: str = "float64",
    separation: float = 6.0,
    overwrite: bool = False,
    target: _outputs.OutputTarget | None = None,
) -> MixtureTruth:
    """Write ``n_samples`` rows of a Gaussian mixture to a Zarr array at ``path``.

    The store is built in a temporary folder beside ``path`` and swapped into
    place, so an existing store is replaced only by a complete one. Memory use
    is one chunk of ``chunk_rows`` rows whatever ``n_samples``.

    ``path`` may be new, an empty folder, or a store that daskem generated
    before (replaced, with its ``OUT.truth.json``); a daskem output of another
    kind only with ``overwrite=True``; anything else is refused.

    Parameters
    ----------
    target : OutputTarget, optional
        ``path`` already checked by the caller (the command line).

    Returns
    -------
    MixtureTruth
        The true parameters (also saved as JSON, see :func:`truth_path`).

    Raises
    ------
    OutputRefusedError
        For a target daskem will not write over (before any work).
    """
    import zarr  # imported where a store is written (slow import)

    for name, v, lo in (("n_samples", n_samples, 1), ("n_features", n_features, 1), ("n_components", n_components, 1)):
        if not isinstance(v, (int, np.integer)) or v < lo:
            raise InputError(f"{name} must be an integer >= {lo}, got {v!r}")
    if n_components > n_samples:
        raise InputError(f"n_components={n_components} must be <= n_samples={n_samples}")
    if str(path).startswith(("s3://", "gs://", "http://", "https://")):
        raise InputError("generate writes local Zarr stores only")
    if target is None:
        target = check_generate_target(path, overwrite=overwrite, option="overwrite=True")
    truth = make_truth(n_features, n_components, seed, separation)
    chunk_rows = int(max(1, min(chunk_rows, n_samples)))
    truth_doc = {**truth.to_json(), "seed": int(seed)}
    with _outputs.atomic_output(target) as tmp:
        arr = zarr.create_array(
            store=str(tmp),
            shape=(n_samples, n_features),
            chunks=(chunk_rows, n_features),
            dtype=dtype,
            overwrite=True,
        )
        for i, start in enumerate(range(0, n_samples, chunk_rows)):
            stop = min(n_samples, start + chunk_rows)
            x, _ = sample_chunk(truth, stop - start, np.random.default_rng([seed, 2, i]))
            arr[start:stop] = x.astype(dtype)
        arr.attrs["daskem_truth"] = truth.to_json()
        arr.attrs["daskem_seed"] = int(seed)
    # the store holds the truth in its attributes too; the JSON beside it is a copy
    _outputs.write_companion(truth_path(path), "generated", truth_doc)
    return truth


def check_generate_target(
    path: str | os.PathLike, *, overwrite: bool = False, option: str | None = "--overwrite"
) -> _outputs.OutputTarget:
    """Check a :func:`generate_zarr` target (the store and its ``OUT.truth.json``) before any work."""
    return _outputs.check_output(path, "generated", overwrite=overwrite, option=option, companions=[truth_path(path)])
