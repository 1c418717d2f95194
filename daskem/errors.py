"""daskem's error and warning classes: one small module at the bottom of the package.

Every class subclasses what a user of numpy, scikit-learn and the standard
library already catches:

* :class:`InputError` -- bad input or options, refused before any work starts
  (a ``ValueError``; exit status 2 on the command line);
* :class:`InputNotFoundError` -- a missing store, file or model folder (also a
  ``FileNotFoundError``, as numpy, zarr and pandas raise);
* :class:`OutputRefusedError` -- an output path daskem will not write over
  (a folder daskem did not write, a file, the input itself);
* :class:`NotFittedError` -- scikit-learn's, for a method called before ``fit``;
* :class:`ConvergenceWarning` -- scikit-learn's, for a fit that reached
  ``max_iter``.

This module imports nothing else of daskem. The two scikit-learn subclasses are
made on first use (module ``__getattr__``): importing scikit-learn takes 1-2 s,
and a Dask worker running daskem's passes, or ``daskem generate``, never needs
them.
"""

from __future__ import annotations

import threading

__all__ = [
    "ConvergenceWarning",  # noqa: F822 (made on first use, by __getattr__)
    "InputError",
    "InputNotFoundError",
    "NotFittedError",  # noqa: F822 (made on first use, by __getattr__)
    "OutputRefusedError",
]


class InputError(ValueError):
    """Bad input refused before any work starts (exit status 2 on the CLI)."""


class InputNotFoundError(InputError, FileNotFoundError):
    """A store, file or model folder that does not exist (exit status 2 on the CLI)."""


class OutputRefusedError(InputError):
    """An output path that daskem refuses to write over (exit status 2 on the CLI)."""


def _sklearn_subclasses() -> dict[str, type]:
    # scikit-learn is imported here, on first use of either class, not with the module (1-2 s)
    from sklearn.exceptions import ConvergenceWarning as _SklearnConvergenceWarning  # (slow: see above)
    from sklearn.exceptions import NotFittedError as _SklearnNotFittedError  # (slow: see above)

    class NotFittedError(_SklearnNotFittedError):
        """A method that needs a fitted model was called before ``fit``."""

        __qualname__ = "NotFittedError"

    class ConvergenceWarning(_SklearnConvergenceWarning):
        """The best run did not converge within ``max_iter``."""

        __qualname__ = "ConvergenceWarning"

    return {"NotFittedError": NotFittedError, "ConvergenceWarning": ConvergenceWarning}


_MADE = threading.Lock()


def __getattr__(name: str) -> type:
    if name in ("NotFittedError", "ConvergenceWarning"):
        with _MADE:  # made once: two threads must not get two different classes
            if name not in globals():
                globals().update(_sklearn_subclasses())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
