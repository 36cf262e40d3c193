"""Causal grouped-query attention with a key mask, materialised: the definition the kernels are tested against.

Causality is by slot: query ``i`` sits in key slot ``q_offset + i`` and sees key slots ``j <= q_offset + i``
that ``kv_mask`` marks real. With ``segment_ids`` (documents packed into one row; ids >= 1, 0 for padding) a query
sees only keys of its own document: the query in slot s has the id of slot s. A query that sees no key at all
(left padding) outputs zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def query_segments(segment_ids, q_offset, lq: int):
    """``[B, Lq]``: the segment id of each query, the id of the slot it sits in (``q_offset + i``)."""
    return lax.dynamic_slice_in_dim(segment_ids, jnp.asarray(q_offset, jnp.int32), lq, axis=1)


def attention_reference(q, k, v, *, kv_mask=None, q_offset=0, scale=None, segment_ids=None):
    """q ``[B, Lq, H, Dqk]``, k ``[B, Lk, G, Dqk]``, v ``[B, Lk, G, Dv]``, kv_mask ``[B, Lk]`` bool, segment_ids
    ``[B, Lk]`` int or None → ``[B, Lq, H, Dv]``.

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
    if segment_ids is not None:
        same = query_segments(segment_ids, q_offset, lq)[:, :, None] == segment_ids[:, None, :]  # [B, Lq, Lk]
        allowed = allowed & same[:, None, None]
    probs = jax.nn.softmax(jnp.where(allowed, scores, jnp.finfo(jnp.float32).min), axis=-1)
    probs = jnp.where(jnp.any(allowed, axis=-1, keepdims=True), probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v)
    return out.reshape(b, lq, h, v.shape[-1])
