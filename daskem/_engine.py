"""The EM engine: the only module that builds Dask graphs.

One pass over the data runs the model's chunk statistics over row blocks and
sums the packed vectors in a fixed order, so that only the small summed
vector reaches the client (nothing per row ever does). Three executors, one
kernel:

* **in process** (:func:`in_process_blocks`): data already in this process's
  memory (numpy input, :func:`local_array`; data persisted without a
  distributed client) are passed over without Dask graphs
  (:func:`_local_pass`), during a fit by worker processes forked from this
  one that share its memory (:func:`local_workers`), else on a thread pool;
  with a distributed client only up to :data:`IN_PROCESS_BYTES`;
* **persisted** on a cluster (:func:`prepare_data`, :func:`_persist`): a few
  row blocks per worker thread, one task per block; once a pass over them
  takes less than a second (:data:`ACTOR_PASS_SECONDS`), one call per
  worker to a Dask actor that runs the kernel over the blocks the worker
  holds (:class:`PassActor`), without the scheduler;
* **streamed** from a store (:func:`_row_source`): one task per group of
  consecutive chunks (:func:`stream_groups`), reading them in sequence;
  other dask arrays (arbitrary graphs) are one task per chunk.

On a cluster the task vectors end in a tree ``sum`` with a configurable
fan-in or, when they are few (16 MiB together at most), are gathered and
summed on the client, which saves the last reduction level
(:func:`reduce_statistics`). The engine knows
nothing of Gaussians: it talks to a *model* (:class:`daskem._model.MixtureModel`)
that supplies the per-chunk statistics and their packing. The EM loop itself
lives in :mod:`daskem._fitloop`.

Every read of the data (a pass of statistics, a sample of rows) is counted
here, on the :class:`PassCounter` the caller hands in.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import inspect
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.reduction
import os
import signal
import sys
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import distributed
import numpy as np
import psutil
from dask.diagnostics import ProgressBar
from dask.highlevelgraph import HighLevelGraph
from distributed.diagnostics.progressbar import TextProgressBar

from ._blas import keep_forked_thread_count, single_threaded_blas
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

    def block(self, x: np.ndarray, start: int) -> np.ndarray:
        """The packed statistics (1-D) of the rows ``x``, global rows ``start:start + len(x)``."""
        mask = None
        if self.split is not None:
            mask = self.split.train_mask(start, start + x.shape[0])
        stats = self.model.statistics(x, self.params_list, mask)
        return np.concatenate([self.model.pack(s) for s in stats]) if stats else np.zeros(0)

    def __call__(self, x: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        start = block_info[0]["array-location"][0][0] if self.split is not None else 0
        return self.block(x, start)[None, :]


def _pass_task(model: MixtureModel, params_list: Sequence[Params], split: RowSplit | None) -> _PassTask:
    """A pass's task: what the model's statistics read of each parameter set (:meth:`~MixtureModel.pass_params`)."""
    return _PassTask(model, tuple(model.pass_params(p) for p in params_list), split)


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
    """The lazy statistics of one pass, one packed row per task: shape (tasks, size).

    A pass over an array read from a store through ``from_zarr``/``from_array``
    (:func:`_row_source`) is one task per group of consecutive chunks
    (:func:`stream_groups`: a small multiple of the worker threads, fixed when
    :func:`prepare_data` streams the array), each reading its chunks in
    sequence (one chunk in memory at a time) and summing their statistics in
    chunk order. Persisted data (:func:`_persist`: a few blocks per thread)
    are one task per block; where a block is a streamed group, its chunks'
    statistics are summed in the same order as streaming would. Any other
    array (an arbitrary graph) is one task per chunk.
    """
    size = sum(model.packed_size(p) for p in params_list)
    task = _pass_task(model, params_list, split)
    # every pass its own keys: a pass with the same parameters as the last one
    # (a rejected extrapolation, a re-scored fit) must not ask the scheduler for
    # keys whose futures the last pass is releasing (it logs "Couldn't gather"
    # and recomputes); the parameters are not hashed into it (67 MB for a full
    # model of D=256, K=64)
    key = "daskem-pass-params-" + uuid.uuid4().hex
    states = [model.params_state(p) for p in task.params_list]
    nbytes = sum(np.asarray(a).nbytes for arrays, _ in states for a in arrays.values())
    source = _row_source(X)
    groups = None
    if source is not None:
        groups = _stream_plans.get(X.name) or stream_groups(X.chunks[0])
    n_tasks = len(groups) if groups is not None else X.numblocks[0]
    arg: Any = task
    delayed_params = nbytes * n_tasks > INLINE_PARAMS_BYTES
    if delayed_params:
        arg = dask.delayed(task, name=key, pure=True, traverse=False)
    # the data must be part of the name: the same parameters over other data
    # (another array, another dataset) are other tasks
    name = "daskem-stats-" + dask.base.tokenize(X.name, key, groups)
    cuts = _block_cuts.get(X.name) if groups is None else None
    if cuts is not None and len(cuts) == X.numblocks[0]:
        task_arg = key if delayed_params else task
        dsk = {(name, i, 0): (_cuts_pass, k, c, task_arg) for i, ((k,), c) in enumerate(zip(X.__dask_keys__(), cuts))}
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=[X, arg] if delayed_params else [X])
        return da.Array(graph, name, chunks=((1,) * len(cuts), (size,)), dtype=np.float64)
    if groups is None:
        return X.map_blocks(
            _apply_pass,
            arg,
            chunks=((1,) * X.numblocks[0], (size,)),
            dtype=np.float64,
            meta=np.empty((0, 0), dtype=np.float64),
            name=name,
        )
    array, dtype = source
    dsk = {
        (name, g, 0): (_read_group_pass, array, cuts, dtype, key if delayed_params else task)
        for g, cuts in enumerate(groups)
    }
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[arg] if delayed_params else [])
    return da.Array(graph, name, chunks=((1,) * len(groups), (size,)), dtype=np.float64)


def _read_group_pass(array: Any, cuts: np.ndarray, dtype: Any, task: _PassTask) -> np.ndarray:
    """One streamed task: read the chunks ``cuts[i]:cuts[i + 1]`` in sequence, sum their
    statistics in order.

    One read in memory at a time (:func:`_read_units`): a chunk of the dask
    array, or a chunk of the store where the dask chunks are pieces of the
    store's chunks (each store chunk is then read once, not once per piece),
    or consecutive chunks smaller than :data:`MIN_READ_BYTES` together.
    """
    vec = None
    row_bytes = int(array.shape[1]) * np.dtype(dtype).itemsize
    for start, stop in _read_units(cuts, _store_rows(array), row_bytes):
        v = task.block(_read_rows(array, start, stop, dtype), start)
        vec = v if vec is None else vec + v
    return vec[None, :]


def _read_rows(array: Any, start: int, stop: int, dtype: Any, order: str = "C") -> np.ndarray:
    x = np.asarray(array[start:stop])
    if x.dtype != dtype:
        x = x.astype(dtype)
    return np.asfortranarray(x) if order == "F" else x


def _store_rows(array: Any) -> int | None:
    chunks = getattr(array, "chunks", None)
    if isinstance(chunks, tuple) and chunks and isinstance(chunks[0], int):
        return int(chunks[0])
    return None


#: streamed reads: consecutive chunks smaller than this are read (and passed to
#: the kernel) together, so that tiny store chunks do not cost a read call and a
#: kernel call each; a chunk larger than this is read alone
MIN_READ_BYTES = 4 * 2**20


def _read_units(cuts: np.ndarray, store_rows: int | None, row_bytes: int = 0) -> list[tuple[int, int]]:
    """The reads of a group of consecutive chunks (row ``cuts``): the chunks, or the store's
    chunks (cut to the group) when these are larger; consecutive ones merged up to
    :data:`MIN_READ_BYTES` (``row_bytes`` per row)."""
    cuts = np.asarray(cuts, dtype=np.int64)
    if store_rows and store_rows > int(np.diff(cuts).max()):
        start, stop = int(cuts[0]), int(cuts[-1])
        cuts = np.array([start, *range((start // store_rows + 1) * store_rows, stop, store_rows), stop])
    if row_bytes > 0:
        min_rows = max(1, MIN_READ_BYTES // row_bytes)
        keep = [int(cuts[0])]
        for c in cuts[1:-1].tolist():
            if c - keep[-1] >= min_rows:
                keep.append(c)
        keep.append(int(cuts[-1]))
        cuts = np.array(keep)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def _unit_cuts(cuts: np.ndarray, store_rows: int | None, row_bytes: int) -> np.ndarray:
    units = _read_units(cuts, store_rows, row_bytes)
    return np.array([u[0] for u in units] + [units[-1][1]], dtype=np.int64)


#: the groups of the streamed arrays prepared by :func:`prepare_data` (by array
#: name): fixed for a fit, so that the sums' order does not follow the workers
#: that come and go
_stream_plans: dict[str, list] = {}
#: entries kept in each of the engine's tables by array name (the oldest go first)
_STREAM_PLANS_KEPT = 64


def _remember(table: dict, name: str, value: Any) -> None:
    """``table[name] = value`` as the newest entry, the oldest dropped beyond :data:`_STREAM_PLANS_KEPT`."""
    table.pop(name, None)
    table[name] = value
    while len(table) > _STREAM_PLANS_KEPT:
        table.pop(next(iter(table)))


def _plan_stream(X: da.Array) -> None:
    if _row_source(X) is None:
        return
    _remember(_stream_plans, X.name, stream_groups(X.chunks[0]))


#: the chunk cuts inside the blocks of persisted arrays (by array name; global rows)
_block_cuts: dict[str, list] = {}


def _cuts_pass(x: np.ndarray, cuts: np.ndarray, task: _PassTask) -> np.ndarray:
    """One persisted block: the statistics of its chunks (global row ``cuts``) summed in order."""
    vec = None
    first = int(cuts[0])
    for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
        v = task.block(x[a - first : b - first], a)
        vec = v if vec is None else vec + v
    return vec[None, :]


#: streamed passes: tasks per worker thread (a few, so that a slow or busy
#: thread does not hold the pass back: the others take more groups)
STREAM_TASKS_PER_THREAD = 2


def stream_groups(chunks: Sequence[int], threads: int | None = None) -> list[np.ndarray]:
    """Consecutive row chunks cut into at most ``STREAM_TASKS_PER_THREAD * threads`` groups
    of about equal rows: each group as the row cuts of its chunks (``cuts[i]:cuts[i + 1]``
    is its ``i``-th chunk), an int64 array (small to send, whatever the chunks)."""
    threads = threads or _thread_count()
    cuts = np.concatenate([[0], np.cumsum(np.asarray(chunks, dtype=np.int64))])
    n_chunks = len(cuts) - 1
    n_groups = max(1, min(n_chunks, STREAM_TASKS_PER_THREAD * threads))
    total = max(int(cuts[-1]), 1)
    # the group of each chunk's middle row: consecutive, about equal rows each
    which = np.minimum(n_groups - 1, ((cuts[:-1] + cuts[1:]) * n_groups) // (2 * total))
    edges = np.searchsorted(which, np.arange(n_groups + 1), side="left")
    return [cuts[a : b + 1] for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _row_source(X: da.Array) -> tuple[Any, np.dtype] | None:
    """The array a dask array reads its rows from, and the dtype it casts them to, or None.

    Recognised: ``da.from_zarr(z)`` and ``da.from_array(a)`` (a Zarr array, a
    memory map; what :func:`daskem.io.open_array` builds), whole rows per
    chunk, optionally followed by one ``astype``. Anything else: None.
    """
    graph = X.__dask_graph__()
    layers = getattr(graph, "layers", None)
    if not layers or len(layers) > 3 or len(X.chunks) != 2 or len(X.chunks[1]) != 1:
        return None
    originals = [n for n in layers if n.startswith("original-") and n[len("original-") :] in layers]
    if len(originals) != 1:
        return None
    orig = originals[0]
    base = orig[len("original-") :]
    rest = [n for n in layers if n not in (orig, base)]
    if rest and (len(rest) != 1 or not rest[0].startswith("astype-") or rest[0] != X.name):
        return None
    if not rest and base != X.name:
        return None
    layer = layers[orig]
    try:
        array = layer[orig]
    except KeyError:
        return None
    if len(layer) != 1 or getattr(array, "shape", None) != tuple(X.shape) or isinstance(array, da.Array):
        return None
    if isinstance(array, np.ndarray) or not hasattr(array, "__getitem__") or getattr(array, "dtype", None) is None:
        # a numpy array (or memory map) would travel whole inside every task
        return None
    return array, X.dtype


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

    Data held in this process's memory (:func:`in_process_blocks`) are passed
    over in process, without a Dask graph (:func:`_local_pass`). Otherwise,
    with a distributed client and few enough chunks (:data:`GATHER_BYTES`),
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
    blocks = in_process_blocks(X)
    if blocks is not None:
        cuts = _block_cuts.get(X.name)
        vec = _local_pass(blocks, _pass_task(model, params_list, split), progress, cuts, X.name)
        return _unpack(vec, model, params_list)
    client = _active_client() if _uses_distributed() else None
    if client is not None and _pass_seconds.get(X.name, math.inf) < ACTOR_PASS_SECONDS:
        size = sum(model.packed_size(p) for p in params_list)
        if X.numblocks[0] * size * 8 <= GATHER_BYTES:
            t0 = time.perf_counter()
            vec = _actor_pass(client, X, _pass_task(model, params_list, split), size)
            if vec is not None:
                _remember(_pass_seconds, X.name, time.perf_counter() - t0)
                return _unpack(vec, model, params_list)
    t0 = time.perf_counter()
    parts = pass_parts(X, model, params_list, split=split)
    if client is not None and parts.shape[0] * parts.shape[1] * 8 <= GATHER_BYTES:
        with _parameters_in_the_graph():
            futures = client.compute(list(parts.to_delayed().ravel()))
        if progress:
            _progress(client, futures)
        vec = np.zeros(parts.shape[1])
        for block in client.gather(futures):
            vec += block[0]
        _remember(_pass_seconds, X.name, time.perf_counter() - t0)
    else:
        graph = parts.sum(axis=0, split_every=split_every)
        with _parameters_in_the_graph():
            vec = _compute(graph, progress) if progress else dask.compute(graph)[0]
    return _unpack(vec, model, params_list)


@contextlib.contextmanager
def _parameters_in_the_graph() -> Iterator[None]:
    """Submit a pass's graph without distributed's "Sending large graph" warning
    (every submission of :func:`pass_parts`' graph goes through it).

    Large parameters (a full model at D=256, K=64 is 67 MB) are one key of the
    pass's graph, which every chunk task depends on (:func:`pass_parts`): the
    way that warning recommends ("delayed objects to embed the data into the
    graph without repetition"), yet it fires on the graph's size alone, at
    every pass of such a fit. A scattered future would keep the parameters
    out of the graph, but could not be recomputed if the worker holding it
    were lost; a key of the graph can. (``dask.config.set`` is process-wide:
    a graph another thread submits meanwhile is not warned of either.)
    """
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1 PiB"}):
        yield


# --------------------------------------------------------------------------
# short passes over persisted data: straight to the workers
# --------------------------------------------------------------------------

#: A pass over data persisted on a cluster whose previous pass took less than this
#: many seconds goes straight to the workers that hold the blocks, one call to a
#: :class:`PassActor` (a Dask actor) per worker, instead of through the scheduler as
#: tasks. The scheduler's part of a pass (graph, task states, batched messages) is
#: about 15-25 ms whatever the data (a pass over 4,096 rows on two workers took
#: 24 ms as tasks, 8-10 ms through actors; 1e6 x 16, K=8 full: 200 -> 177 ms),
#: which matters when passes are short: persisted data that fit in the workers'
#: memory. Longer passes stay tasks (what the dashboard's task stream shows, with
#: a progress bar), where those milliseconds are noise. The blocks' vectors are
#: summed on the client in block order, as the gathered task vectors are: the same
#: bits either way. A block that is not in its worker's memory (moved, spilled,
#: lost) is computed as a task; a call that fails (a worker lost) makes the pass
#: one of tasks, which the scheduler recomputes as always.
ACTOR_PASS_SECONDS = 1.0

#: seconds an actor may take to start (one task on its worker) before the pass is made of tasks
ACTOR_START_SECONDS = 30.0

#: failed actor passes in a row (per client) after which its passes stay tasks
ACTOR_FAILURES = 2

#: passes made through actors so far, and actor passes that failed and were made of
#: tasks instead (this process): what tests count
actor_passes = PassCounter()
actor_fallbacks = PassCounter()

#: the last pass's seconds, the block placement, by array name
_pass_seconds: dict[str, float] = {}
_placement: dict[str, dict[str, list[int]]] = {}
#: the actors of each client (by worker address), and the client's failed calls
_actors: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_actor_failures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class PassActor:
    """A worker's share of a pass over persisted blocks, as a Dask actor (see :data:`ACTOR_PASS_SECONDS`)."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def blocks(self, items: list[tuple[int, Any, Any]], task: _PassTask) -> list[tuple[int, np.ndarray | None]]:
        """``(index, vector)`` of every ``(index, key, where)``: the block ``key``'s packed
        statistics as its task computes them (``where``: the chunk cuts inside the block,
        or its first global row); ``None`` for a block not in this worker's memory."""
        worker = distributed.get_worker()
        # only what is in memory: a spilled block is left to a task (the worker's own
        # machinery reads it back), so this thread never changes the worker's data
        data = getattr(worker.data, "fast", worker.data)

        def one(item: tuple[int, Any, Any]) -> tuple[int, np.ndarray | None]:
            i, key, where = item
            try:
                x = data[key]
            except KeyError:
                return i, None
            if isinstance(where, np.ndarray):
                return i, _cuts_pass(x, where, task)[0]
            return i, task.block(x, int(where))

        threads = int(getattr(worker.state, "nthreads", 1) or 1)
        if threads <= 1 or len(items) <= 1:
            return [one(item) for item in items]
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="daskem-actor")
        return list(self._pool.map(one, items))


def _worker_actors(client: Any, addresses: Sequence[str]) -> dict[str, Any]:
    """One :class:`PassActor` on each of ``addresses``, made once per client."""
    actors = _actors.setdefault(client, {})
    new = [a for a in addresses if a not in actors]
    if new:
        futures = [
            client.submit(PassActor, actor=True, workers=[a], allow_other_workers=False, pure=False) for a in new
        ]
        try:
            # a worker lost since the placement was read would leave its actor waiting forever
            distributed.wait(futures, timeout=ACTOR_START_SECONDS)
        except distributed.TimeoutError:
            client.cancel(futures)
            raise
        for a, actor in zip(new, client.gather(futures)):
            actors[a] = actor
    return {a: actors[a] for a in addresses}


def _actor_pass(client: Any, X: da.Array, task: _PassTask, size: int) -> np.ndarray | None:
    """One pass over persisted ``X`` through :class:`PassActor` calls (summed in block
    order, as :func:`reduce_statistics` sums gathered task vectors); None when ``X`` is
    not persisted on the cluster or a call failed (the pass is then made of tasks)."""
    if _actor_failures.get(client, 0) >= ACTOR_FAILURES:
        return None
    # persisted on the cluster: every block is a future
    futures = _block_values(X, distributed.Future)
    if futures is None:
        return None
    n = len(futures)
    cuts = _block_cuts.get(X.name)
    if cuts is not None and len(cuts) == n:
        where: list[Any] = list(cuts)
    else:
        where = np.cumsum([0] + list(X.chunks[0][:-1])).tolist()
    parts: list[np.ndarray | None] = [None] * n
    try:
        placement = _placement.get(X.name)
        if placement is None:
            distributed.wait(futures)
            who = client.who_has(futures)
            placement = {}
            for i, f in enumerate(futures):
                if who.get(f.key):
                    placement.setdefault(who[f.key][0], []).append(i)
            _remember(_placement, X.name, placement)
        actors = _worker_actors(client, sorted(placement))
        calls = [actors[a].blocks([(i, futures[i].key, where[i]) for i in idx], task) for a, idx in placement.items()]
        for call in calls:
            for i, vec in call.result():
                parts[i] = vec
    except Exception:  # a lost worker or actor, a refused connection: this pass is made of tasks
        _actors.pop(client, None)
        _placement.pop(X.name, None)
        _actor_failures[client] = _actor_failures.get(client, 0) + 1
        _count(actor_fallbacks)
        return None
    missing = [i for i, vec in enumerate(parts) if vec is None]
    if missing:
        # blocks not where they were (moved, spilled, recomputed elsewhere): as tasks
        _placement.pop(X.name, None)
        delayed = pass_parts(X, task.model, task.params_list, split=task.split).to_delayed().ravel()
        with _parameters_in_the_graph():
            futures = client.compute([delayed[i] for i in missing])
        for i, block in zip(missing, client.gather(futures)):
            parts[i] = block[0]
    _actor_failures[client] = 0
    _count(actor_passes)
    vec = np.zeros(size)
    for part in parts:
        vec += part
    return vec


def _unpack(vec: np.ndarray, model: MixtureModel, params_list: Sequence[Params]) -> list:
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
# in process: data in this process's memory, passes without Dask graphs
# --------------------------------------------------------------------------

#: With a distributed client active, in-memory (numpy) input up to this size is
#: fitted in process all the same; larger input is persisted on the cluster.
#: Measured (benchmarks/README.md, "In process"): a pass on a 2-worker
#: LocalCluster costs about 10-25 ms more than the same pass in process,
#: whatever the data; at 64 MiB a full D=16 K=8 pass takes about 0.1 s on two
#: cores, so the cluster's overhead is about 10% of a pass there and shrinks
#: beyond, while a larger cluster's cores start to pay.
IN_PROCESS_BYTES = 64 * 2**20

#: In-process row blocks: at most this many bytes each (then as many blocks as
#: threads, or a multiple), and no block under ``MIN_BLOCK_ROWS`` rows: a
#: small array is one block, computed in the calling thread.
LOCAL_BLOCK_BYTES = 32 * 2**20
MIN_BLOCK_ROWS = 4096

_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
# a forked child has the pools but not their threads: it starts its own
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pools.clear)


