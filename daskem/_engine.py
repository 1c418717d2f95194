"""The EM engine: the only module that builds Dask graphs.

One pass over the data is one ``map_blocks`` (every chunk computes the packed
statistics of every live run) followed by a tree ``sum`` with a configurable
fan-in, so that only the small summed vector reaches the client; on a
distributed cluster, when the chunk vectors are few (16 MiB together at
most), they are gathered and summed on the client instead, which saves the
last reduction level (:func:`reduce_statistics`). Nothing per row ever
reaches the client. The engine knows
nothing of Gaussians: it talks to a *model* (:class:`daskem._model.MixtureModel`)
that supplies the per-chunk statistics and their packing. The EM loop itself
lives in :mod:`daskem._fitloop`.

Every read of the data (a pass of statistics, a sample of rows) is counted
here, on the :class:`PassCounter` the caller hands in.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import distributed
import numpy as np
import psutil
from dask.diagnostics import ProgressBar
from distributed.diagnostics.progressbar import TextProgressBar

from ._model import MixtureModel

DEFAULT_SPLIT_EVERY = 8

Params = Any


@dataclass
class PassCounter:
    """Passes over the data made so far (statistics passes and row samples)."""

    n: int = 0


def _count(counter: PassCounter | None) -> None:
    if counter is not None:
        counter.n += 1


# --------------------------------------------------------------------------
# rows: validation split
# --------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


@dataclass(frozen=True)
class RowSplit:
    """A deterministic hold-out of rows: a hash of (seed, global row index).

    The same rows are held out whatever the chunking, on any machine, and the
    split is computed inside each chunk task: nothing is materialised.
    """

    fraction: float
    seed: int = 0

    def train_mask(self, start: int, stop: int) -> np.ndarray:
        """True for the training rows among the global rows ``start:stop``."""
        return self.is_train(np.arange(start, stop, dtype=np.uint64))

    def is_train(self, rows: np.ndarray) -> np.ndarray:
        """True for the training rows among the given global row indices."""
        idx = np.asarray(rows).astype(np.uint64)
        h = _splitmix64(idx ^ _splitmix64(np.array([self.seed], dtype=np.uint64))[0])
        u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
        return u >= self.fraction


# --------------------------------------------------------------------------
# one pass
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _PassTask:
    model: MixtureModel
    params_list: tuple
    split: RowSplit | None

    def __call__(self, x: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        mask = None
        if self.split is not None:
            start, stop = block_info[0]["array-location"][0]
            mask = self.split.train_mask(start, stop)
        stats = self.model.statistics(x, self.params_list, mask)
        out = np.concatenate([self.model.pack(s) for s in stats]) if stats else np.zeros(0)
        return out[None, :]


def _apply_pass(x: np.ndarray, task: _PassTask, block_info: dict | None = None) -> np.ndarray:
    return task(x, block_info)


#: Parameters up to this size (summed over the chunk tasks) travel inside each
#: chunk task; larger ones are one graph key that every task depends on. Inline,
#: no worker waits for a copy from the worker that "computed" the key: about
#: 6 ms of each pass on two workers.
INLINE_PARAMS_BYTES = 4 * 2**20

#: On a distributed cluster, chunk vectors up to this size (all of them
#: together) are gathered to the client and summed there, in chunk order;
#: larger results go through the tree ``sum``. The gather saves the last
#: reduction level's transfer between workers and its task: about 7 ms of
#: each pass.
GATHER_BYTES = 16 * 2**20


def pass_parts(
    X: da.Array,
    model: MixtureModel,
    params_list: Sequence[Params],
    *,
    split: RowSplit | None = None,
) -> da.Array:
    """The lazy statistics of one pass, one packed row per chunk: shape (chunks, size)."""
    size = sum(model.packed_size(p) for p in params_list)
    task = _PassTask(model, tuple(params_list), split)
    states = [model.params_state(p) for p in params_list]
    key = "daskem-pass-params-" + dask.base.tokenize(model, split, states)
    nbytes = sum(np.asarray(a).nbytes for arrays, _ in states for a in arrays.values())
    arg: Any = task
    if nbytes * X.numblocks[0] > INLINE_PARAMS_BYTES:
        arg = dask.delayed(task, name=key, pure=True, traverse=False)
    return X.map_blocks(
        _apply_pass,
        arg,
        chunks=((1,) * X.numblocks[0], (size,)),
        dtype=np.float64,
        meta=np.empty((0, 0), dtype=np.float64),
        # the data must be part of the name: the same parameters over other data
        # (another array, another dataset) are other tasks
        name="daskem-stats-" + dask.base.tokenize(X.name, key),
    )


def pass_graph(
    X: da.Array,
    model: MixtureModel,
    params_list: Sequence[Params],
    *,
    split: RowSplit | None = None,
    split_every: int = DEFAULT_SPLIT_EVERY,
) -> da.Array:
    """The lazy summed statistics vector of one pass (all runs packed): a tree ``sum``."""
    return pass_parts(X, model, params_list, split=split).sum(axis=0, split_every=split_every)


def reduce_statistics(
    X: da.Array,
    model: MixtureModel,
    params_list: Sequence[Params],
    *,
    split: RowSplit | None = None,
    split_every: int = DEFAULT_SPLIT_EVERY,
    progress: bool = False,
    counter: PassCounter | None = None,
) -> list:
    """One pass over ``X``: the summed statistics of every parameter set.

    With a distributed client and few enough chunks (:data:`GATHER_BYTES`),
    the chunk vectors come to the client and are summed there in chunk
    order; otherwise the pass ends in a tree ``sum`` with fan-in
    ``split_every``. Both orders are fixed, so that a re-run chunk (a lost
    worker) gives the same bits. With ``progress``, a progress bar is shown on
    stderr for passes that take more than a second (distributed's bar when a
    ``Client`` is active). The pass is counted on ``counter``.

    Raises
    ------
    InputError
        From ``model.check_statistics``: rows the model's NaN policy refuses.
    """
    if not params_list:
        return []
    _count(counter)
    parts = pass_parts(X, model, params_list, split=split)
    client = _active_client() if _uses_distributed() else None
    if client is not None and parts.shape[0] * parts.shape[1] * 8 <= GATHER_BYTES:
        futures = client.compute(list(parts.to_delayed().ravel()))
        if progress:
            _progress(client, futures)
        vec = np.zeros(parts.shape[1])
        for block in client.gather(futures):
            vec += block[0]
    else:
        graph = parts.sum(axis=0, split_every=split_every)
        vec = _compute(graph, progress) if progress else dask.compute(graph)[0]
    out, pos = [], 0
    for p in params_list:
        size = model.packed_size(p)
        out.append(model.unpack(vec[pos : pos + size], p))
        pos += size
    if out:
        model.check_statistics(out[0])
    return out


def _active_client() -> Any:
    try:
        return distributed.default_client()
    except ValueError:
        return None


def _uses_distributed() -> bool:
    """Whether ``dask.compute`` goes to the active distributed client."""
    return dask.config.get("scheduler", None) in (None, "dask.distributed", "distributed")


def _progress(client: Any, futures: list) -> None:
    with contextlib.redirect_stdout(sys.stderr):
        TextProgressBar(futures, scheduler=client.scheduler.address, complete=True)


def _compute(graph: da.Array, progress: bool) -> np.ndarray:
    """Compute on the active scheduler, with a progress bar on stderr."""
    client = _active_client()
    if client is not None and _uses_distributed():
        fut = client.compute(graph)
        _progress(client, [fut])
        return fut.result()
    with ProgressBar(minimum=1.0, out=sys.stderr):
        return dask.compute(graph)[0]


# --------------------------------------------------------------------------
# sampling rows out-of-core
# --------------------------------------------------------------------------


def sample_rows(
    X: da.Array, n: int, seed: int, split: RowSplit | None = None, counter: PassCounter | None = None
) -> np.ndarray:
    """``n`` rows drawn without replacement, the same rows whatever the chunking.

    With a ``split``, the held-out rows among them are dropped (so slightly
    fewer than ``n`` come back): initialisation never sees validation rows.
    The read is counted on ``counter``.
    """
    _count(counter)
    N = X.shape[0]
    n = min(n, N)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(N, size=n, replace=False)) if n < N else np.arange(N)
    if split is not None:
        idx = idx[split.is_train(idx)]
    (rows,) = dask.compute(X[idx])
    return np.asarray(rows, dtype=np.float64)


# --------------------------------------------------------------------------
# persist or stream
# --------------------------------------------------------------------------


def _cluster_memory() -> float:
    """Memory the active scheduler can hold: workers' limits, or this machine's free RAM."""
    client = _active_client()
    if client is not None:
        info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else client.scheduler_info()
        limits = [w.get("memory_limit") or 0 for w in info.get("workers", {}).values()]
        total = float(sum(limits))
        if total > 0:
            return total
    return float(psutil.virtual_memory().available)


def _accepts_n_workers(client: Any) -> bool:
    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False


def _worker_slots() -> list[str]:
    """One entry per thread of the active distributed cluster: its worker's address."""
    client = _active_client()
    if client is None:
        return []
    info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else client.scheduler_info()
    return [addr for addr, w in sorted(info.get("workers", {}).items()) for _ in range(int(w.get("nthreads", 1)))]


