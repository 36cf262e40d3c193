"""Model registry: ``model_type`` → (config class, Flax module class), and shape-only views of a model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from zebrax.cache import cache_sizes as measure_cache
from zebrax.config import DeepseekV3Config, LlamaConfig, Mamba2LMConfig
from zebrax.errors import ConfigError, InvalidArgument
from zebrax.models.deepseek_v3 import DeepseekV3ForCausalLM
from zebrax.models.llama import LlamaForCausalLM
from zebrax.models.mamba2 import Mamba2ForCausalLM

REGISTRY = {
    LlamaConfig.model_type: (LlamaConfig, LlamaForCausalLM),
    Mamba2LMConfig.model_type: (Mamba2LMConfig, Mamba2ForCausalLM),
    DeepseekV3Config.model_type: (DeepseekV3Config, DeepseekV3ForCausalLM),
}


def config_from_dict(d: dict):
    """Rebuild a config saved with ``config.to_dict()``."""
    model_type = d.get("model_type")
    if model_type not in REGISTRY:
        raise ConfigError(f"unknown model_type {model_type!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[model_type][0].from_dict(d)


def impls(config) -> tuple[str, ...]:
    """The ``impl`` values a model accepts: its SSD impls for a Mamba2 model, else the attention impls."""
    from zebrax.ops import AttentionImpl, SSDImpl

    return tuple(i.value for i in (SSDImpl if config.model_type == Mamba2LMConfig.model_type else AttentionImpl))


def build(config, impl: str = "auto") -> nn.Module:
    """The Flax module of a config."""
    if impl not in impls(config):
        raise InvalidArgument(f"impl={impl!r} is not one of {impls(config)} for {type(config).__name__}")
    return REGISTRY[config.model_type][1](config, impl)


def _boxed_params(config) -> dict:
    module = build(config)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def abstract_params(config) -> dict:
    """The parameter tree of a config as ``jax.ShapeDtypeStruct`` leaves (nothing is allocated)."""
    return nn.unbox(_boxed_params(config))


def logical_axes(config) -> dict:
    """The parameter tree with each leaf's logical axis names, e.g. ``('embed', 'heads', 'head_dim')``."""
    return jax.tree.map(
        lambda b: b.names, _boxed_params(config), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def param_count(config) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(abstract_params(config)))


def cache_sizes(config) -> tuple[int, int]:
    """(decode-cache bytes per token, constant decode-state bytes) of one sequence, summed over layers."""
    module_cls = REGISTRY[config.model_type][1]
    return measure_cache(lambda batch, max_len: module_cls.init_cache(config, batch, max_len))


__all__ = [
    "REGISTRY", "DeepseekV3ForCausalLM", "LlamaForCausalLM", "Mamba2ForCausalLM", "abstract_params", "build",
    "cache_sizes", "config_from_dict", "impls", "logical_axes", "param_count",
]
