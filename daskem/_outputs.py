"""Safe outputs: daskem never deletes or overwrites anything it did not write.

The one place that decides whether an output path may be written, and that
writes it atomically. Pure file-system code (no Dask, no Zarr).

* Every output daskem creates holds a marker file, :data:`MARKER`
  (``.daskem-output.json``: the kind of output and a format version). A Zarr
  store (v3) carries the same document in the attributes of its root
  ``zarr.json`` (key ``daskem_output``) instead: Zarr warns about foreign
  files when it lists a group's members.
* :func:`check_output` looks at a target before any work starts:

  - nothing there, or an empty folder: it will be created;
  - a daskem output of the same kind: it will be replaced atomically;
  - a daskem output of another kind: refused unless ``overwrite``;
  - a non-empty folder daskem did not write, a file, the input itself, a
    folder holding the input, or a path inside the input: always refused.

* :func:`atomic_output` builds the output in a temporary folder beside the
  target (created with the user's umask) and swaps it into place with one
  ``renameat2(RENAME_EXCHANGE)`` where the system has it, so a reader, or a
  process killed at any moment, sees the old output or the new one, never a
  mix or nothing. Elsewhere the old output is renamed aside, the new one in,
  and a leftover of a killed process is put back by the next
  :func:`check_output` on that path.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__  # set by daskem/__init__ before it imports this module
from .errors import OutputRefusedError

#: the marker file daskem writes into every output folder it creates
MARKER = ".daskem-output.json"
MARKER_VERSION = 1

#: the kinds of output, and how a message names them
KINDS = {
    "model": "saved model",
    "fit": "fit",
    "select-k": "select-k result",
    "demo": "demo",
    "predictions": "predictions store",
    "generated": "generated store",
    "job": "job folder",
}

# leftovers of an interrupted write: ``.NAME.tmp-HOST-PID-RAND`` / ``.NAME.old-HOST-PID-RAND``
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{6}$")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------
# the marker
# --------------------------------------------------------------------------


def write_marker(folder: str | os.PathLike, kind: str, **fields: object) -> None:
    """Mark ``folder`` as a daskem output of ``kind`` (in ``zarr.json`` for a Zarr v3 store)."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; known: {sorted(KINDS)}")
    folder = Path(folder)
    doc = {"daskem_output": kind, "version": MARKER_VERSION, "daskem_version": __version__, "created": _now(), **fields}
    meta = folder / "zarr.json"
    if meta.is_file():
        zdoc = json.loads(meta.read_text())
        zdoc.setdefault("attributes", {})["daskem_output"] = doc
        tmp = meta.with_name(f".zarr.json.tmp-{uuid.uuid4().hex[:6]}")
        tmp.write_text(json.dumps(zdoc, indent=2))
        os.replace(tmp, meta)
    else:
        (folder / MARKER).write_text(json.dumps(doc, indent=2) + "\n")


def _read_json(f: Path) -> object:
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def output_kind(path: str | os.PathLike) -> str | None:
    """The kind of daskem output at ``path``, or None when daskem did not write it."""
    path = Path(path)
    doc = _read_json(path / MARKER)
    if doc is None:
        zdoc = _read_json(path / "zarr.json")
        attrs = zdoc.get("attributes") if isinstance(zdoc, dict) else None
        doc = attrs.get("daskem_output") if isinstance(attrs, dict) else None
    kind = doc.get("daskem_output") if isinstance(doc, dict) else None
    return kind if kind in KINDS else None


# --------------------------------------------------------------------------
# checking a target
# --------------------------------------------------------------------------


@dataclass
class OutputTarget:
    """An output path that :func:`check_output` accepted.

    Attributes
    ----------
    path : Path
        The target.
    kind : str
        The kind of output that will be written there.
    previous : str or None
        The kind of the daskem output that will be replaced, if any.
    companions : list of Path
        Files written beside the target that belong to the same output (the
        ``OUT.truth.json`` of a generated store).
    """

    path: Path
    kind: str
    previous: str | None = None
    companions: list[Path] = field(default_factory=list)
    overwrite: bool = False
    inputs: tuple[str, ...] = ()
    option: str | None = "--overwrite"

    @property
    def replacing(self) -> bool:
        return self.previous is not None

    def describe(self) -> str:
        """``"replaced the previous fit in DIR"`` or ``"wrote DIR"`` (for the command's output)."""
        if self.previous is None:
            return f"wrote {self.path}"
        return f"replaced the previous {KINDS[self.previous]} in {self.path}"


def _is_url(p: str) -> bool:
    return "://" in p


def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(p)))))


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _refuse(path: Path, why: str, todo: str) -> OutputRefusedError:
    return OutputRefusedError(f"refusing to write to {path}: {why}; {todo}")


