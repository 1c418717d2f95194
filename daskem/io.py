"""Reading arrays (numpy, dask, zarr, xarray, paths and URLs) and saving models.

Models are saved as a folder holding ``model.json`` (format version, options,
scalars) and ``arrays.npz`` (numpy arrays, loaded with ``allow_pickle=False``).
Nothing is ever pickled, and a folder that holds a pickle is refused.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from . import _outputs
from .errors import InputError, InputNotFoundError

#: target bytes per row chunk: big enough that the scheduler overhead is
#: small, small enough that a worker holds a few of them comfortably.
DEFAULT_CHUNK_BYTES = 32 * 2**20

MODEL_FORMAT = "daskem-gmm"
MODEL_FORMAT_VERSION = 1


def _is_url(path: str) -> bool:
    return "://" in path


def _rows_for(n_rows: int, n_cols: int, itemsize: int, chunk_bytes: int, store_rows: int | None) -> int:
    target = max(1, chunk_bytes // max(1, n_cols * itemsize))
    if store_rows is None or store_rows <= 0:
        return min(n_rows, target)
    if store_rows < target / 2:
        # merge small store chunks: a whole number of them per dask chunk
        return min(n_rows, store_rows * max(1, round(target / store_rows)))
    if store_rows > 2 * target:
        # split big store chunks evenly
        pieces = math.ceil(store_rows / target)
        return min(n_rows, math.ceil(store_rows / pieces))
    return min(n_rows, store_rows)


_NOT_ZARR_HINT = (
    "daskem reads a Zarr store (a folder or URL) or a .npy file; convert other formats first, "
    "e.g. np.save('x.npy', np.loadtxt('x.csv', delimiter=','))"
)


def _open_zarr(path: str, array: str | None, storage_options: dict | None) -> Any:
    import zarr  # zarr is imported only where a store is opened (slow import)

    kwargs = {}
    if storage_options:
        kwargs["storage_options"] = storage_options
    if not _is_url(path):
        p = Path(path)
        if not p.exists():
            raise InputNotFoundError(f"no such Zarr store: {path}")
        if not p.is_dir() or not any((p / n).exists() for n in ("zarr.json", ".zarray", ".zgroup")):
            raise InputError(f"not a Zarr store or .npy file: {path} ({_NOT_ZARR_HINT})")
    try:
        node = zarr.open(path, mode="r", **kwargs)
    except FileNotFoundError as exc:
        raise InputNotFoundError(f"no such Zarr store: {path}") from exc
    except Exception as exc:  # zarr raises several types for unreadable stores
        raise InputError(f"not a readable Zarr store: {path} ({type(exc).__name__}: {exc})") from exc
    if isinstance(node, zarr.Group):
        names = sorted(name for name, _ in node.arrays())
        if array is None:
            if len(names) != 1:
                raise InputError(f"{path} is a Zarr group with arrays {names}; choose one with --array/array=")
            array = names[0]
        if array not in names:
            raise InputError(f"{path} has no array {array!r}; arrays: {names}")
        node = node[array]
    elif array is not None:
        raise InputError(f"{path} is a single Zarr array; it has no array {array!r} inside")
    return node


def open_array(
    X: Any,
    *,
    array: str | None = None,
    chunk_bytes: int | None = None,
    storage_options: dict | None = None,
) -> da.Array:
    """Open data as a lazily read 2-D Dask array chunked along rows.

    Parameters
    ----------
    X : array-like, dask array, zarr array, xarray DataArray, str or Path
        A Zarr store (path or fsspec URL such as ``s3://bucket/x.zarr``), a
        ``.npy`` file, or an in-memory array.
    array : str, optional
        The array inside a Zarr group.
    chunk_bytes : int, optional
        Target bytes per row chunk (default 32 MiB). Store chunks much smaller
        are merged, much larger ones are split; columns are never split.
    storage_options : dict, optional
        Passed to fsspec for URLs.

    Returns
    -------
    dask.array.Array of shape (n_samples, n_features)
        Float dtype (integers are converted to float64).

    Raises
    ------
    InputNotFoundError
        For a missing store or file (a ``FileNotFoundError``).
    InputError
        For an unreadable store, a file that is neither a Zarr store nor a
        ``.npy`` file, a non-numeric dtype, data that is not two-dimensional,
        or an empty array.
    """
    chunk_bytes = chunk_bytes or DEFAULT_CHUNK_BYTES
    store_rows = None
    if isinstance(X, (str, os.PathLike)):
        path = os.fspath(X)
        if path.endswith(".npy"):
            if not _is_url(path) and not Path(path).exists():
                raise InputNotFoundError(f"no such file: {path}")
            try:
                X = NpyFile(path)
            except Exception as exc:
                raise InputError(f"not a readable .npy file: {path} ({exc})") from exc
        else:
            X = _open_zarr(path, array, storage_options)
    if hasattr(X, "dims") and hasattr(X, "data") and not isinstance(X, np.ndarray):
        X = X.data  # xarray.DataArray
    if isinstance(X, da.Array):
        arr = X
    else:
        if not hasattr(X, "shape") or not hasattr(X, "dtype"):
            X = np.asarray(X)
        _check_dtype_shape(X.shape, np.dtype(X.dtype))
        chunks = getattr(X, "chunks", None)
        if chunks is not None and not isinstance(X, np.ndarray) and len(chunks) == 2 and isinstance(chunks[0], int):
            store_rows = chunks[0]  # a zarr array's chunk shape
        rows = _rows_for(X.shape[0], X.shape[1], np.dtype(X.dtype).itemsize, chunk_bytes, store_rows)
        if hasattr(X, "store") or store_rows is not None:
            arr = da.from_zarr(X, chunks=(rows, X.shape[1]))
        else:
            arr = da.from_array(X, chunks=(rows, X.shape[1]), asarray=True)
        return _as_float(arr)
    _check_dtype_shape(arr.shape, arr.dtype)
    if len(arr.chunks[1]) != 1:
        arr = arr.rechunk({1: -1})
    row_chunks = arr.chunks[0]
    target = _rows_for(arr.shape[0], arr.shape[1], arr.dtype.itemsize, chunk_bytes, None)
    if max(row_chunks) > 4 * target or (len(row_chunks) > 1 and np.median(row_chunks) < target / 8):
        arr = arr.rechunk({0: target})
    return _as_float(arr)


class NpyFile:
    """A ``.npy`` file read by row slices, memory-mapped where it is read.

    What :func:`open_array` wraps a ``.npy`` path in. A dask array made from a
    ``numpy.memmap`` carries the memmap in its graph, and a memmap pickles as
    its whole data: on a distributed cluster every task of a pass (or the
    graph, once) held the file's bytes ("Sending large graph of size ..."; a
    file larger than the client's memory could not be sent at all). This
    object pickles as its path, shape and dtype, and opens the file again on
    the worker that reads it (which must see the same path, as for a local
    Zarr store).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.path.abspath(os.fspath(path))
        mm = np.load(self.path, mmap_mode="r", allow_pickle=False)
        self.shape: tuple[int, ...] = tuple(mm.shape)
        self.dtype = mm.dtype
        self._mm: np.ndarray | None = mm

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if self._mm is None:
            self._mm = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return np.asarray(self._mm[key])

    def __getstate__(self) -> dict:
        return {"path": self.path, "shape": self.shape, "dtype": self.dtype, "_mm": None}

    def __dask_tokenize__(self) -> tuple:
        st = os.stat(self.path)
        return ("daskem.io.NpyFile", self.path, st.st_size, st.st_mtime_ns, self.shape, str(self.dtype))

    def __repr__(self) -> str:
        return f"NpyFile({self.path!r}, shape={self.shape}, dtype={self.dtype})"


def _check_dtype_shape(shape: tuple, dtype: np.dtype) -> None:
    if len(shape) != 2:
        raise InputError(
            f"expected a 2-D array (n_samples, n_features), got {len(shape)}-D with shape "
            f"{tuple(shape)}; reshape 1-D data with x.reshape(-1, 1)"
        )
    if dtype.kind not in "fiub":
        raise InputError(f"expected numeric data, got dtype {dtype}")
    if shape[0] < 1 or shape[1] < 1:
        raise InputError(f"expected at least one row and one column, got shape {tuple(shape)}")


def _as_float(arr: da.Array) -> da.Array:
    if arr.dtype.kind != "f" or arr.dtype.itemsize < 4:
        arr = arr.astype(np.float64)
    return arr


# --------------------------------------------------------------------------
# atomic files (folders: daskem._outputs)
# --------------------------------------------------------------------------


def atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``np.savez`` through a temporary name and a rename."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------

_PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".dill", ".cloudpickle")


