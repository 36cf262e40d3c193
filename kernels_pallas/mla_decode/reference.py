"""Absorbed MLA attention over the latent cache, materialised: the definition the decode kernel is tested against."""

from __future__ import annotations

from kernels_pallas.flash_attention.reference import attention_reference


def latent_attention_reference(q, latent, *, value_dim, kv_mask=None, q_offset=0, scale, segment_ids=None):
    """q ``[B, Lq, H, D]`` (queries in latent space: ``[q_nope W_kb ; q_pe]``), latent ``[B, S, D]``
    (``[c_kv ; k_pe]`` per cached token) → ``[B, Lq, H, value_dim]``: one KV head whose key is the latent and
    whose value is its first ``value_dim`` entries."""
    kv = latent[:, :, None, :]
    return attention_reference(q, kv, kv[..., :value_dim], kv_mask=kv_mask, q_offset=q_offset, scale=scale,
                               segment_ids=segment_ids)