def check_output(
    path: str | os.PathLike,
    kind: str,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    option: str | None = "--overwrite",
    companions: Iterable[str | os.PathLike] = (),
) -> OutputTarget:
    """Check that ``kind`` output may be written at ``path``; call before any work starts.

    Parameters
    ----------
    path : str or Path
        The output path (a local folder).
    kind : str
        One of :data:`KINDS`.
    inputs : iterable of paths
        The inputs of the command (data, model folder): the output may be none
        of them, hold none of them and lie inside none of them. URLs and None
        are skipped.
    overwrite : bool
        Allow replacing a daskem output of another kind.
    option : str or None
        How the message names ``overwrite`` (``--overwrite`` on the command
        line, ``overwrite=True`` in Python); None where there is no such
        option (the message then says to delete the old output first).
    companions : iterable of paths
        Files beside ``path`` that belong to the output (written with it).

    Returns
    -------
    OutputTarget

    Raises
    ------
    OutputRefusedError
        With one line naming the path and what to do.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; known: {sorted(KINDS)}")
    raw = os.fspath(path)
    if _is_url(raw):
        raise OutputRefusedError(f"daskem writes local outputs only, not {raw}; give a local path")
    target = Path(os.path.abspath(os.path.expanduser(raw)))
    real = _real(target)
    other = "give another output path"
    input_list = tuple(os.fspath(i) for i in inputs if i is not None and not _is_url(os.fspath(i)))
    for inp in input_list:
        ri = _real(inp)
        if real == ri:
            raise _refuse(target, "it is the input of this command", other)
        if _is_within(ri, real):
            raise _refuse(target, f"it holds the input {inp}", other)
        if _is_within(real, ri):
            raise _refuse(target, f"it lies inside the input {inp}", other)
    recover_leftovers(target)
    previous = None
    if target.is_symlink() and not target.exists():
        raise _refuse(target, "it is a broken symbolic link", other)
    if target.exists():
        if not target.is_dir():
            raise _refuse(target, "it is a file daskem did not write", other)
        if target.is_symlink():
            raise _refuse(target, "it is a symbolic link", other + " (or the folder it points to)")
        found = output_kind(target)
        if found is None:
            if any(target.iterdir()):
                what = "a Zarr store" if _looks_like_zarr(target) else "a folder"
                raise _refuse(target, f"it is {what} daskem did not write (not empty)", other)
        elif found == kind or overwrite:
            previous = found
        else:
            todo = f"pass {option} to replace it" if option else "delete it first to replace it"
            raise _refuse(target, f"it holds a daskem {KINDS[found]}, not a {KINDS[kind]}", f"{todo}, or {other}")
    comp = [Path(os.path.abspath(c)) for c in companions]
    for c in comp:
        recover_leftovers(c)
        if c.exists() and (not c.is_file() or not _is_companion(c, kind) or (previous is None and c.is_symlink())):
            raise _refuse(c, "it is a file daskem did not write (written beside the output)", other)
    return OutputTarget(target, kind, previous, comp, overwrite, input_list, option)


def _looks_like_zarr(folder: Path) -> bool:
    return any((folder / n).exists() for n in ("zarr.json", ".zarray", ".zgroup"))


def _is_companion(f: Path, kind: str) -> bool:
    doc = _read_json(f)
    return isinstance(doc, dict) and doc.get("daskem_output") == kind


# --------------------------------------------------------------------------
# writing atomically
# --------------------------------------------------------------------------


def _new_name(target: Path, what: str) -> Path:
    return target.parent / f".{target.name}.{what}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def make_temp_dir(target: str | os.PathLike) -> Path:
    """A fresh folder beside ``target``, named as daskem's own leftover, with the user's umask."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _new_name(target, "tmp")
        try:
            os.mkdir(tmp)  # mode 0o777 & ~umask, as any tool's output
            return tmp
        except FileExistsError:  # pragma: no cover - a clash of 24 random bits
            continue


_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where not supported."""
    global _libc
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def commit(target: OutputTarget, tmp: Path) -> None:
    """Mark ``tmp`` and put it at ``target.path`` atomically; the previous output is removed after."""
    dest = target.path
    # the target may have changed since check_output: look again just before the swap
    again = check_output(
        dest, target.kind, inputs=target.inputs, overwrite=target.overwrite, option=target.option, companions=()
    )
    write_marker(tmp, target.kind)
    if dest.exists():
        if _exchange(tmp, dest):
            _remove(tmp)  # now holds the previous output
        else:
            old = _new_name(dest, "old")
            os.replace(dest, old)
            os.replace(tmp, dest)
            _remove(old)
    else:
        os.replace(tmp, dest)
    target.previous = again.previous


@contextlib.contextmanager
def atomic_output(target: OutputTarget) -> Iterator[Path]:
    """A temporary folder to build the output in; committed when the block ends without error.

    On any error (or Ctrl-C) the temporary folder is removed and the target is
    untouched.
    """
    tmp = make_temp_dir(target.path)
    try:
        yield tmp
        commit(target, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary name and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, path)


def write_companion(path: str | os.PathLike, kind: str, doc: dict) -> None:
    """Write a JSON file that belongs to an output (marked with its kind), atomically."""
    path = Path(path)
    tmp = _new_name(path, "tmp")
    tmp.write_text(json.dumps({**doc, "daskem_output": kind}, indent=2) + "\n")
    os.replace(tmp, path)


def ensure_folder(target: OutputTarget) -> Path:
    """Create (or adopt) the output folder itself, for outputs written in place (job folders).

    A new path is created atomically with its marker; an empty folder gets
    the marker; a folder of the same kind is kept as it is; a daskem output
    of another kind (accepted with ``overwrite``) is replaced by an empty,
    marked folder atomically.
    """
    dest = target.path
    if dest.exists() and target.previous == target.kind:
        return dest
    if dest.exists() and target.previous is None:  # an empty folder
        write_marker(dest, target.kind)
        return dest
    with atomic_output(target):
        pass
    return dest


# --------------------------------------------------------------------------
# leftovers of killed processes
# --------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_leftovers(target: str | os.PathLike) -> None:
    """Tidy what a killed daskem left beside ``target`` (daskem's own names only).

    A previous output renamed aside (``.NAME.old-*``) while the target is
    missing is put back; other leftovers of processes of this host that are
    gone are removed. Anything else is left alone.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for p in sorted(entries, key=lambda q: q.name):
        m = _LEFTOVER.match(p.name)
        if m is None or m["name"] != target.name or m["host"] != _HOST:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        if m["what"] == "old" and not target.exists() and not target.is_symlink() and output_kind(p) is not None:
            with contextlib.suppress(OSError):
                os.replace(p, target)
            continue
        _remove(p)
