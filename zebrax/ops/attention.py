"""Causal multi-head attention with grouped KV heads, and MLA's latent attention, behind one signature each.

Slots, not positions, define causality: query ``i`` sits in key slot ``q_offset + i`` and sees key
slots ``j <= q_offset + i`` for which ``kv_mask`` is true. The same call serves a full forward pass
(``q_offset = 0``, keys = the queries' own tokens) and a decode step over a preallocated cache
(``q_offset`` = the cache index, ``kv_mask`` = which cache slots hold real tokens). ``segment_ids`` ``[B, Lk]``
(ids >= 1, 0 for padding) keeps documents packed into one row apart: a query sees only its own document's keys.
"""

from __future__ import annotations

import enum

import jax

from kernels_pallas.flash_attention.reference import attention_reference
from kernels_pallas.mla_decode.reference import latent_attention_reference
from zebrax.errors import InvalidArgument
from zebrax.ops.attention_blocked import attention_blocked
from zebrax.ops.auto import pallas_is_default, target_backend
from zebrax.ops.sharded import per_shard


class AttentionImpl(str, enum.Enum):
    REFERENCE = "reference"  # plain jnp: scores materialised, softmax in float32; the definition
    BLOCKED = "blocked"  # plain XLA, online softmax over blocks: no L x L memory, future blocks skipped
    PALLAS = "pallas"  # kernels_pallas: flash attention (forward + backward), MLA decode (forward)
    AUTO = "auto"  # see ``resolve``


def _resolve(impl: str | AttentionImpl, kernel: str) -> AttentionImpl:
    """``auto``: the Pallas ``kernel`` where it was measured faster on this backend, the blocked path elsewhere."""
    impl = AttentionImpl(impl)
    if impl is AttentionImpl.AUTO:
        return AttentionImpl.PALLAS if pallas_is_default(kernel) else AttentionImpl.BLOCKED
    return impl


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_mask: jax.Array | None = None,
    q_offset: jax.Array | int = 0,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
    impl: str | AttentionImpl = AttentionImpl.AUTO,
) -> jax.Array:
    """q ``[B, Lq, H, Dqk]``, k ``[B, Lk, G, Dqk]``, v ``[B, Lk, G, Dv]`` → ``[B, Lq, H, Dv]``.

    ``G`` divides ``H``; query head ``h`` reads KV head ``h // (H // G)``. ``kv_mask`` ``[B, Lk]``
    bool (None: all keys real). ``scale`` defaults to ``Dqk ** -0.5``.
    """
    if q.shape[2] % k.shape[2]:
        raise InvalidArgument(f"attention: {k.shape[2]} KV heads must divide {q.shape[2]} query heads")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    impl = _resolve(impl, "flash_attention")
    if impl is AttentionImpl.PALLAS:
        from kernels_pallas.flash_attention import flash_attention

        run = lambda q, k, v, m, o, s: flash_attention(q, k, v, kv_mask=m, q_offset=o, scale=scale,  # noqa: E731
                                                       segment_ids=s, backend=target_backend())
        return per_shard(run, (q, k, v, kv_mask, q_offset, segment_ids), ("b.h.", "b.h.", "b.h.", "b.", "", "b."),
                         "b.h.")
    if impl is AttentionImpl.BLOCKED:
        return attention_blocked(q, k, v, kv_mask=kv_mask, q_offset=q_offset, scale=scale, segment_ids=segment_ids)
    return attention_reference(q, k, v, kv_mask=kv_mask, q_offset=q_offset, scale=scale, segment_ids=segment_ids)


def latent_attention(
    q: jax.Array,
    latent: jax.Array,
    *,
    value_dim: int,
    kv_mask: jax.Array | None = None,
    q_offset: jax.Array | int = 0,
    scale: float,
    segment_ids: jax.Array | None = None,
    impl: str | AttentionImpl = AttentionImpl.AUTO,
) -> jax.Array:
    """MLA's absorbed attention over the latent cache: one KV head whose key is the whole latent and whose
    value is its first ``value_dim`` entries (``c_kv`` of ``[c_kv ; k_pe]``).

    q ``[B, Lq, H, D]`` (queries already in latent space), latent ``[B, S, D]`` → ``[B, Lq, H, value_dim]``.
    The Pallas kernel (split along the cache) is forward only and for decoding: it takes no ``segment_ids``; the
    blocked path has gradients.
    """
    impl = _resolve(impl, "mla_decode")
    if impl is AttentionImpl.PALLAS:
        from kernels_pallas.mla_decode import mla_decode

        if segment_ids is not None:
            raise InvalidArgument("latent_attention: the Pallas decode kernel takes no segment_ids (packed rows); "
                                  "use impl='blocked' or 'reference'")
        run = lambda q, c, m, o: mla_decode(q, c, value_dim=value_dim, kv_mask=m, q_offset=o, scale=scale,  # noqa: E731
                                                  backend=target_backend())
        return per_shard(run, (q, latent, kv_mask, q_offset), ("b.h.", "b..", "b.", ""), "b.h.")
    if impl is AttentionImpl.BLOCKED:
        return attention_blocked(q, latent[:, :, None], None, value_dim=value_dim, kv_mask=kv_mask,
                                 q_offset=q_offset, scale=scale, segment_ids=segment_ids)
    return latent_attention_reference(q, latent, value_dim=value_dim, kv_mask=kv_mask, q_offset=q_offset, scale=scale,
                                      segment_ids=segment_ids)


def latent_prefill_attention(
    q: jax.Array,
    latent: jax.Array,
    expand,
    *,
    kv_mask: jax.Array | None = None,
    q_offset: jax.Array | int = 0,
    scale: float,
    segment_ids: jax.Array | None = None,
    impl: str | AttentionImpl = AttentionImpl.AUTO,
) -> jax.Array:
    """MLA's materialised attention over its latent cache (a chunk of a prefill): q ``[B, Lq, H, Dqk]``, latent
    ``[B, S, W]``, expand ``[B, n, W] → (k [B, n, G, Dqk], v [B, n, G, Dv])`` → ``[B, Lq, H, Dv]``.

    The blocked path decompresses the cache one key block at a time inside the attention loop, so a chunk's
    temporaries grow with the latent (W values a token), not with the keys and values it decompresses to
    (``G·(Dqk + Dv)``). A key block is decompressed once for each query block that visits it (``Blocks``' 512
    tokens): SmolLM2's hybrid adds 3% to its attention's FLOPs, the 8B hybrid 6% (``aot.attention_flops``).
    The reference and the Pallas kernel decompress the whole cache first. Forward only.
    """
    impl = _resolve(impl, "flash_attention")
    if impl is AttentionImpl.BLOCKED:
        return attention_blocked(q, latent[:, :, None], None, expand=lambda block: expand(block[:, :, 0]),
                                 kv_mask=kv_mask, q_offset=q_offset, scale=scale, segment_ids=segment_ids)
    k, v = expand(latent)
    return attention(q, k, v, kv_mask=kv_mask, q_offset=q_offset, scale=scale, segment_ids=segment_ids, impl=impl)

