"""``nope``: causal grouped-query attention with no rotary positions, over a KV cache when decoding."""

from __future__ import annotations

import flax.linen as nn
import jax

from tests.kinds.nope.config import NoPEConfig
from zebrax import ops
from zebrax.cache import KVCache, Slots
from zebrax.layers.linear import Linear


class NoPEAttention(nn.Module):
    config: NoPEConfig
    dtype: str = "float32"
    param_dtype: str = "float32"
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, slots: Slots, cache: KVCache | None = None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, g, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = Linear((h, d), ("embed",), ("heads", "head_dim"), name="q_proj", **kw)(x)
        k = Linear((g, d), ("embed",), ("kv_heads", "head_dim"), name="k_proj", **kw)(x)
        v = Linear((g, d), ("embed",), ("kv_heads", "head_dim"), name="v_proj", **kw)(x)
        if cache is not None:
            cache = cache.update(k, v, slots.offset)
            k, v = cache.keys(), cache.values()
        out = ops.attention(q, k, v, kv_mask=slots.kv_mask, q_offset=slots.offset, segment_ids=slots.segment_ids,
                            impl=self.impl)
        return Linear((x.shape[-1],), ("heads", "head_dim"), ("embed",), name="o_proj", **kw)(out), cache

    @staticmethod
    def init_cache(cfg: NoPEConfig, batch: int, max_len: int, dtype) -> KVCache:
        return KVCache.init(batch, max_len, cfg.n_kv_heads, cfg.head_dim, dtype)
