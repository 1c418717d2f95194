"""The EM engine: the only module that builds Dask graphs.

One pass over the data is one ``map_blocks`` (every chunk computes the packed
statistics of every live run) followed by a tree ``sum`` with a configurable
fan-in, so that only the small summed vector reaches the client; on a
distributed cluster, when the chunk vectors are few (16 MiB together at
most), they are gathered and summed on the client instead, which saves the
last reduction level (:func:`reduce_statistics`). Nothing per row ever
reaches the client. The engine knows
nothing of Gaussians: the *model* object (:class:`daskem._gaussian.MixtureModel`)
supplies the per-chunk statistics, their packing, the M-step, the re-seeding
of empty components and the (de)serialisation of parameters.

The EM loop advances every run (restarts, candidate K values) together, so
one read of each chunk per iteration serves all of them; a run that has
converged drops out of the next pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from .io import InputError, atomic_savez, atomic_write_text

DEFAULT_SPLIT_EVERY = 8

Model = Any  # daskem._gaussian.MixtureModel or anything with the same hooks
Params = Any


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
    model: Model
    params_list: tuple
    split: RowSplit | None

    def __call__(self, x: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        mask = None
        if self.split is not None:
            start, stop = block_info[0]["array-location"][0]
            mask = self.split.train_mask(start, stop)
        stats = self.model.statistics(x, self.params_list, mask)
        out = np.concatenate([s.pack() for s in stats]) if stats else np.zeros(0)
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
    model: Model,
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
    model: Model,
    params_list: Sequence[Params],
    *,
    split: RowSplit | None = None,
    split_every: int = DEFAULT_SPLIT_EVERY,
) -> da.Array:
    """The lazy summed statistics vector of one pass (all runs packed): a tree ``sum``."""
    return pass_parts(X, model, params_list, split=split).sum(axis=0, split_every=split_every)


def reduce_statistics(
    X: da.Array,
    model: Model,
    params_list: Sequence[Params],
    *,
    split: RowSplit | None = None,
    split_every: int = DEFAULT_SPLIT_EVERY,
    progress: bool = False,
) -> list:
    """One pass over ``X``: the summed statistics of every parameter set.

    With a distributed client and few enough chunks (:data:`GATHER_BYTES`),
    the chunk vectors come to the client and are summed there in chunk
    order; otherwise the pass ends in a tree ``sum`` with fan-in
    ``split_every``. Both orders are fixed, so that a re-run chunk (a lost
    worker) gives the same bits. With ``progress``, a progress bar is shown on
    stderr for passes that take more than a second (distributed's bar when a
    ``Client`` is active).

    Raises
    ------
    InputError
        If the data hold NaN or infinite values and ``model.missing`` is
        ``"error"``.
    """
    if not params_list:
        return []
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
    if out and out[0].n_bad and model.missing == "error":
        raise InputError(
            f"the data hold NaN or infinite values in {int(out[0].n_bad)} rows; "
            "clean them, or fit with missing='marginalize' to use the observed entries"
        )
    return out


def _active_client() -> Any:
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _uses_distributed() -> bool:
    """Whether ``dask.compute`` goes to the active distributed client."""
    return dask.config.get("scheduler", None) in (None, "dask.distributed", "distributed")


def _progress(client: Any, futures: list) -> None:
    import contextlib
    import sys

    from distributed.diagnostics.progressbar import TextProgressBar

    with contextlib.redirect_stdout(sys.stderr):
        TextProgressBar(futures, scheduler=client.scheduler.address, complete=True)


def _compute(graph: da.Array, progress: bool) -> np.ndarray:
    """Compute on the active scheduler, with a progress bar on stderr."""
    import sys

    client = _active_client()
    if client is not None and _uses_distributed():
        fut = client.compute(graph)
        _progress(client, [fut])
        return fut.result()
    from dask.diagnostics import ProgressBar

    with ProgressBar(minimum=1.0, out=sys.stderr):
        return dask.compute(graph)[0]


# --------------------------------------------------------------------------
# sampling rows out-of-core
# --------------------------------------------------------------------------


def sample_rows(X: da.Array, n: int, seed: int, split: RowSplit | None = None) -> np.ndarray:
    """``n`` rows drawn without replacement, the same rows whatever the chunking.

    With a ``split``, the held-out rows among them are dropped (so slightly
    fewer than ``n`` come back): initialisation never sees validation rows.
    """
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
    import psutil

    return float(psutil.virtual_memory().available)


def _accepts_n_workers(client: Any) -> bool:
    import inspect

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
# the EM loop
# --------------------------------------------------------------------------


@dataclass
class Run:
    """One EM run (a restart, for one K). Mutable bookkeeping on the client."""

    params: Params
    tag: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    done: bool = False
    lower_bound: float = -math.inf
    n_reseeds: int = 0


@dataclass
class IterationInfo:
    """What a progress callback receives after each pass."""

    iteration: int
    runs: list
    seconds: float
    n_live: int
    advanced: list = field(default_factory=list)


class Checkpoint:
    """Atomic per-iteration state of every run, refused for other data or options."""

    def __init__(self, path: str | Path, fingerprint: dict, model: Model):
        self.path = Path(path)
        self.model = model
        self.fingerprint = fingerprint
        self.digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()

    def save(self, runs: Sequence[Run], stage: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        meta_runs = []
        for i, r in enumerate(runs):
            p_arrays, p_meta = self.model.params_state(r.params)
            for name, a in p_arrays.items():
                arrays[f"run{i}_{name}"] = a
            meta_runs.append(
                {
                    "params": p_meta,
                    "arrays": sorted(p_arrays),
                    "tag": r.tag,
                    "history": r.history,
                    "n_iter": r.n_iter,
                    "converged": r.converged,
                    "done": r.done,
                    "lower_bound": r.lower_bound if math.isfinite(r.lower_bound) else None,
                    "n_reseeds": r.n_reseeds,
                }
            )
        # arrays first, then the JSON that names them: a reader sees the old
        # pair or the new pair, never a JSON pointing at missing arrays
        token = hashlib.sha256(repr(time.time_ns()).encode()).hexdigest()[:12]
        atomic_savez(self.path / f"state-{token}.npz", **arrays)
        doc = {
            "digest": self.digest,
            "fingerprint": self.fingerprint,
            "stage": stage,
            "arrays": f"state-{token}.npz",
            "runs": meta_runs,
        }
        atomic_write_text(self.path / "checkpoint.json", json.dumps(doc, default=str))
        # the previous state, and any left by a process killed between the two writes
        for f in [*self.path.glob("state-*.npz"), *self.path.glob(".state-*.tmp-*")]:
            if f.name != doc["arrays"]:
                f.unlink(missing_ok=True)

    def load(self) -> tuple[str, list[Run]] | None:
        """The saved stage and runs, or None when there is no checkpoint yet."""
        f = self.path / "checkpoint.json"
        if not f.exists():
            return None
        doc = json.loads(f.read_text())
        if doc.get("digest") != self.digest:
            theirs = doc.get("fingerprint", {})
            diff = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
            raise InputError(
                f"the checkpoint at {self.path} was written for other data or options "
                f"(differs in: {', '.join(diff) or 'format'}); use another checkpoint path "
                "or delete it"
            )
        runs = []
        with np.load(self.path / doc["arrays"], allow_pickle=False) as npz:
            for i, m in enumerate(doc["runs"]):
                arrays = {k: npz[f"run{i}_{k}"] for k in m["arrays"]}
                runs.append(
                    Run(
                        params=self.model.params_from_state(arrays, m["params"]),
                        tag=m["tag"],
                        history=list(m["history"]),
                        n_iter=m["n_iter"],
                        converged=m["converged"],
                        done=m["done"],
                        lower_bound=-math.inf if m["lower_bound"] is None else m["lower_bound"],
                        n_reseeds=m.get("n_reseeds", 0),
                    )
                )
        return doc["stage"], runs


def run_em(
    X: da.Array,
    model: Model,
    runs: Sequence[Run],
    *,
    tol: float,
    max_iter: int,
    split: RowSplit | None = None,
    split_every: int = DEFAULT_SPLIT_EVERY,
    reseed_pool: np.ndarray | Callable[[], np.ndarray] | None = None,
    callback: Callable[[IterationInfo], None] | None = None,
    checkpoint: Checkpoint | None = None,
    stage: str = "em",
    progress: bool = False,
) -> list[Run]:
    """Advance every run until it converges or reaches ``max_iter``.

    Convergence follows scikit-learn: after the E-step of iteration ``t`` the
    mean log-likelihood per row ``L_t`` (of the parameters before that M-step)
    is recorded; the run stops when ``|L_t - L_{t-1}| < tol``. The parameters
    kept are those after the last M-step, and ``lower_bound`` is ``L_t``.
    """
    runs = list(runs)
    while True:
        live = [r for r in runs if not r.done and r.n_iter < max_iter]
        for r in runs:
            if not r.done and r.n_iter >= max_iter:
                r.done = True
        if not live:
            break
        t0 = time.perf_counter()
        stats = reduce_statistics(
            X, model, [r.params for r in live], split=split, split_every=split_every, progress=progress
        )
        for r, s in zip(live, stats):
            if s.n == 0:
                raise InputError("no training rows to fit on")
            ll = s.mean_loglik
            prev = r.lower_bound
            r.n_iter += 1
            r.history.append(ll)
            r.lower_bound = ll
            if not math.isfinite(ll):
                raise FloatingPointError(
                    f"the log-likelihood became {ll} at iteration {r.n_iter}; increase reg_covar or scale the data"
                )
            new, empty = model.m_step(s, r.params)
            if empty.any():
                if reseed_pool is None:
                    raise ValueError("a component lost all its rows and no rows are at hand to re-seed it")
                warnings.warn(
                    f"{int(empty.sum())} component(s) of run {r.tag} received no rows at "
                    f"iteration {r.n_iter} and were re-seeded on poorly explained rows",
                    RuntimeWarning,
                    stacklevel=2,
                )
                pool = reseed_pool() if callable(reseed_pool) else reseed_pool
                new = model.reseed(new, empty, pool)
                r.n_reseeds += 1
            r.params = new
            if abs(ll - prev) < tol:
                r.converged = True
                r.done = True
            elif r.n_iter >= max_iter:
                r.done = True
        if checkpoint is not None:
            checkpoint.save(runs, stage)
        if callback is not None:
            callback(IterationInfo(max(r.n_iter for r in live), runs, time.perf_counter() - t0, len(live), live))
    return runs


def map_rows(X: da.Array, func: Callable, n_out: int | None, dtype: Any) -> da.Array:
    """Apply a row-wise function chunk by chunk, lazily (predictions, densities)."""
    if n_out is None:
        return X.map_blocks(func, drop_axis=1, dtype=dtype, meta=np.empty((0,), dtype=dtype), token="daskem-rows")
    return X.map_blocks(
        func, chunks=(X.chunks[0], (n_out,)), dtype=dtype, meta=np.empty((0, 0), dtype=dtype), token="daskem-rows"
    )


def data_fingerprint(X: da.Array, sample: np.ndarray) -> dict:
    """What identifies the data for a checkpoint: shape, dtype and a sample's hash."""
    return {
        "shape": list(X.shape),
        "dtype": str(X.dtype),
        "sample_sha256": hashlib.sha256(np.ascontiguousarray(sample).tobytes()).hexdigest(),
    }
