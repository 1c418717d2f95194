"""TLS for clients of a Dask cluster: ``distributed.Security`` from a Dask config file.

``deploy/local/start-cluster.sh`` starts a cluster that refuses anyone without
a certificate of its own CA, and writes a ``security.yaml`` beside its
``scheduler.json``: a Dask configuration file with
``distributed.comm.require-encryption`` and ``distributed.comm.tls.ca-file``,
``.client.cert``, ``.client.key``. :func:`find_security` finds it the way
the command line does (``--security FILE``, else beside ``--scheduler-file``);
:func:`load_security` reads one.

>>> from distributed import Client
>>> from daskem.security import load_security
>>> client = Client(scheduler_file="sched.json", security=load_security("security.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dask
import yaml
from distributed import Security

from .errors import InputError, InputNotFoundError

__all__ = ["SECURITY_FILE", "find_security", "load_security"]

#: the name of the security config that start-cluster.sh writes beside the scheduler file
SECURITY_FILE = "security.yaml"


def _get(doc: Any, dotted: str) -> Any:
    """``doc['a']['b-c']`` for ``'a.b-c'``; ``-`` and ``_`` are the same, as in Dask's config."""
    node = doc
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        norm = {str(k).replace("_", "-"): v for k, v in node.items()}
        node = norm.get(part)
    return node


def load_security(path: str | Path) -> Any:
    """A ``distributed.Security`` from a Dask config file (YAML).

    Parameters
    ----------
    path
        A YAML file with ``distributed.comm.tls.ca-file``,
        ``distributed.comm.tls.client.cert`` and ``.client.key`` (and
        optionally ``distributed.comm.require-encryption``, default true, and
        ``distributed.comm.tls.ciphers``). Relative certificate paths are
        relative to the file's folder.

    Returns
    -------
    distributed.Security

    Raises
    ------
    InputNotFoundError
        The file or a certificate it names does not exist.
    InputError
        The file is not such a config.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputNotFoundError(f"no such security config: {path}")
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read the security config {path}: {exc}") from exc
    files = {}
    for key, name in [
        ("tls_ca_file", "distributed.comm.tls.ca-file"),
        ("tls_client_cert", "distributed.comm.tls.client.cert"),
        ("tls_client_key", "distributed.comm.tls.client.key"),
    ]:
        value = _get(doc, name)
        if value is None:
            if key == "tls_client_key":  # the key may be in the certificate file
                continue
            raise InputError(f"the security config {path} has no {name}")
        f = Path(str(value)).expanduser()
        f = f if f.is_absolute() else path.parent / f
        if not f.is_file():
            raise InputNotFoundError(f"no such file: {f} ({name} in {path})")
        files[key] = str(f)
    require = _get(doc, "distributed.comm.require-encryption")
    ciphers = _get(doc, "distributed.comm.tls.ciphers")
    return Security(
        require_encryption=True if require is None else bool(require),
        **files,
        **({"tls_ciphers": str(ciphers)} if ciphers else {}),
    )


def _scheduler_file_address(scheduler_file: str | Path) -> str | None:
    try:
        return str(json.loads(Path(scheduler_file).read_text())["address"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_security(
    scheduler: str | None = None,
    scheduler_file: str | Path | None = None,
    security: str | Path | None = None,
) -> Any:
    """The ``distributed.Security`` a client of this scheduler should use, or None.

    ``security`` (a Dask config file) if given; else ``security.yaml`` beside
    ``scheduler_file`` if there is one; else None: ``distributed.Client``
    then uses Dask's own configuration (``distributed.comm.tls.*``).

    Raises
    ------
    InputError
        The scheduler speaks TLS (``tls://``) and no certificate is configured
        anywhere: the connection could only fail.
    """
    if security:
        return load_security(security)
    if scheduler_file:
        beside = Path(scheduler_file).expanduser().parent / SECURITY_FILE
        if beside.is_file():
            return load_security(beside)
    address = scheduler or (_scheduler_file_address(scheduler_file) if scheduler_file else None)
    if address and address.startswith("tls://") and not dask.config.get("distributed.comm.tls.client.cert", None):
        raise InputError(
            f"the Dask scheduler at {address} uses TLS and no client certificate is configured: pass "
            f"--security FILE (the {SECURITY_FILE} that start-cluster.sh wrote beside its scheduler file)"
        )
    return None
