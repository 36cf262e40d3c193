"""Multi-head Latent Attention (DeepSeek-V3 form, with the options Zebra-Llama uses).

Two paths, one set of weights. ``materialised`` (training and prefill): K and V are decompressed from the
latent, ``[k_nope ; v] = W_kvb c_kv``, and a standard causal attention with qk dim ≠ v dim runs; over a cache
(a prefill chunk) the blocked path decompresses one block of the sequence at a time.
``absorbed`` (decode): ``W_kb`` is folded into the query, attention runs over the cached latent
``[c_kv ; k_pe]`` as one shared KV head, and ``W_vb`` is applied after, so the cache holds
``kv_lora_rank + qk_rope_head_dim`` values per token and layer.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from zebrax import ops
from zebrax.cache import LatentCache, Slots
from zebrax.layers.linear import Linear, contract
from zebrax.layers.norms import RMSNorm
from zebrax.layers.rope import apply_rope, attention_factor, interleaved_to_half, inv_frequencies, softmax_scale
from zebrax.mixers.mla.config import MLAConfig


class MLAttention(nn.Module):
    """x ``[B, L, d_model]`` → ``[B, L, d_model]``; with a cache, ``[c_kv ; k_pe]`` of the new tokens is written
    at ``slots.offset`` and attention runs over the cache.

    ``absorbed``: None picks the absorbed path for one-token decode steps and the materialised one otherwise.
    """

    config: MLAConfig
    dtype: str = "float32"
    param_dtype: str = "float32"
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, slots: Slots, cache: LatentCache | None = None, absorbed: bool | None = None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, g, r = cfg.n_heads, cfg.kv_groups, cfg.kv_lora_rank
        nope, rope, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim

        if cfg.q_lora_rank is None:
            q = Linear((h, cfg.qk_head_dim), ("embed",), ("heads", "head_dim"), name="q_proj", **kw)(x)
        else:
            q_latent = Linear((cfg.q_lora_rank,), ("embed",), ("q_lora",), use_bias=cfg.attention_bias,
                              name="q_a_proj", **kw)(x)
            if cfg.q_latent_norm:
                q_latent = RMSNorm(cfg.norm_eps, "q_lora", name="q_a_layernorm", **kw)(q_latent)
            q = Linear((h, cfg.qk_head_dim), ("q_lora",), ("heads", "head_dim"), name="q_b_proj", **kw)(q_latent)
        q_nope, q_pe = jnp.split(q, [nope], axis=-1)

        kv = Linear((r + rope,), ("embed",), ("kv_latent",), use_bias=cfg.attention_bias,
                    name="kv_a_proj_with_mqa", **kw)(x)
        c_kv, k_pe = jnp.split(kv, [r], axis=-1)
        if cfg.kv_latent_norm:
            c_kv = RMSNorm(cfg.norm_eps, "kv_lora", name="kv_a_layernorm", **kw)(c_kv)
        if cfg.rope_interleave:
            q_pe, k_pe = interleaved_to_half(q_pe), interleaved_to_half(k_pe)
        inv_freq, factor = inv_frequencies(rope, cfg.rope_theta, cfg.rope_scaling), attention_factor(cfg.rope_scaling)
        q_pe = apply_rope(q_pe, slots.positions, inv_freq, factor)
        k_pe = apply_rope(k_pe[:, :, None, :], slots.positions, inv_freq, factor)[:, :, 0]

        latent = jnp.concatenate([c_kv, k_pe], axis=-1)  # [B, L, r + rope]
        if cache is not None:
            cache = cache.update(latent, slots.offset)
            latent = cache.kv  # [B, S, W]: zeros after column r + rope (``LatentCache``)
        w_kvb = self.param("kv_b_proj", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("kv_lora", "kv_heads", "head_dim")),
                           (r, g, nope + dv), self.param_dtype).astype(self.dtype)
        w_kb, w_vb = w_kvb[..., :nope], w_kvb[..., nope:]
        scale = softmax_scale(cfg.qk_head_dim, cfg.rope_scaling)
        attend = dict(kv_mask=slots.kv_mask, q_offset=slots.offset, scale=scale, segment_ids=slots.segment_ids,
                      impl=self.impl)
        b, length = x.shape[:2]
        if absorbed if absorbed is not None else (cache is not None and length == 1):
            q_lat = jnp.einsum("blgjd,cgd->blgjc", q_nope.reshape(b, length, g, h // g, nope), w_kb)
            q_abs = jnp.concatenate([q_lat.reshape(b, length, h, r), q_pe], axis=-1)
            q_abs = jnp.pad(q_abs, [(0, 0)] * 3 + [(0, latent.shape[-1] - q_abs.shape[-1])])  # to the cache's W
            out_lat = ops.latent_attention(q_abs, latent, value_dim=r, **attend)  # [B, L, H, r]
            out = jnp.einsum("blgjc,cgv->blgjv", out_lat.reshape(b, length, g, h // g, r), w_vb)
        else:
            def expand(lat):  # [B, S, W] → k [B, S, G, nope + rope], v [B, S, G, dv]
                c, pe = jnp.split(lat[..., :r + rope], [r], axis=-1)
                k_nope, v = jnp.split(contract(c, w_kvb, 1), [nope], axis=-1)
                return jnp.concatenate([k_nope, jnp.broadcast_to(pe[:, :, None], (*k_nope.shape[:3], rope))], -1), v

            q = jnp.concatenate([q_nope, q_pe], axis=-1)
            if cache is None:
                out = ops.attention(q, *expand(latent), **attend)
            else:  # a prefill chunk: the cache decompressed a block of the sequence at a time
                out = ops.latent_prefill_attention(q, latent, expand, **attend)
        out = Linear((x.shape[-1],), ("heads", "head_dim"), ("embed",), use_bias=cfg.attention_bias,
                     name="o_proj", **kw)(out.reshape(b, length, h, dv))
        return out, cache

    @staticmethod
    def init_cache(cfg: MLAConfig, batch: int, max_len: int, dtype) -> LatentCache:
        return LatentCache.init(batch, max_len, cfg.latent_dim, dtype)

