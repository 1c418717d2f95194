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

This module imports nothing else of daskem.
"""

from __future__ import annotations

from sklearn.exceptions import ConvergenceWarning as _SklearnConvergenceWarning
from sklearn.exceptions import NotFittedError as _SklearnNotFittedError

__all__ = [
    "ConvergenceWarning",
    "InputError",
    "InputNotFoundError",
    "NotFittedError",
    "OutputRefusedError",
]


class InputError(ValueError):
    """Bad input refused before any work starts (exit status 2 on the CLI)."""


class InputNotFoundError(InputError, FileNotFoundError):
    """A store, file or model folder that does not exist (exit status 2 on the CLI)."""


class OutputRefusedError(InputError):
    """An output path that daskem refuses to write over (exit status 2 on the CLI)."""


class NotFittedError(_SklearnNotFittedError):
    """A method that needs a fitted model was called before ``fit``."""


class ConvergenceWarning(_SklearnConvergenceWarning):
    """The best run did not converge within ``max_iter``."""
