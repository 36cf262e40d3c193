"""The one way zebrax writes a file or a directory, on a local disk or an object store.

Every writer of a directory goes through ``atomic_directory``:
- the result is built in a temporary sibling ``.NAME.tmp-HOST-PID-RANDOM`` and renamed into place only when
  complete, with a rename that refuses to replace anything that appeared meanwhile (or, with ``overwrite``,
  that atomically exchanges the old and the new);
- ``overwrite`` replaces only what the same kind of writer made (``replaceable``), never an ordinary
  directory, a file, or the source being read;
- a failure, SIGINT or SIGTERM removes the temporary directory; one left by a killed process (``kill -9``)
  is removed by the next writer into the same folder once its process is provably gone.

An object store (``gs://bucket/…``, through ``etils.epath``) has no rename: there ``atomic_directory_of_all`` writes
in place and marks the directory written with one last object, ``COMMITTED`` (``committed``), as orbax marks its
own checkpoints there; a directory without it is what a killed run left, and the next writer removes it first.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from zebrax import interrupts
from zebrax.errors import CheckpointError, ConfigError

# orbax's OCDBT merge expands these as glob patterns: a path holding them is written without its data
UNSAFE_PATH_CHARS = "[]\\"
_LIVE: set[Path] = set()  # temporaries of this process not yet committed or removed
_TMP = re.compile(r"\.(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")
COMMITTED = "commit_success.txt"  # an object-store directory's last object: it is whole


# -- local paths and object stores --------------------------------------------------------------
def is_local(path: str | os.PathLike) -> bool:
    """A path of this machine's filesystems, not an object store's URI (``gs://bucket/…``, ``s3://…``)."""
    return "://" not in os.fspath(path)


def local_path(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a local ``Path``; ConfigError for an object store's URI, where only work directories and the
    checkpoints they read and write may live (``as_path``): a ``what`` is written to, or read from, a local disk
    (copy it there and back with the store's own tools)."""
    if not is_local(path):
        raise ConfigError(f"{os.fspath(path)}: a {what} lives on a local disk; only distill work directories and "
                          f"the checkpoints they read may be object-store URIs (gs://…)")
    return Path(path)


def as_path(path: str | os.PathLike):
    """``pathlib.Path`` (absolute) for a local path; ``etils.epath.Path`` for an object store's URI (gs:// needs
    ``gcsfs``: ``pip install zebrax[gcs]``). Both answer ``/``, ``exists``, ``read_text``, ``write_text``,
    ``iterdir``."""
    if is_local(path):
        return Path(path).absolute()
    import importlib.util

    if os.fspath(path).startswith("gs://") and importlib.util.find_spec("gcsfs") is None:
        raise ConfigError(f"{os.fspath(path)}: gs:// paths need gcsfs: pip install 'zebrax[gcs]'")
    import fsspec
    from etils import epath

    if os.fspath(path).startswith("gs://"):
        endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
        unreachable = _unreachable(endpoint)
        if unreachable:
            raise CheckpointError(f"{os.fspath(path)}: cannot reach the object store at {endpoint} ({unreachable}); "
                                  f"check the network, or use a local path")
    # no cached listings: another host's writes (process 0's smart.json, a grown metrics.jsonl) are seen at once
    fsspec.config.conf.setdefault("gs", {})["use_listings_cache"] = False
    return epath.Path(os.fspath(path))


@functools.cache
def _unreachable(endpoint: str, timeout_s: float = 10.0) -> str | None:
    """Why the object store's ``endpoint`` does not answer a connection within ``timeout_s``, or None (asked once a
    process): unreachable, gcsfs would retry for about a minute and log every retry's traceback."""
    from urllib.parse import urlsplit

    url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
    except OSError as e:
        return str(e.strerror or e)
    return None


def committed(path: str | os.PathLike) -> bool:
    """``atomic_directory_of_all`` has finished ``path``: it exists (local: renamed into place whole), or holds its
    ``COMMITTED`` object (object store; for a checkpoint inside a stage output, ``ild/mla``, its parent does)."""
    return os.path.exists(path) if is_local(path) else (as_path(path) / COMMITTED).exists()


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a directory and everything in it, if it exists."""
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        as_path(path).rmtree(missing_ok=True)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike, *, link: bool = False) -> None:
    """The file or directory ``src`` copied to ``dst``: on local disks whole or not at all (a temporary beside
    ``dst``, renamed), file by file where either is on an object store. ``link``: on one local file system, each file
    is a hard link to ``src``'s (no bytes copied, no space taken), for files nothing writes again, as a committed
    stage's; a copy elsewhere."""
    if is_local(src) and is_local(dst):
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.copy-{os.getpid()}")
        copy = _link_or_copy if link else shutil.copy2
        try:
            if Path(src).is_dir():
                shutil.copytree(src, tmp, copy_function=copy)
            else:
                copy(src, tmp)
            os.replace(tmp, dst)
        finally:  # after a failure; renamed away after a success
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        return
    src, dst = as_path(src), as_path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_dir():
            copy_tree(p, dst / p.name)
        else:
            (dst / p.name).write_bytes(p.read_bytes())


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


# -- atomic directory writes --------------------------------------------------------------------
def check_writable_path(path: Path) -> None:
    """Refuse, before anything is written, a destination orbax cannot write correctly."""
    bad = sorted({c for c in str(path) if c in UNSAFE_PATH_CHARS})
    if bad:
        raise CheckpointError(f"{path}: the path contains {' '.join(map(repr, bad))}, which orbax treats as a glob "
                              "pattern (its parameters would be written incompletely); choose a path without them")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(parent: Path) -> list[Path]:
    """Remove the temporary siblings in ``parent`` left by writers on this host whose process is gone."""
    removed = []
    host = socket.gethostname()
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TMP.fullmatch(entry.name)
        if m is None or m["host"] != host or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _process_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    """Linux ``renameat2``; raises OSError (ENOSYS/EINVAL where the kernel or filesystem lacks it)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if not hasattr(libc, "renameat2"):
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists, atomically where the OS allows."""
    try:
        _renameat2(src, dst, _RENAME_NOREPLACE)
        return
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
    if os.path.lexists(dst):  # portable fallback: check, then rename (a narrow window remains)
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    os.rename(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the OS cannot."""
    try:
        _renameat2(a, b, _RENAME_EXCHANGE)
        return True
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EINVAL):
            return False
        raise


@contextlib.contextmanager
def warnings_after_success():
    """Hold the ZebraxWarnings a write raises and issue them once it has succeeded: a failed write says one
    thing, its error."""
    import warnings

    from zebrax.errors import ZebraxWarning

    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always", ZebraxWarning)
        yield
    for w in held:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _overlaps(dst: Path, sources: Iterable[str | os.PathLike]) -> Path | None:
    d = dst.resolve()
    for s in sources:
        s = Path(s).resolve()
        if d == s or d in s.parents:
            return s
    return None


def write_text_atomic(path: str | os.PathLike, text: str):
    """Write a small text file whole or not at all: a temporary sibling renamed over ``path`` (on an object store,
    one upload, which is whole or absent)."""
    if not is_local(path):
        path = as_path(path)
        path.write_text(text)
        return path
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def atomic_directory(
    dst: str | os.PathLike,
    overwrite: bool = False,
    *,
    replaceable: Callable[[Path], bool] = lambda _: False,
    what: str = "directory zebrax wrote",
    sources: Iterable[str | os.PathLike] = (),
):
    """Yield a fresh temporary directory that becomes ``dst`` when the block ends without error.

    ``overwrite`` replaces an existing ``dst`` only if ``replaceable(dst)`` (default: nothing is) says it is a
    ``what`` (``checkpoint.writing``: a zebrax checkpoint); ``sources`` are the paths being read, which ``dst`` may
    neither be nor contain. ``dst`` is a local path (``local_path``).
    """
    dst = Path(local_path(dst, what)).absolute()
    check_writable_path(dst)
    source = _overlaps(dst, sources)
    if source is not None:
        raise CheckpointError(f"{dst}: is (or contains) the source {source}; write somewhere else")
    existed = os.path.lexists(dst)
    if existed:
        if not overwrite:
            raise CheckpointError(f"{dst}: already exists (pass overwrite=True / --overwrite to replace it)")
        if dst.is_symlink() or not dst.is_dir():
            raise CheckpointError(f"{dst}: exists and is not a directory; --overwrite replaces only a {what}")
        if not replaceable(dst):
            raise CheckpointError(f"{dst}: exists and is not a {what}; --overwrite replaces only a {what}, "
                                  "so it was left untouched")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(dst.parent)
        tmp = dst.parent / f".{dst.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot write here ({e.strerror or e})") from None
    _LIVE.add(tmp)
    try:
        with interrupts.raising():
            try:
                yield tmp
            except OSError as e:  # disk full, permissions, a vanished file: one line naming it
                where = f" ({e.filename})" if e.filename else ""
                raise CheckpointError(f"{dst}: {e.strerror or e}{where}") from None
            interrupts.check()
            _commit(tmp, dst, existed, replaceable, what)
            _LIVE.discard(tmp)  # after a failure it stays listed: a background writer may recreate it
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory_of_all(dst: str | os.PathLike, *, what: str):
    """``atomic_directory`` for every process of a multi-host run: process 0 makes the temporary directory (on a
    filesystem every host sees) and commits it; every process writes its part into it in the block (orbax: the
    shards of each array that its devices hold), and the commit waits for all. One process: ``atomic_directory``.
    On an object store the directory is written in place and committed by its ``COMMITTED`` object."""
    import jax

    from zebrax.hosts import broadcast_text, sync

    if jax.process_count() == 1 and is_local(dst):
        with atomic_directory(dst, what=what) as tmp:
            yield tmp
        return
    if jax.process_index() != 0:
        shared = broadcast_text(None)
        if shared is None:
            raise CheckpointError(f"{dst}: process 0 could not start writing it (its error says why)")
        yield as_path(shared)
        sync(f"written {dst}")
        if broadcast_text(None) is None:
            raise CheckpointError(f"{dst}: process 0 could not commit it (its error says why)")
        return
    stage = "start"
    try:
        with (atomic_directory if is_local(dst) else _committed_last)(dst, what=what) as tmp:
            broadcast_text(str(tmp))
            stage = "write"
            yield tmp
            sync(f"written {dst}")
            stage = "commit"
    except BaseException:
        if stage != "write":  # the others wait for word of the start or of the commit
            broadcast_text(None)
        raise
    broadcast_text("committed")


@contextlib.contextmanager
def _committed_last(dst: str | os.PathLike, *, what: str):
    """``atomic_directory`` on an object store, which has no rename: yield ``dst`` itself, cleared of what a killed
    writer left there, and write its ``COMMITTED`` object when the block ends without error."""
    dst = as_path(dst)
    check_writable_path(dst)
    try:
        if committed(dst):
            raise CheckpointError(f"{dst}: already exists")
        dst.rmtree(missing_ok=True)
        dst.mkdir(parents=True, exist_ok=True)
        yield dst
        interrupts.check()
        (dst / COMMITTED).write_text(f"{what}\n")
    except OSError as e:  # gcsfs and epath raise OSErrors: one line naming the directory
        raise CheckpointError(f"{dst}: cannot write the {what} ({e.strerror or e})") from None


def remove_leftovers(settle_s: float = 3.0) -> None:
    """Remove this process's temporaries that a background writer recreated after their cleanup (orbax's commit
    threads outlive an interrupted save): retried until they stay gone for ``settle_s``. Called by the command line
    before it exits after a failure."""
    if not _LIVE:
        return
    deadline = time.monotonic() + 10 * settle_s
    quiet_since = time.monotonic()
    with native_output_held(replay=False):  # the writers' dying tracebacks say what the one line says
        while time.monotonic() < deadline:
            present = [t for t in _LIVE if os.path.lexists(t)]
            for t in present:
                shutil.rmtree(t, ignore_errors=True)
            if present:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= settle_s:
                break
            time.sleep(0.05)
    _LIVE.clear()


def _commit(tmp: Path, dst: Path, existed: bool, replaceable: Callable[[Path], bool], what: str) -> None:
    """Move ``tmp`` to ``dst``. Nothing that appeared at ``dst`` while writing is ever replaced."""
    if existed and os.path.lexists(dst):
        if not (dst.is_dir() and not dst.is_symlink() and replaceable(dst)):
            raise CheckpointError(f"{dst}: changed while writing and is no longer a {what}; left untouched")
        if _exchange(tmp, dst):
            shutil.rmtree(tmp)  # tmp now holds the replaced checkpoint
            return
        old = dst.parent / f".{dst.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        dst.rename(old)
        try:
            rename_noreplace(tmp, dst)
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    try:
        rename_noreplace(tmp, dst)
    except FileExistsError:
        raise CheckpointError(f"{dst}: appeared while this one was being written (another writer?); "
                              "it was left untouched and this result discarded") from None
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot move the finished result into place ({e.strerror or e})") from None


@contextlib.contextmanager
def native_output_held(replay: bool = True):
    """Hold what orbax, tensorstore and their threads print to file descriptor 2 while the block runs: replayed
    if it succeeds (unless ``replay`` is False), dropped if it fails (its failure becomes one CheckpointError line;
    the held output would be asyncio tracebacks and absl warnings about the same failure)."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            sys.stderr.flush()
            if not ok:  # the failure's asyncio callbacks still print from their threads for a moment
                time.sleep(0.2)
            os.dup2(saved, 2)
            os.close(saved)
            if ok and replay:
                held.seek(0)
                text = held.read()
                if text:
                    sys.stderr.write(text.decode(errors="replace"))


