"""Checkpoint conversion: the only package that knows foreign layouts.

``convert(src, dst)`` reads an HF directory (safetensors, sharded or not, or ``pytorch_model.bin``) of a
Llama, Mistral or Mamba2 model, or a Llama ``.gguf`` file, and writes a zebrax checkpoint (see
``zebrax.checkpoint``).
"""

from __future__ import annotations

import os
from pathlib import Path

from zebrax import checkpoint, files
from zebrax.config import DTYPES
from zebrax.convert.architectures import tensor_map
from zebrax.convert.gguf import GGUFSource
from zebrax.convert.hf import HFSource
from zebrax.convert.mapping import params_from_hf
from zebrax.errors import ConfigError, ConversionError, warn


def open_source(src: str | os.PathLike) -> HFSource | GGUFSource:
    path = Path(src)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    if path.is_dir() and checkpoint.is_checkpoint(path):
        raise ConversionError(f"{path}: already a zebrax checkpoint; load it with zebrax.load")
    if path.is_file() and path.suffix == ".gguf":
        return GGUFSource(path)
    if path.is_dir() or path.suffix in (".safetensors", ".bin"):
        return HFSource(path)
    raise ConversionError(
        f"{path}: not a checkpoint (expected an HF directory with config.json, a .safetensors/.bin file "
        "beside a config.json, or a .gguf file)"
    )


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Convert the checkpoint at ``src`` into a zebrax checkpoint at ``dst``; returns ``dst``.

    ``dtype`` is the parameter and compute dtype of the result. The destination appears only when
    the conversion is complete; an existing one is replaced only with ``overwrite=True``.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {DTYPES}")
    source = open_source(src)
    config = source.config.replace(dtype=dtype, param_dtype=dtype)
    with files.warnings_after_success(), checkpoint.writing(dst, overwrite=overwrite,
                                                                             sources=[src]) as tmp:
        config, params = params_from_hf(tensor_map(config), config, source.tensors(), dtype,
                                        quiet_untie=getattr(source, "unties_quietly", False))
        checkpoint.save(tmp, config, params)
        del params
        if not source.save_tokenizer(tmp / "tokenizer"):
            warn(f"{src}: no tokenizer found; the weights are converted, and text commands (encode, chat, "
                 "generate --prompt) will need token ids")
    return Path(dst)


__all__ = ["convert", "open_source"]
