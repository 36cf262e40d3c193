"""``zebrax info``: what a checkpoint or a preset is, from its config alone."""

from __future__ import annotations

import os

from zebrax import checkpoint
from zebrax.app.presets import preset_config
from zebrax.config import HybridConfig, dtype_bytes
from zebrax.models import cache_sizes, param_count


def describe(path_or_preset: str | os.PathLike) -> dict:
    """What ``zebrax info`` prints, for a checkpoint or a preset of ``configs/models/``: the config's sizes, the
    parameter count and bytes, the decode cache per token and per sequence, the share of the all-attention teacher's
    cache, and one letter per layer (A attention, L MLA, S Mamba2, D Gated DeltaNet). Nothing is loaded but the
    config."""
    is_ckpt = checkpoint.is_checkpoint(path_or_preset)
    config = checkpoint.load_config(path_or_preset) if is_ckpt else preset_config(str(path_or_preset))
    per_token, state = cache_sizes(config)
    params = param_count(config)
    layers = [spec.mixer for spec in config.plan()]
    if isinstance(config, HybridConfig):  # against its all-attention teacher
        kv_ratio = per_token / (config.teacher_cache_values_per_token() * dtype_bytes(config.dtype))
    else:
        kv_ratio = 1.0 if set(layers) == {"attention"} else None
    return {
        "source": str(path_or_preset),
        "kind": "checkpoint" if is_ckpt else "preset",
        "model_type": config.model_type,
        **config.summary(),
        "params": params,
        "param_bytes": params * dtype_bytes(config.param_dtype),
        "dtype": config.dtype,
        "cache_bytes_per_token": per_token,
        "cache_state_bytes": state,
        "kv_cache_ratio": kv_ratio,
        "layers": layers,
        "layer_map": config.layer_map(),
        "tokenizer": bool(is_ckpt and checkpoint.tokenizer_dir(path_or_preset)),
        "config": config.to_dict(),
    }

