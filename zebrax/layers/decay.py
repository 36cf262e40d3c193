"""The per-head decay of the linear mixers (Mamba2, Gated DeltaNet): ``A = −exp(A_log)`` and the step's
``dt = softplus(x + dt_bias)``, initialised as mamba_ssm initialises them."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def dt_bias_init(cfg):
    """softplus⁻¹ of dt ~ exp(U(log dt_min, log dt_max)), floored at dt_init_floor."""

    def init(key, shape, dtype):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = jnp.maximum(dt, cfg.dt_init_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def a_log_init(cfg):
    """A_log = log A, A ~ U(A_init_range)."""

    def init(key, shape, dtype):
        low, high = cfg.A_init_range
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high)).astype(dtype)

    return init


def head_param(module: nn.Module, name: str, init, heads: int, dtype):
    """A parameter of one value per state head (``A_log``, ``dt_bias``, ``D``) in ``module``'s scope."""
    return module.param(name, nn.with_logical_partitioning(init, ("ssm_heads",)), (heads,), dtype)
