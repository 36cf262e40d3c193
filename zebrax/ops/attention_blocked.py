"""Causal grouped-query attention without ``L x L`` memory, in plain XLA: the path ``ops.attention`` takes
wherever no Pallas kernel has been measured faster.

Queries go in blocks, keys in blocks, with an online softmax (running max, denominator, accumulator per
query row). A query block visits only the key blocks that causality lets it see (a ``while`` loop with a
data-dependent trip count), so a prefill does about half the work of the materialised reference and a
decode step reads only the filled part of its cache. The query heads that share a KV head are stacked
along the rows of one product (``[G, bq * R, D] x [G, bk, D]``), so each KV block is read once per
group, never repeated per head. Masking is the reference's, slot for slot: query ``i`` sees key slots
``j <= q_offset + i`` marked real in ``kv_mask``; a query that sees no key outputs zeros.

The gradient (``jax.custom_vjp``) is FlashAttention-2's: the forward keeps only the output and the
per-row log-sum-exp, and the backward recomputes each block's probabilities. With ``expand`` (keys and values made
from each stored block inside the loop, MLA's prefill over its latent cache) there is a forward only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.flash_attention.reference import query_segments
from zebrax.errors import InvalidArgument
from zebrax.ops.auto import target_backend


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tokens per query block and per key block (a sequence no longer than a block is one block)."""

    block_q: int = 512
    block_k: int = 512


