"""Grouped-query attention of the Llama teacher, with RoPE and an optional KV cache."""

from __future__ import annotations

import flax.linen as nn
import jax

from zebrax import ops
from zebrax.cache import KVCache, Slots
from zebrax.layers.linear import Linear
from zebrax.layers.rope import apply_rope, attention_factor, inv_frequencies
from zebrax.mixers.attention.config import AttentionConfig


class Attention(nn.Module):
    """x ``[B, L, embed]`` → ``[B, L, embed]``.

    q ``[B, L, heads, head_dim]``, k and v ``[B, L, kv_heads, head_dim]``; RoPE on q and k (under YaRN, cos and
    sin times its attention factor, as transformers' Llama does; the softmax scale stays ``head_dim**-0.5``); with a
    cache the new keys and values are written at ``slots.offset`` and attention runs over the cache.
    ``impl`` is an attention impl (``zebrax.ops.AttentionImpl``).
    """

    config: AttentionConfig
    dtype: str = "float32"
    param_dtype: str = "float32"
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, slots: Slots, cache: KVCache | None = None):
        cfg = self.config
        kw = dict(use_bias=cfg.attention_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        h, g, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = Linear((h, d), ("embed",), ("heads", "head_dim"), name="q_proj", **kw)(x)
        k = Linear((g, d), ("embed",), ("kv_heads", "head_dim"), name="k_proj", **kw)(x)
        v = Linear((g, d), ("embed",), ("kv_heads", "head_dim"), name="v_proj", **kw)(x)
        inv_freq, factor = inv_frequencies(d, cfg.rope_theta, cfg.rope_scaling), attention_factor(cfg.rope_scaling)
        q, k = apply_rope(q, slots.positions, inv_freq, factor), apply_rope(k, slots.positions, inv_freq, factor)
        if cache is not None:
            cache = cache.update(k, v, slots.offset)
            k, v = cache.keys(), cache.values()
        out = ops.attention(q, k, v, kv_mask=slots.kv_mask, q_offset=slots.offset, segment_ids=slots.segment_ids,
                            impl=self.impl)
        out = Linear((x.shape[-1],), ("heads", "head_dim"), ("embed",), name="o_proj", **kw)(out)
        return out, cache

    @staticmethod
    def init_cache(cfg: AttentionConfig, batch: int, max_len: int, dtype) -> KVCache:
        return KVCache.init(batch, max_len, cfg.n_kv_heads, cfg.head_dim, dtype)

