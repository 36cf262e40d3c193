"""What every zebrax language model shares: slot set-up, token embedding and the output head."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zebrax.cache import Cache, Slots
from zebrax.layers import Embed, Linear, RMSNorm


def make_slots(tokens: jax.Array, positions, token_mask, cache: Cache | None) -> Slots:
    """Default positions ``0 … L-1`` and an all-true mask; with a cache, the slots after ``cache.index``."""
    b, length = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    if token_mask is None:
        token_mask = jnp.ones((b, length), bool)
    return Slots.without_cache(positions, token_mask) if cache is None else cache.slots(positions, token_mask)


def embed(cfg, tokens: jax.Array) -> tuple[jax.Array, Embed]:
    """Token embeddings ``[B, L, hidden]`` (module ``embed_tokens``) and the embedding module (for a tied head)."""
    module = Embed(cfg.vocab_size, cfg.hidden_size, cfg.dtype, cfg.param_dtype, name="embed_tokens")
    return module(tokens), module


def lm_head(cfg, x: jax.Array, embedding: Embed, eps: float, last_only: bool) -> jax.Array:
    """Final RMSNorm (``norm``) and the LM head (``lm_head``, or the tied embedding) → float32 logits."""
    if last_only:
        x = x[:, -1:]
    x = RMSNorm(eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="norm")(x)
    if cfg.tie_word_embeddings:
        return embedding.attend(x).astype(jnp.float32)
    head = Linear((cfg.vocab_size,), ("embed",), ("vocab",), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  name="lm_head")
    return head(x).astype(jnp.float32)
