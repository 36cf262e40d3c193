"""The zebrax checkpoint directory, and the one way zebrax writes a directory.

    DIR/config.json     {"format": "zebrax", "format_version": 1, "model": config.to_dict()}
    DIR/params/         the parameter tree (orbax)
    DIR/tokenizer/      tokenizer files (optional; transformers' ``save_pretrained`` layout)
    DIR/build_report.json   how a hybrid was initialised from its teacher (``zebrax.build``; optional)

Every writer goes through ``atomic_directory``:
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

import atexit
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from zebrax import interrupts
from zebrax.errors import CheckpointError, ConfigError

FORMAT, FORMAT_VERSION = "zebrax", 1
CHECKPOINT_ENTRIES = frozenset({"config.json", "params", "tokenizer", "build_report.json"})
# orbax's OCDBT merge expands these as glob patterns: a path holding them is written without its data
UNSAFE_PATH_CHARS = "[]\\"
_LIVE: set[Path] = set()  # temporaries of this process not yet committed or removed
_TMP = re.compile(r"\.(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")
COMMITTED = "commit_success.txt"  # an object-store directory's last object: it is whole


# -- local paths and object stores --------------------------------------------------------------
def is_local(path: str | os.PathLike) -> bool:
    """A path of this machine's filesystems, not an object store's URI (``gs://bucket/…``, ``s3://…``)."""
    return "://" not in os.fspath(path)


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

    # no cached listings: another host's writes (process 0's smart.json, a grown metrics.jsonl) are seen at once
    fsspec.config.conf.setdefault("gs", {})["use_listings_cache"] = False
    return epath.Path(os.fspath(path))


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
    replaceable: Callable[[Path], bool] | None = None,
    what: str = "zebrax checkpoint",
    sources: Iterable[str | os.PathLike] = (),
):
    """Yield a fresh temporary directory that becomes ``dst`` when the block ends without error.

    ``overwrite`` replaces an existing ``dst`` only if ``replaceable(dst)`` (default: ``is_replaceable``) says it
    is a ``what``; ``sources`` are the paths being read, which ``dst`` may neither be nor contain.
    """
    dst = Path(dst).absolute()
    replaceable = replaceable or is_replaceable
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
def atomic_directory_of_all(dst: str | os.PathLike, *, what: str = "zebrax checkpoint"):
    """``atomic_directory`` for every process of a multi-host run: process 0 makes the temporary directory (on a
    filesystem every host sees) and commits it; every process writes its part into it in the block (orbax: the
    shards of each array that its devices hold), and the commit waits for all. One process: ``atomic_directory``.
    On an object store the directory is written in place and committed by its ``COMMITTED`` object."""
    import jax

    from zebrax.sharding import broadcast_text, sync

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
    with _native_output_held(replay=False):  # the writers' dying tracebacks say what the one line says
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


# -- the checkpoint ----------------------------------------------------------------------------
def _ocp():
    import orbax.checkpoint as ocp

    return ocp


@contextlib.contextmanager
def _native_output_held(replay: bool = True):
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