def _thread_count() -> int:
    """Threads of a pass: the distributed cluster's, else Dask's ``num_workers`` or the cores."""
    if _uses_distributed() and _active_client() is not None:
        slots = _worker_slots()
        if slots:
            return len(slots)
    return _local_threads()


def _local_threads() -> int:
    """Threads of an in-process pass: 1 for Dask's synchronous scheduler, else its
    ``num_workers`` setting, else the cores this process may use."""
    if dask.config.get("scheduler", None) in ("sync", "synchronous", "single-threaded"):
        return 1
    n = dask.config.get("num_workers", None)
    return max(1, int(n)) if n else max(1, int(dask.system.CPU_COUNT))


def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="daskem-pass")
        return pool


def local_map(
    fn: Callable[[Any], Any], items: Sequence[Any], name: str | None = None, *, holds_gil: bool = False
) -> list[Any]:
    """``fn(item)`` for every item, in item order, BLAS single-threaded in each.

    In the worker processes of :func:`local_workers` when the array ``name``
    has them (``fn`` and the items are pickled to them: a module-level
    function or a :func:`functools.partial` of one), else on the in-process
    pass's thread pool (:func:`_local_threads` threads); in the calling
    thread when there is one thread or one item, or when ``holds_gil`` says
    that threads would only take turns.
    """
    threads = _local_threads()
    workers = _forked.get(name) if name is not None else None
    if workers is not None and len(items) > 1:
        return workers.map(fn, items)
    if threads == 1 or len(items) <= 1 or holds_gil:
        with single_threaded_blas():
            return [fn(x) for x in items]

    def one(x: Any) -> Any:
        with single_threaded_blas():
            return fn(x)

    futures = [_pool(threads).submit(one, x) for x in items]
    return [f.result() for f in futures]


