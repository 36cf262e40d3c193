"""A run's work directory: held by one run at a time (``locked``), claimed for one experiment made from one set of
data (``claimed``: ``experiment.json``, ``data_sha256.json``), its records written atomically by process 0, and the
models its stages write and read (``save``, ``load``, ``finished``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

import jax
import numpy as np

from zebrax import checkpoint, files
from zebrax.errors import ConfigError
from zebrax.hosts import sync

RECORD, LOCK, HASHES = "experiment.json", ".lock", "data_sha256.json"


def write_text(path: Path, text: str) -> None:
    """Atomically, by process 0 only."""
    if jax.process_index() != 0:
        return
    files.write_text_atomic(path, text)


def hashes_agree(workdir: Path, hashes: dict[str, str]) -> dict[str, str]:
    """The work directory's record of what it was made from (each data file's SHA-256, the teacher's
    ``checkpoint.content_sha256``) with ``hashes`` added; ConfigError naming a file or checkpoint whose content
    differs from the one the work directory was made from."""
    path = workdir / HASHES
    old = json.loads(path.read_text()) if path.exists() else {}
    for f in sorted(set(old) & set(hashes)):
        if old[f] != hashes[f]:
            raise ConfigError(f"{workdir}: written from other data ({f}: sha256 {old[f][:12]} there, "
                              f"{hashes[f][:12]} now: its content has changed); use another --workdir")
    return {**old, **hashes}


def record_hashes(workdir: Path, hashes: dict[str, str]) -> None:
    """Add ``hashes`` to the work directory's record (refused if one differs)."""
    merged = hashes_agree(workdir, hashes)
    path = workdir / HASHES
    if not path.exists() or json.loads(path.read_text()) != merged:
        write_text(path, json.dumps(merged, indent=2, sort_keys=True))


def _lock(workdir: Path) -> int:
    """An exclusive ``flock`` on ``WORKDIR/.lock``, the file naming this process; ConfigError naming the process
    that holds it. The lock ends with the descriptor, or with the process however it ends (``kill -9`` too)."""
    path = workdir / LOCK
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"{path}: cannot create it ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 256).decode(errors="replace").strip() or "a process that has not named itself yet"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ConfigError(f"{path}: cannot lock it ({e.strerror or e})") from None
        raise ConfigError(f"{workdir}: in use by another run ({holder}); wait for it to end, or use another "
                          f"--workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


@contextlib.contextmanager
def locked(workdir: str | os.PathLike):
    """Hold the work directory for the block: one run at a time writes it (``WORKDIR/.lock``, created with the
    directory); ConfigError naming the holder (pid and host) if another run holds it. In a multi-host run process 0
    locks for all (the others share its run). An object store (``gs://``) has no lock: one run at a time there is
    the user's (a pod's scheduler runs one job a name)."""
    workdir = files.as_path(workdir)
    fd, refusal = None, None
    if jax.process_index() == 0 and files.is_local(workdir):
        try:
            fd = _lock(workdir)
        except ConfigError as e:
            refusal = e
    if jax.process_count() > 1:  # every process learns whether process 0 holds it
        from jax.experimental import multihost_utils

        if not int(multihost_utils.broadcast_one_to_all(np.int32(refusal is None))) and refusal is None:
            refusal = ConfigError(f"{workdir}: process 0 could not lock it (its error says why)")
    if refusal is not None:
        raise refusal
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def claimed(workdir: Path, exp, hashes: dict[str, str], disagreement):
    """The work directory, held (``locked``) for the block: it is new, or holds this experiment, or one that this
    one may take over (``disagreement(workdir, old fields, new fields)`` is None: e.g. stages added after those
    begun), made from the same data; anything else is refused and left untouched. Every process decides from the
    directory as it was; process 0 decides again once it holds the lock, and writes the records."""
    sync("claim")
    _check_claim(workdir, exp, hashes, disagreement)
    sync("claimed")
    with locked(workdir):
        if jax.process_index() == 0:
            if _check_claim(workdir, exp, hashes, disagreement):
                write_text(workdir / RECORD, exp.to_json())
            record_hashes(workdir, hashes)
        sync("recorded")
        yield


def _check_claim(workdir: Path, exp, hashes: dict[str, str], disagreement) -> bool:
    """True for a new work directory or one this experiment takes over (its record is to be written); ConfigError
    for another experiment's, one made from data that has changed since, or a foreign one."""
    record = workdir / RECORD
    if record.exists():
        experiment = type(exp)  # a field added since the record was written counts at its default
        old = {**json.loads(experiment().to_json()), **experiment.from_record(json.loads(record.read_text()))}
        new = json.loads(exp.to_json())
        why = None if old == new else disagreement(workdir, old, new)
        if why is not None:
            raise ConfigError(f"{workdir}: written by a different experiment ({why}); use another --workdir")
        hashes_agree(workdir, hashes)
        return old != new
    if workdir.exists() and any(p.name != LOCK for p in workdir.iterdir()):
        raise ConfigError(f"{workdir}: exists and is not a zebrax distill work directory; use another --workdir")
    return True


def save(workdir: Path, name: str, models: dict[str, tuple], tokenizer: Path | None) -> None:
    """``{sub: (config, params)}`` → ``WORKDIR/name[/sub]`` as one atomic directory ("" = ``name`` itself), written
    by every process, each the shards its devices hold (no host gathers a model); every process returns once it is
    committed."""
    with files.atomic_directory_of_all(workdir / name, what="stage output") as tmp:
        for sub, (config, params) in models.items():
            target = tmp / sub if sub else tmp
            target.mkdir(exist_ok=True)
            checkpoint.save(target, config, params)
            if tokenizer is not None and jax.process_index() == 0:
                files.copy_tree(tokenizer, target / "tokenizer")


def finished(workdir: Path, stage: str) -> None:
    """A stage's output is written: its resumption checkpoints and compiled steps are no longer needed."""
    jax.clear_caches()
    if jax.process_index() == 0:
        files.remove_tree(workdir / "checkpoints" / stage)
    sync(f"finished {stage}")


def shardings(config, mesh):
    """The ``NamedSharding`` tree of a model ``config`` over ``mesh`` (``sharding.param_shardings``); None without."""
    if mesh is None:
        return None
    from zebrax.models import abstract_params
    from zebrax.sharding import param_shardings

    return param_shardings(config, abstract_params(config), mesh)


def load(path: Path, mesh=None) -> tuple:
    """(config, params) of a checkpoint; with a ``mesh``, the parameters restored straight into their shardings
    (``shardings``): no device, and no host, holds a whole model."""
    config = checkpoint.load_config(path)
    return config, checkpoint.load_params(path, config, shardings(config, mesh))


def sharded(mesh, trained: dict, frozen: tuple | None) -> dict:
    """``train``'s ``mesh`` and ``shardings`` keywords: ``trained`` = {name: (config, params)} (one entry with name
    "" for a single model), ``frozen`` = (config, params) or None."""
    if mesh is None:
        return {}
    from zebrax.sharding import param_shardings

    sh = {n: param_shardings(c, p, mesh) for n, (c, p) in trained.items()}
    return {"mesh": mesh, "shardings": (sh[""] if "" in sh else sh,
                                        None if frozen is None else param_shardings(*frozen, mesh))}