def save(directory: Path, config, params: dict) -> None:
    """Write config and params into ``directory`` (normally the one ``atomic_directory`` yields), then read
    the parameter metadata back: a write that cannot be restored is an error, not a success. In a multi-host run
    every process calls it (``atomic_directory_of_all``): each writes the shards its devices hold of the global
    arrays ``params``, none gathers a whole array, and process 0 writes config.json."""
    import jax

    from zebrax.sharding import sync

    directory = as_path(directory)
    check_writable_path(directory)
    if jax.process_index() == 0:
        (directory / "config.json").write_text(
            json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict()}, indent=2)
        )
    try:
        with _native_output_held():
            checkpointer = _ocp().StandardCheckpointer()
            checkpointer.save(directory / "params", params)
            checkpointer.wait_until_finished()
    except Exception as e:  # orbax and tensorstore raise many types (disk full, permissions, an interrupt)
        interrupts.check()
        text = str(e).strip().splitlines()
        raise CheckpointError(f"{directory / 'params'}: cannot write parameters "
                              f"({text[0] if text else type(e).__name__})") from None
    sync(f"saved {directory}")
    expected = {path: (tuple(np.shape(x)), np.dtype(x.dtype)) for path, x in _flat(params).items()}
    try:
        problems = _compare_params(directory / "params", expected, dtypes=True)
    except _Unreadable as e:
        problems = str(e)
    if problems:
        raise CheckpointError(f"{directory / 'params'}: written but not readable back ({problems})")


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A directory with a zebrax ``config.json``."""
    try:
        meta = json.loads((as_path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def is_replaceable(path: str | os.PathLike) -> bool:
    """A zebrax checkpoint holding nothing but what zebrax writes: the only directory ``overwrite`` replaces."""
    try:
        entries = {p.name for p in Path(path).iterdir()}
    except OSError:
        return False
    return is_checkpoint(path) and entries <= CHECKPOINT_ENTRIES


def load_config(path: str | os.PathLike):
    from zebrax.models import config_from_dict

    path = as_path(path)
    config_file = path / "config.json"
    try:
        if not config_file.is_file():
            raise CheckpointError(f"{path}: not a zebrax checkpoint (no config.json)")
        if not is_local(path) and not (committed(path) or committed(path.parent)):
            raise CheckpointError(f"{path}: incomplete (no {COMMITTED} beside it or in its parent: its writer did "
                                  "not finish)")
        meta = json.loads(config_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    except OSError as e:  # an object store's refusals (permissions, a missing bucket) are OSErrors
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{config_file}: not a zebrax checkpoint (no \"format\": \"zebrax\"); convert it with `zebrax convert`"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_file}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
    try:
        return config_from_dict(meta["model"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_file}: {e}") from None


def _flat(tree) -> dict[str, object]:
    from flax.traverse_util import flatten_dict

    return {"/".join(k): v for k, v in flatten_dict(tree).items()}


class _Unreadable(Exception):
    """The stored parameters cannot be read at all (the message says what is missing)."""


def _compare_params(params_dir: Path, expected: dict[str, tuple[tuple[int, ...], np.dtype]], dtypes: bool) -> str:
    """What differs between the stored parameters and ``expected`` (path → (shape, dtype)); '' if nothing.
    ``_Unreadable`` if the stored parameters cannot be read at all.
    ``dtypes``: compare dtypes too (after a write; a load casts to the config's dtype)."""
    if not (params_dir / "manifest.ocdbt").is_file():
        raise _Unreadable("no OCDBT manifest.ocdbt")
    try:
        with _native_output_held():
            stored_tree = _ocp().StandardCheckpointer().metadata(params_dir).item_metadata.tree
    except Exception:  # orbax raises many types on damaged metadata, or answers None
        raise _Unreadable("their metadata cannot be read") from None
    stored = {path: (tuple(m.shape), np.dtype(m.dtype)) for path, m in _flat(stored_tree).items()}
    problems = []
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
    if extra:
        problems.append(f"unexpected {len(extra)}: {', '.join(extra[:4])}{' …' if len(extra) > 4 else ''}")
    shapes = [f"{p} {stored[p][0]} (expected {expected[p][0]})" for p in sorted(set(stored) & set(expected))
              if stored[p][0] != expected[p][0]]
    if shapes:
        problems.append(f"{len(shapes)} with other shapes: {'; '.join(shapes[:4])}{' …' if len(shapes) > 4 else ''}")
    types = [f"{p} {stored[p][1]} (expected {expected[p][1]})" for p in sorted(set(stored) & set(expected))
             if dtypes and stored[p][1] != expected[p][1]]
    if types:
        problems.append(f"{len(types)} with other dtypes: {'; '.join(types[:4])}{' …' if len(types) > 4 else ''}")
    return "; ".join(problems)


def load_params(path: str | os.PathLike, config, shardings=None) -> dict:
    """Restore the parameters, cast to ``config.param_dtype``, after checking every stored leaf's path and
    shape against what ``config`` builds. ``shardings``: a ``NamedSharding`` tree (``sharding.param_shardings``):
    each leaf is restored straight into it, each process reading only the shards its devices hold."""
    from zebrax.models import abstract_params

    params_dir = as_path(path) / "params"
    if not params_dir.is_dir():
        raise CheckpointError(f"{path}: incomplete checkpoint (no params/)")
    check_writable_path(params_dir)
    target = abstract_params(config)
    expected = {p: (tuple(x.shape), np.dtype(x.dtype)) for p, x in _flat(target).items()}
    if shardings is not None:
        import jax

        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)
    try:
        problems = _compare_params(params_dir, expected, dtypes=False)
    except _Unreadable as e:
        raise CheckpointError(f"{params_dir}: damaged or incomplete parameters ({e})") from None
    if problems:
        raise CheckpointError(f"{params_dir}: parameters do not match config.json "
                              f"({config.describe()}): {problems}")
    try:
        with _native_output_held():
            return _ocp().StandardCheckpointer().restore(params_dir, target)
    except Exception as e:  # damaged data files: orbax and tensorstore raise many types
        interrupts.check()
        text = str(e).strip().splitlines()
        raise CheckpointError(f"{params_dir}: cannot restore parameters ({text[0] if text else type(e).__name__})"
                              ) from None


def tokenizer_dir(path: str | os.PathLike) -> Path | None:
    """The checkpoint's tokenizer/ as a local directory (transformers reads only those): an object store's is
    downloaded once a process, into a temporary directory; None without one."""
    if is_local(path):
        d = Path(path) / "tokenizer"
        return d if d.is_dir() else None
    return _downloaded(os.fspath(path).rstrip("/") + "/tokenizer")


@functools.cache
def _downloaded(uri: str) -> Path | None:
    import tempfile

    if not as_path(uri).exists():
        return None
    local = Path(tempfile.mkdtemp(prefix="zebrax-tokenizer-")) / "tokenizer"
    atexit.register(shutil.rmtree, local.parent, ignore_errors=True)
    copy_tree(uri, local)
    return local


__all__ = ["atomic_directory", "atomic_directory_of_all", "is_local", "as_path", "committed", "remove_tree",
           "copy_tree", "save", "load_config", "load_params", "is_checkpoint", "is_replaceable", "tokenizer_dir",
           "sweep_stale", "rename_noreplace", "check_writable_path"]
