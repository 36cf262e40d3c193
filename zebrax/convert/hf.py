"""Read transformers checkpoints: ``config.json`` + safetensors (single or sharded) or ``pytorch_model.bin``,
for the architectures in ``convert/architectures.py`` (Llama, Mistral without sliding window, Mamba2).

Tensors are read one at a time. ``.bin`` files are opened with ``torch.load(weights_only=True)``,
which refuses every pickle that is not plain tensors: nothing from the file is ever executed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from zebrax.convert.architectures import ARCHITECTURES
from zebrax.convert.hf_config import from_hf
from zebrax.convert.hybrid import config_from_files, detect, weight_files
from zebrax.errors import ConfigError, ConversionError

WEIGHT_FILES = (
    "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin",
)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class HFSource:
    """A transformers checkpoint: a directory, or a weights file with ``config.json`` beside it."""

    def __init__(self, path: Path):
        self.directory = path if path.is_dir() else path.parent
        self.config_file = self.directory / "config.json"
        if not self.config_file.is_file():
            raise ConversionError(f"{self.config_file}: missing (an HF checkpoint needs config.json)")
        self.weights = [path] if path.is_file() else self._weight_files()
        self.unties_quietly = False  # a stored head that differs from a tied embedding is worth a warning
        self.config = self._read_config()

    def _weight_files(self) -> list[Path]:
        if detect(self.directory) is not None:  # the reference code's hybrids: what their loaders read
            return weight_files(self.directory)
        for name in WEIGHT_FILES:
            f = self.directory / name
            if f.is_file():
                if name.endswith(".index.json"):
                    return self._shards(f)
                return [f]
        raise ConversionError(f"{self.directory}: no weights found (looked for {', '.join(WEIGHT_FILES)})")

    def _shards(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConversionError(f"{index}: not a valid shard index ({first_line(e)})") from None
        shards = [self.directory / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise ConversionError(f"{index}: names shard {shard.name}, which is missing")
        return shards

    def _read_config(self):
        layout = detect(self.directory)
        if layout is not None:
            # their loaders never tie: the head is stored (equal to the embedding when the base model ties), or,
            # from older writers, absent. Tied here; `params_from_hf` unties if the stored head differs.
            self.unties_quietly = True
            return config_from_files(self.directory, layout, tied=True)
        try:
            d = json.loads(self.config_file.read_text())
        except ValueError as e:
            raise ConversionError(f"{self.config_file}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConversionError(f"{self.config_file}: expected a JSON object")
        model_type = d.get("model_type")
        if model_type not in ARCHITECTURES:
            archs = ", ".join(d.get("architectures") or []) or "none given"
            raise ConversionError(
                f"{self.config_file}: unsupported architecture (model_type {model_type!r}, architectures: {archs});"
                f" zebrax converts model_type {', '.join(sorted(ARCHITECTURES))}"
            )
        generation = self.directory / "generation_config.json"
        if generation.is_file():
            eos = json.loads(generation.read_text()).get("eos_token_id")
            if eos is not None:
                d["eos_token_id"] = eos
        try:
            return from_hf(ARCHITECTURES[model_type][0], d)
        except KeyError as e:
            raise ConversionError(f"{self.config_file}: missing key {e}") from None
        except (ConfigError, TypeError) as e:
            raise ConversionError(f"{self.config_file}: {e}") from None

    def tensors(self) -> Iterator[tuple[str, str, np.ndarray]]:
        for f in self.weights:
            reader = read_safetensors if f.suffix == ".safetensors" else read_torch_bin
            for name, w in reader(f):
                yield str(f), name, w

    def save_tokenizer(self, dst: Path) -> bool:
        files = [self.directory / n for n in TOKENIZER_FILES if (self.directory / n).is_file()]
        if not any(f.name.startswith(("tokenizer", "vocab")) for f in files):
            return False
        dst.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dst / f.name)
        return True


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="flax")  # the flax backend reads bfloat16
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{path}: not a valid safetensors file ({first_line(e)})") from None
    with handle as f:
        for name in f.keys():
            try:
                w = f.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise ConversionError(f"{path}: cannot read tensor {name} ({first_line(e)})") from None
            yield name, np.asarray(w, np.float32)


def read_torch_bin(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path}: reading PyTorch .bin files needs torch (pip install torch)") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # weights_only refusals, truncation, non-zip legacy files all land here
        raise ConversionError(
            f"{path}: not a plain-tensor PyTorch checkpoint, refused by torch.load(weights_only=True) "
            f"({first_line(e)})"
        ) from None
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    for name in list(state):
        t = state.pop(name)
        if not isinstance(t, torch.Tensor):
            raise ConversionError(f"{path}: entry {name} is a {type(t).__name__}, not a tensor")
        yield name, t.to(torch.float32).numpy()