def local_row_chunks(n_rows: int, row_bytes: int, threads: int | None = None) -> tuple[int, ...]:
    """Row blocks of an in-process array: equal, a multiple of the threads, at most
    :data:`LOCAL_BLOCK_BYTES` each, none under :data:`MIN_BLOCK_ROWS` rows (one
    block for a small array)."""
    threads = threads or _local_threads()
    n_blocks = threads * max(1, math.ceil(n_rows * row_bytes / (threads * LOCAL_BLOCK_BYTES)))
    n_blocks = max(1, min(n_blocks, n_rows // MIN_BLOCK_ROWS))
    base, extra = divmod(n_rows, n_blocks)
    return tuple(base + (1 if i < extra else 0) for i in range(n_blocks))


def local_array(x: np.ndarray, chunks: Sequence[int] | None = None) -> da.Array:
    """A dask array whose blocks are views of ``x`` (no copy), held in this process.

    Its passes run in process (:func:`in_process_blocks`); as a dask array it
    can still be persisted on a cluster.
    """
    if chunks is None:
        chunks = local_row_chunks(x.shape[0], x.shape[1] * x.dtype.itemsize)
    return _blocks_array([b for b in _split_rows(x, chunks)], x.shape[1], x.dtype)


def _split_rows(x: np.ndarray, chunks: Sequence[int]) -> list[np.ndarray]:
    out, pos = [], 0
    for c in chunks:
        out.append(x[pos : pos + c])
        pos += c
    return out


def _blocks_array(blocks: Sequence[np.ndarray], n_cols: int, dtype: Any) -> da.Array:
    name = "daskem-local-" + uuid.uuid4().hex
    dsk = {(name, i, 0): b for i, b in enumerate(blocks)}
    chunks = (tuple(int(b.shape[0]) for b in blocks), (int(n_cols),))
    return da.Array(HighLevelGraph.from_collections(name, dsk, dependencies=()), name, chunks, dtype=dtype)


def local_blocks(X: da.Array) -> list[np.ndarray] | None:
    """The blocks of ``X`` when every one is a numpy array held in this process
    (:func:`local_array`, or an array persisted with a local scheduler), else None."""
    return _block_values(X, np.ndarray)


def _block_values(X: da.Array, kind: type) -> list | None:
    """The graph's value of each row block of ``X`` (whole rows) when every one is a
    ``kind`` (a numpy array, a future of a persisted block), else None."""
    if len(X.chunks) != 2 or len(X.chunks[1]) != 1:
        return None
    graph = X.__dask_graph__()
    if len(graph) != X.numblocks[0]:
        return None
    values = []
    for (key,) in X.__dask_keys__():
        value = graph.get(key)
        if not isinstance(value, kind):
            return None
        values.append(value)
    return values


def in_process_blocks(X: da.Array) -> list[np.ndarray] | None:
    """The blocks of ``X`` if its passes run in process, else None.

    In process: data held in this process's memory (:func:`local_blocks`)
    when no distributed client computes (Dask's local schedulers), or when
    they are at most :data:`IN_PROCESS_BYTES`.
    """
    blocks = local_blocks(X)
    if blocks is None:
        return None
    if _uses_distributed() and _active_client() is not None and X.nbytes > IN_PROCESS_BYTES:
        return None
    return blocks


def _local_pass(
    blocks: Sequence[np.ndarray], task: _PassTask, progress: bool, cuts: list | None = None, name: str | None = None
) -> np.ndarray:
    """One pass in process: the blocks' statistics in parallel, summed in block order.

    Consecutive blocks are grouped (a few groups per thread), each group's
    statistics summed in block order, the groups' sums in group order here:
    the result does not depend on timing, nor on where the groups ran. The
    groups run in the worker processes of :func:`local_workers` when the
    array ``name`` has them (a fit), else on a thread pool. BLAS runs
    single-threaded in each thread or process
    (:func:`daskem._blas.single_threaded_blas`), as in Dask's threaded scheduler.
    """
    starts = np.cumsum([0] + [b.shape[0] for b in blocks[:-1]]).tolist()
    if cuts is None or len(cuts) != len(blocks):
        cuts = [np.array([s, s + b.shape[0]]) for s, b in zip(starts, blocks)]
    threads = _local_threads()
    if threads == 1 or len(blocks) == 1:
        return _local_group(blocks, cuts, task, range(len(blocks)))
    groups = stream_groups([b.shape[0] for b in blocks], threads)
    index, i = [], 0
    for group in groups:
        index.append(range(i, i + len(group) - 1))
        i += len(group) - 1
    workers = _forked.get(name) if name is not None else None
    if workers is not None and workers.n_blocks == len(blocks):
        return workers.run(cuts, task, index, progress)
    pool = _pool(threads)
    futures = [pool.submit(_local_group, blocks, cuts, task, idx) for idx in index]
    if progress:
        _local_progress(futures)
    vec = None
    for f in futures:
        v = f.result()
        vec = v if vec is None else vec + v
    return vec


def _local_group(blocks: Sequence[np.ndarray], cuts: Sequence[np.ndarray], task: _PassTask, idx: range) -> np.ndarray:
    vec = None
    with single_threaded_blas():
        for i in idx:
            v = _cuts_pass(blocks[i], cuts[i], task)[0]
            vec = v if vec is None else vec + v
    return vec


# --------------------------------------------------------------------------
# in process, in forked worker processes
# --------------------------------------------------------------------------

#: In-process passes of a fit (:func:`local_workers`) run in worker processes
#: forked from this one, which share its memory (the data are not copied):
#: the chunk kernel is many short numpy calls, and threads of one process take
#: turns on the GIL between them. Measured on 2 cores, 1e6 x 16 rows, K=8, one
#: pass: two threads 0.254 s (full) and 0.093 s (diag), one thread 0.300 and
#: 0.087, two forked processes 0.150 and 0.045. Where ``fork`` is not the
#: platform's way (Windows, macOS) or ``DASKEM_FORK=0``, passes use threads.
FORK_ENV = "DASKEM_FORK"

#: worker processes of the fits running now, by the name of their array
_forked: dict[str, _ForkedWorkers] = {}


def _fork_available() -> bool:
    return (
        sys.platform.startswith("linux")
        and "fork" in multiprocessing.get_all_start_methods()
        and os.environ.get(FORK_ENV, "1") != "0"
        # a daemonic process (e.g. a Dask worker's) may not have children
        and not multiprocessing.current_process().daemon
    )


@contextlib.contextmanager
def local_workers(X: da.Array) -> Iterator[None]:
    """While the body runs, in-process passes over ``X`` run in forked worker processes.

    Used by a fit: ``X``'s blocks (:func:`in_process_blocks`) are shared with
    :func:`_local_threads` processes forked on entry and stopped on exit
    (also on an error or Ctrl-C); :func:`local_map` with ``X.name`` runs
    there too. For data of one block the processes are forked at the first
    :func:`local_map`, not before. Nothing happens for data that are not held
    in this process, or with one thread, or where :func:`_fork_available`
    says no.
    """
    blocks = in_process_blocks(X)
    threads = _local_threads()
    if blocks is None or threads < 2 or X.name in _forked or not _fork_available():
        yield
        return
    workers = _ForkedWorkers(blocks, threads)
    if len(blocks) > 1:
        # forked now: their start overlaps the fit's initialisation
        workers.start()
    # else forked at the first :func:`local_map` (one block: the passes run in
    # this process)
    _forked[X.name] = workers
    try:
        yield
    finally:
        _forked.pop(X.name, None)
        workers.close()


def _forked_main(
    conn: multiprocessing.connection.Connection, blocks: Sequence[np.ndarray], parent: int, others: list
) -> None:
    """A forked worker: run the groups it is sent over the inherited blocks (or the
    function and items of a :func:`local_map`) until told to stop."""
    # keep only our own pipe end: a worker must see EOF when the parent goes
    for c in others:
        c.close()
    # Ctrl-C reaches the whole process group: the parent handles it and stops us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a SIGTERM handler of the parent's (an application's shutdown) is not ours: terminate() ends us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # forked with one BLAS thread (:meth:`_ForkedWorkers.start`): keep it without
    # starting OpenBLAS's thread pool, whose threads would spin
    keep_forked_thread_count()
    while True:
        # a parent killed outright may leave the pipe open elsewhere: look
        while not conn.poll(1.0):
            if os.getppid() != parent:
                return
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        kind, payload, share = msg
        try:
            # one BLAS thread: the one inherited (:func:`keep_forked_thread_count`)
            if kind == "map":
                out = [("ok", payload(x)) for x in share]
            else:
                cuts, task = payload
                out = [("ok", _local_group(blocks, cuts, task, idx)) for idx in share]
        except Exception as exc:  # noqa: BLE001 - sent to the parent, raised there
            out = [("error", exc)]
        try:
            conn.send(out)
        except Exception as exc:  # noqa: BLE001 - an exception that does not pickle
            conn.send([("error", RuntimeError(f"in a daskem pass worker process: {exc!r}"))])


class _ForkedWorkers:
    """Worker processes forked from this one, each seeing the blocks in shared memory.

    Forked by :meth:`start` (or the first :meth:`run` or :meth:`map`).
    """

    def __init__(self, blocks: Sequence[np.ndarray], n: int) -> None:
        self.blocks = blocks
        self.n = n
        self.n_blocks = len(blocks)
        self.conns: list = []
        self.procs: list = []

    def start(self) -> None:
        if self.procs:
            return
        ctx = multiprocessing.get_context("fork")
        pipes = [ctx.Pipe() for _ in range(self.n)]
        self.conns = [a for a, _ in pipes]
        parent = os.getpid()
        for i, (_, b) in enumerate(pipes):
            proc = ctx.Process(
                target=_forked_main,
                args=(b, self.blocks, parent, [c for pair in pipes for c in pair if c is not b]),
                name=f"daskem-pass-{i}",
                daemon=True,
            )
            # the child inherits this thread's one BLAS thread (:func:`keep_forked_thread_count`)
            with warnings.catch_warnings(), single_threaded_blas():
                # Python >= 3.12 warns on any fork of a process with threads; the
                # workers run only numpy on the inherited blocks and pipe I/O
                warnings.filterwarnings(
                    "ignore", message=r".*fork\(\) may lead to deadlocks", category=DeprecationWarning
                )
                proc.start()
            self.procs.append(proc)
        for _, b in pipes:
            b.close()

    def _round_robin(self, kind: str, payload: Any, items: Sequence[Any], bar: _LocalBar | None) -> list:
        """Every item's answer, in item order: the items dealt round-robin over the
        workers, each sent ``(kind, payload, its items)``; every worker's answer is
        read before a worker's exception is raised here."""
        self.start()
        shares = [list(range(w, len(items), self.n)) for w in range(self.n)]
        shares = [idx for idx in shares if idx]
        # pickled before any is sent: a message that does not pickle (a lambda
        # given to :func:`local_map`) must not leave answers to the others unread
        payloads = [
            multiprocessing.reduction.ForkingPickler.dumps((kind, payload, [items[i] for i in idx])) for idx in shares
        ]
        pending = {}
        for conn, data in zip(self.conns, payloads):
            conn.send_bytes(data)
            pending[conn] = len(pending)
        answers: dict[int, list] = {}
        errors: list[BaseException] = []
        while pending:
            ready = multiprocessing.connection.wait(list(pending), timeout=0.1)
            for conn in ready:
                w = pending.pop(conn)
                try:
                    out = conn.recv()
                except EOFError:
                    raise RuntimeError("a daskem pass worker process died (out of memory?)") from None
                # the next call must not read this one's answers
                errors += [value for tag, value in out if tag == "error"]
                answers[w] = [value for _, value in out]
            if bar is not None:
                bar.update(sum(map(len, answers.values())) / len(items))
        if bar is not None:
            bar.close()
        if errors:
            raise errors[0]
        results = {i: v for w, idx in enumerate(shares) for i, v in zip(idx, answers[w])}
        return [results[i] for i in range(len(items))]

    def run(self, cuts: list, task: _PassTask, index: list[range], progress: bool) -> np.ndarray:
        """The groups ``index`` (consecutive, a few per worker), summed in group order."""
        vec = None
        for v in self._round_robin("pass", (cuts, task), index, _LocalBar() if progress else None):
            vec = v if vec is None else vec + v
        return vec

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``fn(item)`` for every item (round-robin over the workers), in item order."""
        return self._round_robin("map", fn, items, None)

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(timeout=1.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=1.0)
        for conn in self.conns:
            conn.close()


class _LocalBar:
    """A progress bar on stderr for an in-process pass, shown once the pass takes more than ``minimum`` seconds."""

    def __init__(self, minimum: float = 1.0) -> None:
        self.t0 = time.perf_counter()
        self.minimum = minimum
        self.shown = False

    def update(self, frac: float) -> None:
        elapsed = time.perf_counter() - self.t0
        if self.shown or elapsed >= self.minimum:
            sys.stderr.write(f"\r[{'#' * int(40 * frac):<40}] | {100 * frac:3.0f}% Completed | {elapsed:4.1f}s")
            self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _local_progress(futures: list) -> None:
    """:class:`_LocalBar` over the futures of a threaded in-process pass."""
    bar = _LocalBar()
    while True:
        done, _ = concurrent.futures.wait(futures, timeout=0.1)
        bar.update(len(done) / len(futures))
        if len(done) == len(futures):
            break
    bar.close()


def _local_rows(blocks: Sequence[np.ndarray], idx: np.ndarray) -> np.ndarray:
    """The rows ``idx`` (sorted global indices) of in-process blocks."""
    starts = np.cumsum([0] + [b.shape[0] for b in blocks])
    which = np.searchsorted(starts, idx, side="right") - 1
    parts = [blocks[j][idx[which == j] - starts[j]] for j in np.unique(which)]
    if not parts:
        return np.empty((0, blocks[0].shape[1]), dtype=blocks[0].dtype)
    return np.concatenate(parts)


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
    blocks = in_process_blocks(X)
    if blocks is not None:
        return np.asarray(_local_rows(blocks, idx), dtype=np.float64)
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


#: Persisted data: at most this many blocks per worker thread (each pass is one
#: task per block; two per thread leave the last cut of a store room to balance).
PERSIST_BLOCKS_PER_THREAD = 2


def persist_row_chunks(chunks: Sequence[int], threads: int) -> tuple[int, ...] | None:
    """The row chunks to persist ``chunks`` in, or None to keep them.

    Balanced over ``threads`` (:func:`balanced_row_chunks`), and no more than
    :data:`PERSIST_BLOCKS_PER_THREAD` per thread: a pass over persisted data is
    one task per block, so that its scheduling does not grow with the chunks.
    """
    chunks = tuple(int(c) for c in chunks)
    threads = max(1, int(threads))
    rows = balanced_row_chunks(chunks, threads)
    current = rows if rows is not None else chunks
    limit = PERSIST_BLOCKS_PER_THREAD * threads
    if len(current) > limit:
        n = sum(chunks)
        total = min(n, limit)
        base, extra = divmod(n, total)
        rows = tuple(base + (1 if i < extra else 0) for i in range(total))
    return rows


#: Byte boundary the persisted blocks start on (a cache line; AVX-512's vector width).
ALIGN_BYTES = 64


def fresh_copy(x: np.ndarray, boundary: int = ALIGN_BYTES) -> np.ndarray:
    """A copy of ``x`` in memory of its own, starting on a ``boundary``-byte boundary
    (same shape, dtype and memory order).

    A numpy block sent to a worker inside a task is rebuilt there as a view of the
    received bytes. Measured on two worker processes, four persisted 250,000 x 16
    float64 blocks, each timed alone (min of 5 full-kernel calls): 96, 104, 80 and 102 ms
    as received (two of them 37 and 39 bytes off an 8-byte boundary, one aligned but as
    slow), 78-80 ms each on a copy.
    """
    buf = np.empty(x.nbytes + boundary, dtype=np.uint8)
    start = -buf.ctypes.data % boundary
    order = "F" if x.flags.f_contiguous and not x.flags.c_contiguous else "C"
    out = buf[start : start + x.nbytes].view(x.dtype).reshape(x.shape, order=order)
    out[...] = x
    return out


def _read_blocks(X: da.Array, rows: Sequence[int], source: tuple[Any, Any], order: str) -> da.Array:
    """``X`` in row chunks ``rows``, each read from ``X``'s store by one task (one chunk
    of memory beyond the block), cast and laid out as the persisted copy wants."""
    array, dtype = source
    name = "daskem-persist-" + dask.base.tokenize(X.name, tuple(rows), str(dtype), order)
    dsk, pos = {}, 0
    for i, c in enumerate(rows):
        dsk[(name, i, 0)] = (_read_rows, array, pos, pos + c, dtype, order)
        pos += c
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    return da.Array(graph, name, chunks=(tuple(rows), (X.shape[1],)), dtype=dtype)


def _persist(X: da.Array, order: str = "C", narrow: Any = None) -> da.Array:
    """Persist ``X`` on the cluster, every worker thread holding the same number of rows.

    The rows are first cut into a few chunks per thread that balance the
    threads (:func:`persist_row_chunks`: at most
    :data:`PERSIST_BLOCKS_PER_THREAD` per thread, so that a pass is O(threads)
    tasks whatever the store's chunking) and laid out in ``order`` (``"F"``:
    column-major chunks, whose transposed blocks, the kernel's layout, are
    contiguous), cast to ``narrow`` if given. An array read from a store
    (:func:`_row_source`) is read block by block, one task per block reading
    its store chunks in sequence. Then runs of consecutive chunks are
    computed on each worker in turn, as many per worker as it has threads.
    The scheduler's own placement left 3 of 4 chunks on one of two workers in
    about half of the benchmark's runs, and every pass then took as long as
    that worker's 3 chunks. The placement is a preference, not a rule
    (``allow_other_workers``): chunks lost with a worker are recomputed on
    the others. Without a distributed client the data are persisted in this
    process (the passes then run in process, :func:`in_process_blocks`).
    """
    client = _active_client() if _uses_distributed() else None
    slots = _worker_slots() if client is not None else []
    threads = len(slots) if client is not None else _local_threads()
    cuts = None
    if balanced_row_chunks(X.chunks[0], threads) is None and len(X.chunks[0]) > PERSIST_BLOCKS_PER_THREAD * threads:
        # balanced already: each block is a streamed pass's group of chunks, and a pass
        # over it sums the chunks' statistics in the same order (the same bits as streaming)
        groups = stream_groups(X.chunks[0], threads)
        rows = tuple(int(c[-1] - c[0]) for c in groups)
        cuts = groups
    else:
        rows = persist_row_chunks(X.chunks[0], threads)
    source = _row_source(X)
    if cuts is not None and source is not None:
        # summed by the units a streamed pass reads: the same bits with cache=True and False
        store_rows, row_bytes = _store_rows(source[0]), X.shape[1] * X.dtype.itemsize
        cuts = [_unit_cuts(c, store_rows, row_bytes) for c in cuts]
    else:
        cuts = None  # one kernel call per block
    if source is not None and (rows is not None or narrow is not None or order == "F"):
        dtype = narrow if narrow is not None else X.dtype
        X = _read_blocks(X, rows if rows is not None else X.chunks[0], (source[0], dtype), order)
    else:
        if narrow is not None:
            X = X.astype(narrow)
        if rows is not None:
            X = X.rechunk({0: rows, 1: X.shape[1]})
        if order == "F":
            X = X.map_blocks(np.asfortranarray, dtype=X.dtype)
    if client is not None and source is None:
        # not read from a store by the workers (numpy input, any other graph): a block that
        # crossed the wire is a view of the received bytes; one copy, once
        X = X.map_blocks(fresh_copy, dtype=X.dtype)
    if cuts is not None:
        _remember(_block_cuts, X.name, cuts)
    if client is None or len(set(slots)) <= 1:
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


#: In process, the diagonal kernels' column-major layout (``order="F"``) is a copy of
#: the user's rows only from this many columns (a float32 cast is a copy anyway, laid
#: out so). The kernel transposes each block of rows; from row-major rows that read
#: costs, per 2048-row block (one thread, us, from column-major / row-major): D=16
#: 13 / 34, D=64 55 / 160, D=128 108 / 499, D=256 215 / 2,033, while the copy costs
#: about 90-340 (D=16), 510 (D=128) and 1,550 (D=256) ns a row. So at D=16 the copy pays
#: back after some 20-70 passes (a default fit of 1e6 x 16 K=8 diag, 4 passes: 0.72 s
#: with it, 0.43 s without, in turn over 5 seeds), at D=128 after about 5 and at D=256
#: after about 3 (2e5 x 256 K=64 diag, 6 passes: 4.36 s with it, 4.84 s without).
LOCAL_F_MIN_COLUMNS = 128


def _local_copy(X: da.Array, narrow: Any, order: str) -> da.Array:
    """In-process blocks cast to ``narrow`` (if given) and laid out in ``order``: a copy, in this process."""
    layout = "F" if order == "F" else "C"
    blocks = [b.astype(narrow if narrow is not None else b.dtype, order=layout) for b in local_blocks(X) or []]
    return _blocks_array(blocks, X.shape[1], narrow if narrow is not None else X.dtype)


def prepare_data(
    X: da.Array, cache: bool | str = "auto", in_memory: bool = False, dtype: Any = None, order: str = "C"
) -> tuple[da.Array, bool]:
    """Persist ``X`` once when it fits (``cache='auto'``) or when asked; else stream.

    Returns the array to iterate over and whether it was persisted (or copied).

    In-memory input (``in_memory``: numpy, wrapped by :func:`local_array`) is
    passed over in process, without Dask graphs (:func:`in_process_blocks`),
    when no distributed client is active or when it is at most
    :data:`IN_PROCESS_BYTES`; larger in-memory input is sent to the cluster's
    workers once (persisted) when a client is active. In process, a cast
    (``dtype``) copy is made once, laid out in ``order``, when ``cache``
    allows it (it fits in half the free memory with ``"auto"``), else the
    blocks are views of the input and are cast block by block. Without a
    cast, a column-major copy for ``order="F"`` is made only for data of at
    least :data:`LOCAL_F_MIN_COLUMNS` columns, where it pays within a few
    passes; narrower data are passed over as they are.

    Other data are persisted when they fit (``cache='auto'``): on the
    cluster with a distributed client, else in this process (the passes then
    run in process). Persisted data are cut into a few row blocks per worker
    thread that balance the threads (:func:`persist_row_chunks`); streamed
    data keep the store's chunks, read by one task per group of consecutive
    chunks (:func:`pass_parts`).

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
    size = X.nbytes if narrow is None else X.size * narrow.itemsize

    def persist(X: da.Array) -> da.Array:
        return _persist(X, order, narrow)

    if in_memory:
        if in_process_blocks(X) is None:
            if _active_client() is not None:
                return persist(X), True
            return X, False
        if (narrow is not None or (order == "F" and X.shape[1] >= LOCAL_F_MIN_COLUMNS)) and (
            cache is True or (cache == "auto" and size < 0.5 * psutil.virtual_memory().available)
        ):
            return _local_copy(X, narrow, order), True
        return X, False
    if cache == "auto":
        cache = size < 0.5 * _cluster_memory()
    if cache:
        return persist(X), True
    _plan_stream(X)
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
    blocks = in_process_blocks(X)
    if blocks is not None:
        sample = np.asarray(_local_rows(blocks, idx))
    else:
        (rows,) = dask.compute(X[idx])
        sample = np.asarray(rows)
    return {
        "shape": list(X.shape),
        "dtype": str(X.dtype),
        "sample_sha256": hashlib.sha256(np.ascontiguousarray(sample).tobytes()).hexdigest(),
    }
