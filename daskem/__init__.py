"""daskem: Gaussian mixtures fitted by EM on chunked data, on a Dask cluster.

>>> import daskem
>>> X = daskem.open_array("data.zarr")                       # doctest: +SKIP
>>> gm = daskem.GaussianMixture(n_components=8, n_init=4).fit(X)  # doctest: +SKIP

The names below are imported on first use (module ``__getattr__``): a Dask
worker that runs daskem's passes imports ``daskem._engine`` and the kernels,
never scikit-learn (1-2 s of a worker's start), and ``daskem generate`` or
``daskem status`` start faster.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

if TYPE_CHECKING:
    from .errors import ConvergenceWarning, InputError, NotFittedError
    from .io import open_array
    from .mixture import GaussianMixture, load
    from .select import SelectKResult, SelectModelResult, select_k, select_model

#: public name -> the module that defines it
_WHERE = {
    "ConvergenceWarning": ".errors",
    "InputError": ".errors",
    "NotFittedError": ".errors",
    "open_array": ".io",
    "GaussianMixture": ".mixture",
    "load": ".mixture",
    "SelectKResult": ".select",
    "SelectModelResult": ".select",
    "select_k": ".select",
    "select_model": ".select",
}

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


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
