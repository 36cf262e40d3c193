"""zebrax parameters → transformers layout: an HF directory, or an in-memory torch model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from zebrax import checkpoint
from zebrax.config import HybridConfig
from zebrax.convert import hybrid
from zebrax.convert.architectures import tensor_map
from zebrax.convert.hf import TOKENIZER_FILES
from zebrax.convert.hf_config import to_hf
from zebrax.convert.hybrid import LAYOUT_FILES
from zebrax.convert.mapping import hf_tensors
from zebrax.errors import ConfigError
from zebrax.files import atomic_directory
from zebrax.mixers import kind

EXPORT_MARK = "zebrax_export"  # safetensors metadata key: this directory was written by ``export``


def is_export(path: Path) -> bool:
    """A directory ``export`` wrote: its safetensors carry our mark and it holds nothing else but HF files."""
    from safetensors import safe_open

    try:
        entries = {p.name for p in path.iterdir()}
        with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
            marked = EXPORT_MARK in (f.metadata() or {})
    except Exception:  # unreadable, truncated or absent: not ours to replace
        return False
    return marked and entries <= {"config.json", "model.safetensors", *LAYOUT_FILES.values(), *TOKENIZER_FILES}


def export(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False, format: str | None = None
           ) -> Path:
    """Write the zebrax checkpoint ``src`` as an HF directory (``config.json``, ``model.safetensors``, tokenizer
    files) that ``transformers.AutoModelForCausalLM.from_pretrained`` reads, or, for a hybrid, in the layout its
    layers fit (``format``: ``"amd"`` for MLA + Mamba2, ``"mambainllama"`` for attention + Mamba2, the reference
    code's; ``"zebrax"``, zebrax's own, for any other mix; ``convert/hybrid.py``): the base ``config.json``, the
    layout file (theirs with exactly their fields), one ``model.safetensors`` (their keys; each mixer under its kind's
    ``hf_module``), the head always stored. ``overwrite`` replaces only a directory
    written by ``export``."""
    from safetensors.numpy import save_file

    config = checkpoint.load_config(src)
    if isinstance(config, HybridConfig):
        format = format or hybrid.layout_of(config)
        hybrid.check_exportable(config, format)
        layout = hybrid.files_for(config, format, str(Path(dst).absolute()))
        modules = {f"layers_{i}": kind(m).hf_module for i, m in enumerate(config.mixers)}
    elif format not in (None, "hf"):
        raise ConfigError(f"export: format {format!r} is for hybrids; {type(config).__name__} exports as 'hf'")
    else:
        layout, modules = {"config.json": to_hf(config)}, None
    params = checkpoint.load_params(src, config)
    tensors_of = tensor_map(config)
    with atomic_directory(dst, overwrite=overwrite, replaceable=is_export, what="zebrax export",
                                     sources=[src]) as tmp:
        for name, content in layout.items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        tensors = dict(hf_tensors(tensors_of, params, modules))
        if isinstance(config, HybridConfig) and config.tie_word_embeddings:  # their loaders want the head stored
            tensors["lm_head.weight"] = tensors[tensors_of.hf_name(("embed_tokens", "embedding"))]
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", EXPORT_MARK: "1"})
        tokenizer = checkpoint.tokenizer_dir(src)
        if tokenizer is not None:
            for f in tokenizer.iterdir():
                shutil.copy2(f, tmp / f.name)
    return Path(dst)


def to_transformers(config, params):
    """A float32 transformers model (``LlamaForCausalLM``, ``Mamba2ForCausalLM``) holding the same weights,
    for parity tests and benchmarks."""
    import torch
    import transformers

    hf = to_hf(config)
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).to(torch.float32).eval()
    tensors_of = tensor_map(config)
    state = {name: torch.from_numpy(w) for name, w in hf_tensors(tensors_of, params)}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state[tensors_of.hf_name(("embed_tokens", "embedding"))]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"to_transformers: missing {missing}, unexpected {unexpected}")
    return model
