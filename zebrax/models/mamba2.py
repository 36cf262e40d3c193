"""A pure Mamba2 language model (transformers' ``Mamba2ForCausalLM``)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from zebrax.cache import Slots
from zebrax.config import Mamba2LMConfig
from zebrax.layers import RMSNorm
from zebrax.layers.mamba2 import Mamba2Mixer
from zebrax.models.common import CausalLM


class Mamba2Block(nn.Module):
    """``h = h + Mamba2Mixer(RMSNorm(h))``; the residual stream stays float32 with ``residual_in_fp32``."""

    config: Mamba2LMConfig
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, slots: Slots, cache=None):
        cfg = self.config
        normed = RMSNorm(cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="norm")(x)
        h, cache = Mamba2Mixer(cfg.mixer, cfg.dtype, cfg.param_dtype, self.impl, name="mixer")(
            normed, slots, cache
        )
        residual = x.astype(jnp.float32) if cfg.residual_in_fp32 else x
        return (residual + h).astype(residual.dtype), cache


class Mamba2ForCausalLM(CausalLM):
    """A stack of ``Mamba2Block``s; its decode cache is constant in length (a conv and an SSM state per layer)."""

    config: Mamba2LMConfig
    block = Mamba2Block

    @staticmethod
    def layer_cache(cfg: Mamba2LMConfig, batch: int, max_len: int):
        return Mamba2Mixer.init_cache(cfg.mixer, batch, cfg.dtype)
