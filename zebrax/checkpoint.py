"""The zebrax checkpoint directory.

    DIR/config.json     {"format": "zebrax", "format_version": 1, "model": config.to_dict()}
    DIR/params/         the parameter tree (orbax)
    DIR/tokenizer/      tokenizer files (optional; transformers' ``save_pretrained`` layout)

Every writer goes through ``atomic_directory``: the checkpoint is built in a temporary sibling and
renamed into place only when complete, so a failure never leaves a half-written checkpoint and
never touches an existing one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

import orbax.checkpoint as ocp

from zebrax.errors import CheckpointError, ConfigError
from zebrax.models import abstract_params, config_from_dict

FORMAT, FORMAT_VERSION = "zebrax", 1


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False):
    """Yield a fresh temporary directory that becomes ``dst`` when the block ends without error."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: already exists (pass overwrite=True / --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save(directory: Path, config, params: dict) -> None:
    """Write config and params into ``directory`` (normally the one ``atomic_directory`` yields)."""
    directory = Path(directory).absolute()
    (directory / "config.json").write_text(
        json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict()}, indent=2)
    )
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", params)
    checkpointer.wait_until_finished()


def is_checkpoint(path: str | os.PathLike) -> bool:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_config(path: str | os.PathLike):
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: not a zebrax checkpoint (no config.json)")
    try:
        meta = json.loads(config_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
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


def load_params(path: str | os.PathLike, config) -> dict:
    """Restore the parameters, cast to ``config.param_dtype``."""
    params_dir = Path(path).absolute() / "params"
    if not params_dir.is_dir():
        raise CheckpointError(f"{Path(path)}: incomplete checkpoint (no params/)")
    target = abstract_params(config)
    try:
        return ocp.StandardCheckpointer().restore(params_dir, target)
    except Exception as e:  # orbax raises many types; the message is what the user needs
        raise CheckpointError(f"{params_dir}: cannot restore parameters for {type(config).__name__}: {e}") from None


def tokenizer_dir(path: str | os.PathLike) -> Path | None:
    d = Path(path) / "tokenizer"
    return d if d.is_dir() else None


__all__ = ["atomic_directory", "save", "load_config", "load_params", "is_checkpoint", "tokenizer_dir"]