def attention_blocked(q, k, v, *, kv_mask=None, q_offset=0, scale=None, value_dim=None, segment_ids=None,
                      expand=None, blocks: Blocks = Blocks()):
    """q ``[B, Lq, H, Dqk]``, k ``[B, Lk, G, Dqk]``, v ``[B, Lk, G, Dv]`` (or None with ``value_dim``:
    the value is ``k[..., :value_dim]``, MLA's latent) → ``[B, Lq, H, Dv]`` in v's dtype (k's; expand's values').

    kv_mask ``[B, Lk]`` bool (None: every key real); q_offset: the key slot of query 0 (int or traced);
    segment_ids ``[B, Lk]`` int (ids >= 1) or None: a query sees only keys of its own segment.

    expand (v None): a key block's keys and values from what k stores, ``[B, bk, ...] → ([B, bk, G, Dqk],
    [B, bk, G, Dv])``, called inside the loop on each block a query block visits: MLA's latent cache
    decompressed a block of the sequence at a time, so no ``[B, Lk, G, D]`` array exists. Forward only: it never
    reaches the custom VJP, and ``jax.grad`` through it stops at the loop's data-dependent trip count.

    Inside, keys carry labels (the segment id of a real key, 1 without segments; 0 for a masked one) and, with
    segments, queries too: a key is visible to a query whose label it shares.
    """
    b, lq, h, dqk = q.shape
    lk, g = k.shape[1], k.shape[2]
    bq, bk = min(blocks.block_q, lq), min(blocks.block_k, lk)
    out_dtype = (k if v is None else v).dtype
    if expand is not None:
        if v is not None or value_dim is not None:
            raise InvalidArgument("attention_blocked: with expand, the values come from it: give v=None and no "
                                  "value_dim")
        k_block, v_block = jax.eval_shape(expand, jax.ShapeDtypeStruct((b, bk, *k.shape[2:]), k.dtype))
        g, value_dim, out_dtype = k_block.shape[2], v_block.shape[-1], v_block.dtype
    scale = dqk ** -0.5 if scale is None else scale
    nq, nk = -(-lq // bq), -(-lk // bk)
    kv_mask = jnp.ones((b, lk), bool) if kv_mask is None else kv_mask
    labels = (kv_mask.astype(jnp.int32) if segment_ids is None else jnp.where(kv_mask, segment_ids, 0), None)
    if segment_ids is not None:
        q_labels = query_segments(segment_ids.astype(jnp.int32), q_offset, lq)
        q_labels = jnp.where(q_labels > 0, q_labels, -1)  # a padding query matches no key, masked ones included
        labels = (labels[0], jnp.pad(q_labels, ((0, 0), (0, nq * bq - lq)), constant_values=-1))
    if nk * bk != lk:
        pad = ((0, 0), (0, nk * bk - lk), (0, 0), (0, 0))
        k = jnp.pad(k, pad)
        v = None if v is None else jnp.pad(v, pad)
        labels = (jnp.pad(labels[0], ((0, 0), (0, nk * bk - lk))), labels[1])
    if nq * bq != lq:
        q = jnp.pad(q, ((0, 0), (0, nq * bq - lq), (0, 0), (0, 0)))
    # [B, Lq, H, D] -> [nq, B, G, bq * R, D]: a query block's rows are (query, head of the group)
    if q.dtype == jnp.float32:  # the scale folded into the queries (bf16/fp16 queries keep their rounding)
        q, scale = q * scale, 1.0
    qt = q.reshape(b, nq, bq, g, h // g, dqk).transpose(1, 0, 3, 2, 4, 5).reshape(nq, b, g, bq * (h // g), dqk)
    geometry = _Geometry(bq=bq, bk=bk, nk=nk, r=h // g, scale=scale,
                         value_dim=value_dim if v is None else v.shape[-1], expand=expand)
    blocked = _blocked if expand is None else lambda *a: _forward(*a)[0]
    out = blocked(geometry, qt, k, v, labels, jnp.asarray(q_offset, jnp.int32))
    dv = out.shape[-1]
    out = out.reshape(nq, b, g, bq, h // g, dv).transpose(1, 0, 3, 2, 4, 5).reshape(b, nq * bq, h, dv)
    return out[:, :lq].astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    bq: int
    bk: int
    nk: int
    r: int  # query heads per KV head
    scale: float
    value_dim: int
    expand: Callable | None = None  # a stored key block → (keys, values), forward only: never reaches ``_blocked``


def _visible(geo: _Geometry, i, j, labels, q_offset, causal=True):
    """[B, 1, bq * R, bk] bool: key slot <= the row's query slot, and the key's label is the row's (is non-zero,
    without query labels)."""
    k_labels, q_labels = labels
    k_l = lax.dynamic_slice_in_dim(k_labels, j * geo.bk, geo.bk, axis=1)
    if q_labels is None:
        real = (k_l > 0)[:, None, None, :]
    else:  # a block's rows are (query, head of the group)
        q_l = jnp.repeat(lax.dynamic_slice_in_dim(q_labels, i * geo.bq, geo.bq, axis=1), geo.r, axis=1)
        real = (q_l[:, :, None] == k_l[:, None, :])[:, None]
    if not causal:
        return real
    q_slot = q_offset + i * geo.bq + jnp.arange(geo.bq * geo.r) // geo.r
    k_slot = j * geo.bk + jnp.arange(geo.bk)
    return (k_slot[None, :] <= q_slot[:, None])[None, None] & real


def _full_key_blocks(geo: _Geometry, i, q_offset):
    """Key blocks ``0 … n-1`` lie wholly before query block ``i``'s first slot: only the key mask applies."""
    return jnp.clip((q_offset + i * geo.bq + 1) // geo.bk, 0, geo.nk)


def _key_blocks(geo: _Geometry, i, q_offset):
    """Key blocks ``0 … n-1`` hold every slot that query block ``i`` may see."""
    return jnp.clip((q_offset + (i + 1) * geo.bq + geo.bk - 1) // geo.bk, 0, geo.nk)


def _block(geo: _Geometry, a, j):
    return lax.dynamic_slice_in_dim(a, j * geo.bk, geo.bk, axis=1)


FEW_ROWS = 32  # up to this many rows per KV head (decode steps), products skip the KV block's transpose


def _few_rows(m: int) -> bool:
    """Whether a block of ``m`` rows per KV head multiplies against the KV block as stored, ``[B, bk * G, D]``.
    Not on a TPU: there KV caches are heads-major (``cache.KVCache``), which the head-major product reads where
    they lie and that view would relay out every layer's cache each step (Llama-3.1-8B's decode step at 32k:
    1.90× the bytes it must read, SmolLM2's at 4k 1.82×)."""
    return m <= FEW_ROWS and target_backend() != "tpu"


def _scores(geo: _Geometry, q_i, k_j):
    """q_i ``[B, G, M, D]``, k_j ``[B, bk, G, D]`` → float32 ``[B, G, M, bk]``.

    With few rows (a decode step, ``_few_rows``) the product runs against the block as stored, ``[B, bk * G,
    D]``, over every (row group, key group) pair and keeps the matching pairs: G times the multiply-adds of a
    handful of rows, but no copy of the cache block into a head-major layout, which is what a decode step on a
    CPU would spend its time on (with one KV group, MLA's latent, it is the plain product against the block as
    stored).
    """
    b, g, m, d = q_i.shape
    if _few_rows(m):
        s = jnp.einsum("bmd,bnd->bmn", q_i.reshape(b, g * m, d), k_j.reshape(b, geo.bk * g, d),
                       preferred_element_type=jnp.float32).reshape(b, g, m, geo.bk, g)
        s = jnp.moveaxis(jnp.diagonal(s, axis1=1, axis2=4), -1, 1)
    else:
        s = jnp.einsum("bgmd,bkgd->bgmk", q_i, k_j, preferred_element_type=jnp.float32)
    return s if geo.scale == 1.0 else s * geo.scale


def _weighted_values(p, v_j):
    """p ``[B, G, M, bk]``, v_j ``[B, bk, G, Dv]`` → float32 ``[B, G, M, Dv]`` (few rows: as in ``_scores``)."""
    b, g, m, bk = p.shape
    p = p.astype(v_j.dtype)
    if _few_rows(m):
        out = jnp.einsum("bmk,bkn->bmn", p.reshape(b, g * m, bk), v_j.reshape(b, bk, -1),
                         preferred_element_type=jnp.float32).reshape(b, g, m, g, -1)
        return jnp.moveaxis(jnp.diagonal(out, axis1=1, axis2=3), -1, 1)
    return jnp.einsum("bgmk,bkgd->bgmd", p, v_j, preferred_element_type=jnp.float32)


def _value_block(geo: _Geometry, k_j, v, j):
    """Values of key block ``j``: from v, or (v None) the key block's first ``value_dim`` entries."""
    return k_j[..., :geo.value_dim] if v is None else _block(geo, v, j)


def _forward(geo: _Geometry, qt, k, v, labels, q_offset):
    """(out ``[nq, B, G, M, Dv]`` float32, lse ``[nq, B, G, M]``); v None: the value is k's prefix, or with
    ``geo.expand`` the second of what it makes of each key block."""
    def query_block(args):
        i, q_i = args

        def key_block(j, carry, causal):
            m, denom, acc = carry
            k_j = _block(geo, k, j)
            if geo.expand is not None:
                k_j, v_j = geo.expand(k_j)
            s = jnp.where(_visible(geo, i, j, labels, q_offset, causal), _scores(geo, q_i, k_j), -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            if geo.expand is not None:
                pv = _weighted_values(p, v_j)
            elif v is None:  # the latent's value prefix, taken from the product (slicing the block first copies it)
                pv = _weighted_values(p, k_j)[..., :geo.value_dim]
            else:
                pv = _weighted_values(p, _block(geo, v, j))
            return m_new, alpha * denom + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

        rows = q_i.shape[:3]
        init = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
                jnp.zeros((*rows, geo.value_dim), jnp.float32))
        n_full, n = _full_key_blocks(geo, i, q_offset), _key_blocks(geo, i, q_offset)
        carry = lax.fori_loop(0, n_full, functools.partial(key_block, causal=False), init)
        m, denom, acc = lax.fori_loop(n_full, n, functools.partial(key_block, causal=True), carry)
        seen = denom > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, denom, 1.0)[..., None], 0.0)
        return out, jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), 0.0)

    return lax.map(query_block, (jnp.arange(qt.shape[0]), qt))


def _backward(geo: _Geometry, qt, k, v, labels, q_offset, out, lse, d_out):
    """FlashAttention-2: (dqt, dk, dv) with every block's probabilities recomputed from ``lse``."""
    delta = jnp.sum(d_out * out, axis=-1)  # [nq, B, G, M]
    def query_block(i, carry):
        dq, dk, dv = carry
        q_i, lse_i, do_i, delta_i = qt[i], lse[i], d_out[i], delta[i]

        def key_block(j, inner):
            dq_i, dk, dv = inner
            k_j = _block(geo, k, j)
            v_j = _value_block(geo, k_j, v, j)
            s = _scores(geo, q_i, k_j)
            p = jnp.where(_visible(geo, i, j, labels, q_offset), jnp.exp(s - lse_i[..., None]), 0.0)
            dv_j = jnp.einsum("bgmk,bgmd->bkgd", p, do_i, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bgmd,bkgd->bgmk", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None]) * geo.scale
            dq_i = dq_i + jnp.einsum("bgmk,bkgd->bgmd", ds, k_j, preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("bgmk,bgmd->bkgd", ds, q_i, preferred_element_type=jnp.float32)
            if v is None:  # the value is the key's prefix: its gradient lands on the same latent
                dk_j = dk_j.at[..., :geo.value_dim].add(dv_j)
            else:
                dv = lax.dynamic_update_slice_in_dim(dv, _block(geo, dv, j) + dv_j, j * geo.bk, axis=1)
            dk = lax.dynamic_update_slice_in_dim(dk, _block(geo, dk, j) + dk_j, j * geo.bk, axis=1)
            return dq_i, dk, dv

        dq_i = jnp.zeros(q_i.shape, jnp.float32)
        dq_i, dk, dv = lax.fori_loop(0, _key_blocks(geo, i, q_offset), key_block, (dq_i, dk, dv))
        return dq.at[i].set(dq_i), dk, dv

    init = (jnp.zeros(qt.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
            jnp.zeros((0,) if v is None else v.shape, jnp.float32))
    dq, dk, dv = lax.fori_loop(0, qt.shape[0], query_block, init)
    return dq.astype(qt.dtype), dk.astype(k.dtype), None if v is None else dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked(geo, qt, k, v, labels, q_offset):
    """v None: the value is k's first ``geo.value_dim`` entries (MLA's latent), and its gradient lands on k."""
    return _forward(geo, qt, k, v, labels, q_offset)[0]


def _blocked_fwd(geo, qt, k, v, labels, q_offset):
    out, lse = _forward(geo, qt, k, v, labels, q_offset)
    return out, (qt, k, v, labels, q_offset, out, lse)


def _blocked_bwd(geo, residuals, d_out):
    dq, dk, dv = _backward(geo, *residuals, d_out)
    return dq, dk, dv, None, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