def balanced_row_chunks(chunks: Sequence[int], threads: int, tolerance: float = 0.02) -> tuple[int, ...] | None:
    """Row chunks that split the work evenly over ``threads``, or None if ``chunks`` already do.

    Every pass costs as much as the busiest thread's rows. With the chunks
    placed whole on threads (the best case, longest chunks first), the
    busiest thread may carry more than its share: four chunks of 262144,
    262144, 262144 and 213568 rows on two threads give one of them 5% more
    than half the rows. When that excess is above ``tolerance``, the rows are
    cut into a multiple of ``threads`` chunks of equal size (at least as many
    chunks as before, so none is larger).
    """
    chunks = tuple(int(c) for c in chunks)
    n = sum(chunks)
    if threads <= 1 or n == 0:
        return None
    loads = [0] * threads
    for c in sorted(chunks, reverse=True):
        loads[loads.index(min(loads))] += c
    if max(loads) <= (1.0 + tolerance) * n / threads:
        return None
    total = min(n, math.ceil(len(chunks) / threads) * threads)
    base, extra = divmod(n, total)
    return tuple(base + (1 if i < extra else 0) for i in range(total))


def _persist(X: da.Array, order: str = "C") -> da.Array:
    """Persist ``X`` on the cluster, every worker thread holding the same number of rows.

    The rows are first cut into chunks that balance the threads
    (:func:`balanced_row_chunks`) and laid out in ``order`` (``"F"``:
    column-major chunks, whose transposed blocks, the kernel's layout, are
    contiguous); then runs of consecutive chunks are
    computed on each worker in turn, as many per worker as it has threads.
    The scheduler's own placement left 3 of 4 chunks on one of two workers in
    about half of the benchmark's runs, and every pass then took as long as
    that worker's 3 chunks. The placement is a preference, not a rule
    (``allow_other_workers``): chunks lost with a worker are recomputed on
    the others.
    """
    client = _active_client()
    slots = _worker_slots()
    rows = balanced_row_chunks(X.chunks[0], len(slots))
    if rows is not None:
        X = X.rechunk({0: rows, 1: X.shape[1]})
    if order == "F":
        X = X.map_blocks(np.asfortranarray, dtype=X.dtype)
    if len(set(slots)) <= 1:
        return X.persist()
    blocks = X.to_delayed(optimize_graph=True)  # (row chunks, column chunks)
    n = blocks.shape[0]
    by_worker: dict[str, list[int]] = {}
    for i in range(n):
        by_worker.setdefault(slots[i * len(slots) // n], []).append(i)
    futures: dict = {}
    for worker, idx in by_worker.items():
        group = [b for i in idx for b in blocks[i]]
        for b, fut in zip(group, client.compute(group, workers=[worker], allow_other_workers=True)):
            futures[b.key] = fut
    rebuild, args = X.__dask_postpersist__()
    return rebuild({key: futures[key] for key in dask.core.flatten(X.__dask_keys__())}, *args)


def prepare_data(
    X: da.Array, cache: bool | str = "auto", in_memory: bool = False, dtype: Any = None, order: str = "C"
) -> tuple[da.Array, bool]:
    """Persist ``X`` once when it fits (``cache='auto'``) or when asked; else stream.

    Returns the array to iterate over and whether it was persisted. Data that
    already sit in this process's memory (numpy input) are not copied again
    with a local scheduler, and are sent to the workers once (not with every
    pass) when a distributed client is active. Persisted data are cut into
    row chunks that give every worker thread the same work per pass
    (:func:`balanced_row_chunks`); streamed data keep the store's chunks.

    With a compute ``dtype`` narrower than the data's (float32 compute on
    float64 data), the persisted copy is cast once: half the memory, and
    every pass reads half the bytes. ``cache='auto'`` decides on the cast size.
    ``order="F"`` caches column-major chunks (see :func:`_persist`): the
    diagonal kernels' passes ran 14-17% faster on them, the full kernel's
    3-6% slower (two workers, timed in turn).
    """
    narrow = None
    if dtype is not None and X.dtype.kind == "f" and np.dtype(dtype).itemsize < X.dtype.itemsize:
        narrow = np.dtype(dtype)

    def persist(X: da.Array) -> da.Array:
        return _persist(X if narrow is None else X.astype(narrow), order)

    if in_memory:
        if _active_client() is not None:
            return persist(X), True
        return X, False
    if cache is False:
        return X, False
    if cache == "auto":
        size = X.nbytes if narrow is None else X.size * narrow.itemsize
        cache = size < 0.5 * _cluster_memory()
    if cache:
        return persist(X), True
    return X, False


# --------------------------------------------------------------------------
# row-wise maps and fingerprints
# --------------------------------------------------------------------------


def map_rows(X: da.Array, func: Callable, n_out: int | None, dtype: Any) -> da.Array:
    """Apply a row-wise function chunk by chunk, lazily (predictions, densities)."""
    if n_out is None:
        return X.map_blocks(func, drop_axis=1, dtype=dtype, meta=np.empty((0,), dtype=dtype), token="daskem-rows")
    return X.map_blocks(
        func, chunks=(X.chunks[0], (n_out,)), dtype=dtype, meta=np.empty((0, 0), dtype=dtype), token="daskem-rows"
    )


def data_fingerprint(X: da.Array) -> dict:
    """What identifies the data for a checkpoint: shape, dtype and the hash of a few
    fixed rows (first, last and evenly spaced; not counted as a pass)."""
    n = X.shape[0]
    idx = np.unique(np.linspace(0, n - 1, num=min(n, 64)).astype(np.int64))
    (rows,) = dask.compute(X[idx])
    sample = np.asarray(rows)
    return {
        "shape": list(X.shape),
        "dtype": str(X.dtype),
        "sample_sha256": hashlib.sha256(np.ascontiguousarray(sample).tobytes()).hexdigest(),
    }
