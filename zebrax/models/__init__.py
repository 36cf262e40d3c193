"""Model registry: ``model_type`` → config class; every config builds the one ``DecoderLM`` stack from its
``plan()``. Shape-only views of a model: ``abstract_params``, ``logical_axes``, ``param_count``, ``cache_sizes``."""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from zebrax.cache import cache_sizes as measure_cache
from zebrax.config import DeepseekV3Config, HybridConfig, LlamaConfig, Mamba2LMConfig
from zebrax.errors import ConfigError
from zebrax.models.decoder import Block, DecoderLM, layer_io, ops_of, remat_policy
from zebrax.models.impls import Impls

REGISTRY = {cls.model_type: cls for cls in (LlamaConfig, Mamba2LMConfig, DeepseekV3Config, HybridConfig)}


def config_from_dict(d: dict):
    """Rebuild a config saved with ``config.to_dict()``."""
    model_type = d.get("model_type")
    if model_type not in REGISTRY:
        raise ConfigError(f"unknown model_type {model_type!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[model_type].from_dict(d)


def build(config, impl: str | Mapping[str, str] | Impls = "auto", *, remat: bool | str = False) -> DecoderLM:
    """The Flax module of a config. ``impl``: one name for every op the model runs, or one per op
    (``{"attention": "reference", "ssd": "chunked"}``); InvalidArgument names a value its op does not have.
    ``remat``: recompute each block's activations in the backward pass (training memory): True, False, or a policy
    of ``models.decoder.REMAT_POLICIES``."""
    remat_policy(remat)  # a misspelt policy fails here, not when the model first runs
    return DecoderLM(config, Impls.parse(impl, ops_of(config)), remat)


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
    return measure_cache(lambda batch, max_len: DecoderLM.init_cache(config, batch, max_len))


__all__ = [
    "REGISTRY", "Block", "DecoderLM", "Impls", "abstract_params", "build", "cache_sizes", "config_from_dict",
    "layer_io", "logical_axes", "ops_of", "param_count",
]
