"""Causal grouped-query attention with a key mask, materialised: the definition the kernels are tested against.

Causality is by slot: query ``i`` sits in key slot ``q_offset + i`` and sees key slots ``j <= q_offset + i``
that ``kv_mask`` marks real. A query that sees no key at all (left padding) outputs zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_reference(q, k, v, *, kv_mask=None, q_offset=0, scale=None):
    """q ``[B, Lq, H, Dqk]``, k ``[B, Lk, G, Dqk]``, v ``[B, Lk, G, Dv]``, kv_mask ``[B, Lk]`` bool
    → ``[B, Lq, H, Dv]``.

    Query head h reads KV head ``h // (H // G)``; scores and softmax in float32; output in v's dtype.
    """
    b, lq, h, d = q.shape
    lk, g = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, lq, g, h // g, d)
    scores = jnp.einsum("bqgrd,bkgd->bgrqk", qg, k, preferred_element_type=jnp.float32) * scale
    allowed = jnp.arange(lk)[None, :] <= (q_offset + jnp.arange(lq))[:, None]  # [Lq, Lk]
    allowed = allowed[None, None, None]
    if kv_mask is not None:
        allowed = allowed & kv_mask[:, None, None, None, :]
    probs = jax.nn.softmax(jnp.where(allowed, scores, jnp.finfo(jnp.float32).min), axis=-1)
    probs = jnp.where(jnp.any(allowed, axis=-1, keepdims=True), probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v)
    return out.reshape(b, lq, h, v.shape[-1])
