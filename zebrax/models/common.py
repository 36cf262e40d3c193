"""What every zebrax language model shares: the stack around the blocks (embeddings, slots, final norm, head)."""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
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


def lm_head(cfg, x: jax.Array, embedding: Embed, last_only: bool) -> jax.Array:
    """Final RMSNorm (``norm``) and the LM head (``lm_head``, or the tied embedding) → float32 logits."""
    if last_only:
        x = x[:, -1:]
    x = RMSNorm(cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="norm")(x)
    if cfg.tie_word_embeddings:
        return embedding.attend(x).astype(jnp.float32)
    head = Linear((cfg.vocab_size,), ("embed",), ("vocab",), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  name="lm_head")
    return head(x).astype(jnp.float32)


class CausalLM(nn.Module):
    """tokens ``[B, L]`` → logits ``[B, L, vocab]`` float32 (``[B, 1, vocab]`` with ``last_only``).

    ``positions`` ``[B, L]`` default to ``0 … L-1``; ``token_mask`` ``[B, L]`` marks real tokens (left
    padding is False). With a ``cache`` the tokens are appended at ``cache.index`` and the updated cache is
    returned; without one the second output is None. Subclasses name their ``block`` (called as
    ``block(config, impl)(x, slots, layer_cache) -> (x, layer_cache)``) and the cache one layer keeps
    (``layer_cache``).
    """

    config: Any
    impl: str = "auto"
    block: ClassVar[type[nn.Module]]

    @nn.compact
    def __call__(self, tokens, positions=None, token_mask=None, cache: Cache | None = None, last_only=False):
        cfg = self.config
        slots = make_slots(tokens, positions, token_mask, cache)
        x, embedding = embed(cfg, tokens)
        new_layers = []
        for i in range(cfg.num_hidden_layers):
            x, layer_cache = self.block(cfg, self.impl, name=f"layers_{i}")(
                x, slots, None if cache is None else cache.layers[i]
            )
            new_layers.append(layer_cache)
        logits = lm_head(cfg, x, embedding, last_only)
        return logits, None if cache is None else cache.advance(slots, tuple(new_layers), tokens.shape[1])

    @staticmethod
    def layer_cache(cfg, batch: int, max_len: int):
        """The decode cache of one layer for ``batch`` sequences of up to ``max_len`` tokens."""
        raise NotImplementedError

    @classmethod
    def init_cache(cls, cfg, batch: int, max_len: int) -> Cache:
        return Cache.init(batch, max_len, tuple(cls.layer_cache(cfg, batch, max_len)
                                                for _ in range(cfg.num_hidden_layers)))
