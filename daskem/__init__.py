"""daskem: Gaussian mixtures fitted by EM on chunked data, on a Dask cluster.

>>> import daskem
>>> X = daskem.open_array("data.zarr")                       # doctest: +SKIP
>>> gm = daskem.GaussianMixture(n_components=8, n_init=4).fit(X)  # doctest: +SKIP
"""

from __future__ import annotations

from ._version import __version__
from .errors import ConvergenceWarning, InputError, NotFittedError
from .io import open_array
from .mixture import GaussianMixture, load
from .select import SelectKResult, SelectModelResult, select_k, select_model

__all__ = [
    "ConvergenceWarning",
    "GaussianMixture",
    "InputError",
    "NotFittedError",
    "__version__",
    "load",
    "open_array",
    "select_k",
    "select_model",
    "SelectKResult",
    "SelectModelResult",
]
