"""The Llama teacher: embeddings, pre-norm decoder blocks, final norm, LM head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from zebrax.cache import Cache, Slots
from zebrax.config import LlamaConfig
from zebrax.layers import Attention, Embed, Linear, RMSNorm, SwiGLU


class DecoderBlock(nn.Module):
    """``h = x + Attention(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h))``."""

    config: LlamaConfig
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, slots: Slots, cache=None):
        cfg = self.config
        norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        h, cache = Attention(cfg, self.impl, name="self_attn")(RMSNorm(name="input_layernorm", **norm)(x), slots, cache)
        x = x + h
        mlp = SwiGLU(cfg.intermediate_size, cfg.mlp_bias, cfg.dtype, cfg.param_dtype, name="mlp")
        return x + mlp(RMSNorm(name="post_attention_layernorm", **norm)(x)), cache


class LlamaForCausalLM(nn.Module):
    """tokens ``[B, L]`` → logits ``[B, L, vocab]`` float32 (``[B, 1, vocab]`` with ``last_only``).

    ``positions`` ``[B, L]`` default to ``0 … L-1``; ``token_mask`` ``[B, L]`` marks real tokens
    (left padding is False). With a ``cache`` the tokens are appended at ``cache.index`` and the
    updated cache is returned; without one the second output is None.
    """

    config: LlamaConfig
    impl: str = "auto"

    @nn.compact
    def __call__(self, tokens, positions=None, token_mask=None, cache: Cache | None = None, last_only=False):
        cfg = self.config
        b, length = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        if token_mask is None:
            token_mask = jnp.ones((b, length), bool)
        if cache is None:
            slots = Slots(positions=positions, kv_mask=token_mask.astype(bool), offset=jnp.zeros((), jnp.int32))
        else:
            slots = cache.slots(positions, token_mask)

        embed = Embed(cfg.vocab_size, cfg.hidden_size, cfg.dtype, cfg.param_dtype, name="embed_tokens")
        x = embed(tokens)
        new_layers = []
        for i in range(cfg.num_hidden_layers):
            x, layer_cache = DecoderBlock(cfg, self.impl, name=f"layers_{i}")(
                x, slots, None if cache is None else cache.layers[i]
            )
            new_layers.append(layer_cache)
        if last_only:
            x = x[:, -1:]
        x = RMSNorm(cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="norm")(x)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = Linear((cfg.vocab_size,), ("embed",), ("vocab",), dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, name="lm_head")(x)
        new_cache = None if cache is None else cache.advance(slots, tuple(new_layers), length)
        return logits.astype(jnp.float32), new_cache

    @staticmethod
    def init_cache(cfg: LlamaConfig, batch: int, max_len: int) -> Cache:
        return Cache.init(batch, max_len, tuple(
            Attention.init_cache(cfg, batch, max_len) for _ in range(cfg.num_hidden_layers)
        ))
