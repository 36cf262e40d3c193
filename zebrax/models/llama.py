"""The Llama teacher: embeddings, pre-norm decoder blocks, final norm, LM head.

The block is shared with the DeepSeek-V3 (MLA) stack; only the attention module differs.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from zebrax.cache import Slots
from zebrax.config import DeepseekV3Config, LlamaConfig
from zebrax.layers import Attention, RMSNorm, SwiGLU
from zebrax.layers.mla import MLAttention
from zebrax.models.common import CausalLM


def attention_module(cfg, impl: str) -> nn.Module:
    """The block's attention: MLA for a DeepSeek-V3 config, grouped-query attention for a Llama config."""
    if isinstance(cfg, DeepseekV3Config):
        return MLAttention(cfg.attention, cfg.dtype, cfg.param_dtype, impl, name="self_attn")
    return Attention(cfg, impl, name="self_attn")


class DecoderBlock(nn.Module):
    """``h = x + Attention(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h))``."""

    config: LlamaConfig | DeepseekV3Config
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, slots: Slots, cache=None):
        cfg = self.config
        norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        attention = attention_module(cfg, self.impl)
        h, cache = attention(RMSNorm(name="input_layernorm", **norm)(x), slots, cache)
        x = x + h
        mlp = SwiGLU(cfg.intermediate_size, cfg.mlp_bias, cfg.dtype, cfg.param_dtype, cfg.hidden_act, name="mlp")
        return x + mlp(RMSNorm(name="post_attention_layernorm", **norm)(x)), cache


class LlamaForCausalLM(CausalLM):
    """The Llama decoder (``CausalLM`` with ``DecoderBlock``s); its cache holds keys and values per token."""

    config: LlamaConfig
    block = DecoderBlock

    @staticmethod
    def layer_cache(cfg: LlamaConfig, batch: int, max_len: int):
        return Attention.init_cache(cfg, batch, max_len)
