"""Causal multi-head attention with grouped KV heads, behind one signature.

Slots, not positions, define causality: query ``i`` sits in key slot ``q_offset + i`` and sees key
slots ``j <= q_offset + i`` for which ``kv_mask`` is true. The same call serves a full forward pass
(``q_offset = 0``, keys = the queries' own tokens) and a decode step over a preallocated cache
(``q_offset`` = the cache index, ``kv_mask`` = which cache slots hold real tokens).
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp


class AttentionImpl(str, enum.Enum):
    REFERENCE = "reference"  # plain jnp: scores materialised, softmax in float32
    AUTO = "auto"  # the fastest implementation that compiles on the current backend


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_mask: jax.Array | None = None,
    q_offset: jax.Array | int = 0,
    scale: float | None = None,
    impl: str | AttentionImpl = AttentionImpl.AUTO,
) -> jax.Array:
    """q ``[B, Lq, H, Dqk]``, k ``[B, Lk, G, Dqk]``, v ``[B, Lk, G, Dv]`` → ``[B, Lq, H, Dv]``.

    ``G`` divides ``H``; query head ``h`` reads KV head ``h // (H // G)``. ``kv_mask`` ``[B, Lk]``
    bool (None: all keys real). ``scale`` defaults to ``Dqk ** -0.5``.
    """
    impl = AttentionImpl(impl)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: {k.shape[2]} KV heads must divide {q.shape[2]} query heads")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # AUTO resolves to REFERENCE until a kernel is registered for the backend.
    return attention_reference(q, k, v, kv_mask=kv_mask, q_offset=q_offset, scale=scale)


def attention_reference(q, k, v, *, kv_mask, q_offset, scale):
    """The definition: materialised scores, float32 softmax."""
    b, lq, h, _ = q.shape
    lk, g = k.shape[1], k.shape[2]
    qg = q.reshape(b, lq, g, h // g, q.shape[-1])
    scores = jnp.einsum("bqgrd,bkgd->bgrqk", qg, k, preferred_element_type=jnp.float32) * scale
    allowed = jnp.arange(lk)[None, :] <= (q_offset + jnp.arange(lq))[:, None]  # [Lq, Lk]
    allowed = allowed[None, None, None]
    if kv_mask is not None:
        allowed = allowed & kv_mask[:, None, None, None, :]
    # A finite floor (not -inf) keeps fully masked rows (left padding) free of NaN.
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v)
    return out.reshape(b, lq, h, v.shape[-1])


def latent_attention(
    q: jax.Array,
    latent: jax.Array,
    *,
    value_dim: int,
    kv_mask: jax.Array | None = None,
    q_offset: jax.Array | int = 0,
    scale: float,
    impl: str | AttentionImpl = AttentionImpl.AUTO,
) -> jax.Array:
    """MLA's absorbed attention over the latent cache: one KV head whose key is the whole latent and whose
    value is its first ``value_dim`` entries (``c_kv`` of ``[c_kv ; k_pe]``).

    q ``[B, Lq, H, D]`` (queries already in latent space), latent ``[B, S, D]`` → ``[B, Lq, H, value_dim]``.
    """
    kv = latent[:, :, None, :]
    return attention(q, kv, kv[..., :value_dim], kv_mask=kv_mask, q_offset=q_offset, scale=scale, impl=impl)
