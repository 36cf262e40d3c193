"""The zebrax checkpoint: a directory written whole or not at all (``files.atomic_directory``).

    DIR/config.json     {"format": "zebrax", "format_version": 1, "model": config.to_dict(), "params_sha256": …}
    DIR/params/         the parameter tree (orbax)
    DIR/tokenizer/      tokenizer files (optional; transformers' ``save_pretrained`` layout)
    DIR/build_report.json   how a hybrid was initialised from its teacher (``zebrax.build``; optional)
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from zebrax import interrupts
from zebrax.errors import CheckpointError, ConfigError
from zebrax.files import (
    COMMITTED,
    as_path,
    atomic_directory,
    check_writable_path,
    committed,
    copy_tree,
    is_local,
    native_output_held,
)

FORMAT, FORMAT_VERSION = "zebrax", 1
CHECKPOINT_ENTRIES = frozenset({"config.json", "params", "tokenizer", "build_report.json"})


def writing(dst: str | os.PathLike, *, overwrite: bool = False, sources: Iterable[str | os.PathLike] = ()):
    """A checkpoint written at ``dst`` whole or not at all (``files.atomic_directory``): yields the directory to
    write into; ``overwrite`` replaces only a zebrax checkpoint (``is_replaceable``)."""
    return atomic_directory(dst, overwrite, replaceable=is_replaceable, what="zebrax checkpoint", sources=sources)


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def params_sha256(params: dict) -> str:
    """The SHA-256 of a parameter tree's content: every leaf's path, dtype, shape and bytes, in path order."""
    import hashlib

    digest = hashlib.sha256()
    for path, x in sorted(_flat(params).items()):
        x = np.asarray(x)
        digest.update(f"{path} {x.dtype} {x.shape}\n".encode())
        digest.update(np.ascontiguousarray(x).tobytes())
    return digest.hexdigest()


def content_sha256(path: str | os.PathLike) -> str:
    """What a checkpoint holds, as a SHA-256 of its model config and its parameters' content (``params_sha256``, as
    ``save`` records it): the identity of a teacher, whatever path it is read from and however often it was written.
    A checkpoint that records none (written by several processes, or before zebrax recorded it) is identified by
    its parameter files' names and bytes instead."""
    import hashlib

    root = as_path(path)
    meta = json.loads((root / "config.json").read_text())
    digest = hashlib.sha256(json.dumps(meta.get("model"), sort_keys=True).encode())
    if meta.get("params_sha256"):
        digest.update(meta["params_sha256"].encode())
        return digest.hexdigest()
    for f in sorted((p for p in (root / "params").rglob("*") if p.is_file()), key=lambda p: str(p)):
        digest.update(str(f.relative_to(root)).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


def save(directory: Path, config, params: dict) -> None:
    """Write config and params into ``directory`` (normally the one ``atomic_directory`` yields), then read
    the parameter metadata back: a write that cannot be restored is an error, not a success. In a multi-host run
    every process calls it (``atomic_directory_of_all``): each writes the shards its devices hold of the global
    arrays ``params``, none gathers a whole array, and process 0 writes config.json. With one process config.json
    records the parameters' ``params_sha256`` (``content_sha256``)."""
    import jax

    from zebrax.hosts import sync

    directory = as_path(directory)
    check_writable_path(directory)
    if jax.process_index() == 0:
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict()}
        if jax.process_count() == 1:
            meta["params_sha256"] = params_sha256(params)
        (directory / "config.json").write_text(json.dumps(meta, indent=2))
    try:
        with native_output_held():
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
        with native_output_held():
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
        with native_output_held():
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


__all__ = ["content_sha256", "is_checkpoint", "is_replaceable", "load_config", "load_params", "params_sha256", "save",
           "tokenizer_dir", "writing"]
