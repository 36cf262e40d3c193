"""zebrax parameters → transformers layout: an HF directory, or an in-memory torch model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from zebrax import checkpoint
from zebrax.convert.architectures import TENSOR_MAPS
from zebrax.convert.hf import TOKENIZER_FILES
from zebrax.convert.mapping import hf_tensors

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
    return marked and entries <= {"config.json", "model.safetensors", *TOKENIZER_FILES}


def export(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the zebrax checkpoint ``src`` as an HF directory (``config.json``, ``model.safetensors``,
    tokenizer files) that ``transformers.AutoModelForCausalLM.from_pretrained`` reads. ``overwrite`` replaces
    only a directory written by ``export``."""
    from safetensors.numpy import save_file

    config = checkpoint.load_config(src)
    params = checkpoint.load_params(src, config)
    with checkpoint.atomic_directory(dst, overwrite=overwrite, replaceable=is_export, what="zebrax export",
                                     sources=[src]) as tmp:
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        tensors = dict(hf_tensors(TENSOR_MAPS[config.model_type], params))
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

    hf = config.to_hf_dict()
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).to(torch.float32).eval()
    tensor_map = TENSOR_MAPS[config.model_type]
    state = {name: torch.from_numpy(w) for name, w in hf_tensors(tensor_map, params)}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state[tensor_map.hf_name(("embed_tokens", "embedding"))]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"to_transformers: missing {missing}, unexpected {unexpected}")
    return model