def _refuse_pickles(folder: Path) -> None:
    for f in folder.rglob("*"):
        if not f.is_file():
            continue
        if f.suffix.lower() in _PICKLE_SUFFIXES:
            raise InputError(f"refusing to load {folder}: it contains a pickle ({f.name})")
        with open(f, "rb") as fh:
            head = fh.read(2)
        if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            raise InputError(f"refusing to load {folder}: {f.name} is a pickle")


def write_model(
    folder: str | os.PathLike,
    meta: dict,
    arrays: dict[str, np.ndarray],
    *,
    overwrite: bool = False,
) -> None:
    """Write ``model.json`` and ``arrays.npz`` into ``folder`` atomically.

    ``folder`` may be new, an empty folder, or a model folder daskem saved
    before (replaced atomically). Anything else is refused before anything
    is written: a daskem output of another kind unless ``overwrite``; a file,
    or a folder daskem did not write, always.

    Raises
    ------
    OutputRefusedError
        For a target daskem will not write over.
    """
    for name, a in arrays.items():
        if np.asarray(a).dtype.kind not in "fiub":
            raise TypeError(f"array {name} is not numeric")
    target = _outputs.check_output(folder, "model", overwrite=overwrite, option="overwrite=True")
    with _outputs.atomic_output(target) as tmp:
        doc = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, **meta}
        (tmp / "model.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
        np.savez(tmp / "arrays.npz", **{k: np.asarray(v) for k, v in arrays.items()})


def model_folder(folder: str | os.PathLike) -> Path:
    """The model folder inside ``folder``: ``folder/model`` for what ``daskem fit --out`` wrote, else ``folder``.

    Raises
    ------
    InputNotFoundError
        When ``folder`` does not exist.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputNotFoundError(f"no such model folder: {folder}")
    if not (folder / "model.json").is_file() and (folder / "model" / "model.json").is_file():
        return folder / "model"
    return folder


def read_model(folder: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a folder written by :func:`write_model` (or by ``daskem fit --out``); refuse pickles and unknown formats.

    Raises
    ------
    InputNotFoundError
        When ``folder`` does not exist.
    InputError
        For a folder that holds no daskem model, a pickle, or a newer format.
    """
    folder = model_folder(folder)
    if not (folder / "model.json").is_file():
        raise InputError(f"{folder} is not a daskem model folder (no model.json)")
    _refuse_pickles(folder)
    try:
        doc = json.loads((folder / "model.json").read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{folder}/model.json is not valid JSON: {exc}") from exc
    if doc.get("format") != MODEL_FORMAT:
        raise InputError(f"{folder} holds no daskem Gaussian mixture (format {doc.get('format')!r})")
    if int(doc.get("format_version", -1)) > MODEL_FORMAT_VERSION:
        raise InputError(
            f"{folder} was written by a newer daskem (format version {doc['format_version']}); "
            "upgrade daskem to load it"
        )
    try:
        with np.load(folder / "arrays.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as exc:
        raise InputError(f"cannot read {folder}/arrays.npz safely: {exc}") from exc
    return doc, arrays
