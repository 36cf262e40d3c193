"""Causal flash attention as Pallas kernels: forward (online softmax) and backward (FlashAttention-2:
one kernel for dK/dV, one for dQ), joined by ``jax.custom_vjp``.

One program per (batch, head, block of queries) — or of keys for dK/dV — walks the other axis one tile at a
time, only as far as causality allows (``kernels_pallas.common.Sweep``: a ``fori_loop`` in the program with
Triton, the last grid axis with Mosaic), so the kernels lower for GPU and TPU and run with ``interpret=True``
on the CPU. The key mask and the slot offset of the first query
follow the reference's semantics; a query that sees no key outputs zeros. Keys and queries carry labels: the
mask row holds a key's label (its segment id, 1 without segments; 0 when masked) and each query row its own (its
segment id, or 1): a key is visible to a query whose label it shares. Grouped KV heads are read
through the index maps (head h reads KV head h // (H // G)); dK and dV are produced per query head and
summed over each group outside the kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.common import Block, Sweep, Target, cdiv, dot, lane_padded, resolve_target, sweep_call
from kernels_pallas.flash_attention.reference import query_segments

NEG = -1e30  # finite "minus infinity": fully masked rows stay free of NaN


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Queries and keys per tile. Triton wants powers of two >= 16; Mosaic TPU wants multiples of 128 for
    the key block (the mask row is sliced along lanes) and of 8 for the query block."""

    block_q: int = 64
    block_k: int = 64

    @classmethod
    def for_backend(cls, backend: str) -> BlockSizes:
        return cls(128, 128) if backend == "tpu" else cls(64, 64) if backend == "gpu" else cls(16, 16)

    def validate(self, backend: str) -> None:
        for name in ("block_q", "block_k"):
            n = getattr(self, name)
            if backend == "tpu":
                if n % (128 if name == "block_k" else 8):
                    raise ValueError(f"BlockSizes.{name}={n} must be a multiple of "
                                     f"{128 if name == 'block_k' else 8} on TPU")
            elif n < 16 or n & (n - 1):
                raise ValueError(f"BlockSizes.{name}={n} must be a power of two >= 16")


def _visible(q_start, k_start, offset, q_labels, k_labels, bq, bk):
    """[bq, bk] bool: key slot <= query slot (offset + position) and the key's label ``[1, bk]`` is the query's
    ``[bq, 1]``."""
    q_slot = offset + q_start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_slot = k_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    return (k_slot <= q_slot) & (k_labels == q_labels)


def _last_key_block(q_end, offset, bk, n_k):
    """Key blocks 0 … n-1 hold every slot a query below ``q_end`` may see."""
    return jnp.clip(cdiv(offset + q_end, bk), 0, n_k)


def _first_query_block(k_start, offset, bq, n_q):
    """Query blocks before this one cannot see a key block starting at ``k_start``."""
    return jnp.minimum(lax.div(jnp.maximum(k_start - offset, 0), bq), n_q)


def online_softmax_step(carry, s, visible, v):
    """One key block of the online softmax: carry (running max ``[rows, 1]``, denominator ``[rows, 1]``,
    accumulator ``[rows, Dv]``), scores s ``[rows, bk]`` (masked to NEG), values v ``[bk, Dv]``; the
    probabilities meet the values in the values' dtype."""
    m, denom, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    return m_new, alpha * denom + jnp.sum(p, axis=1, keepdims=True), alpha * acc + dot(p.astype(v.dtype), v)


def online_softmax_init(rows: int, dv: int):
    return (jnp.full((rows, 1), NEG, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, dv), jnp.float32))


def online_softmax_finish(carry, empty_lse: float):
    """(output ``[rows, Dv]``, log-sum-exp ``[rows, 1]``); rows that saw no key give 0 and ``empty_lse``."""
    m, denom, acc = carry
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    return acc / safe, jnp.where(seen, m + jnp.log(safe), empty_lse)


def _forward_kernel(off_ref, q_ref, ql_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, *scratch, sweep, scale, bq, bk,
                    n_k):
    i = pl.program_id(2)
    offset = off_ref[0]
    q, q_labels = q_ref[...], ql_ref[...]

    def body(j, carry):
        keys = sweep.tile(j, bk)
        visible = _visible(i * bq, j * bk, offset, q_labels, mask_ref[:, keys], bq, bk)
        s = jnp.where(visible, dot(q, k_ref[keys, :], trans_b=True) * scale, NEG)
        return online_softmax_step(carry, s, visible, v_ref[keys, :])

    def finish(carry):
        o, lse = online_softmax_finish(carry, empty_lse=0.0)  # the backward masks empty rows itself
        o_ref[...], lse_ref[...] = o.astype(o_ref.dtype), lse

    init = online_softmax_init(bq, v_ref.shape[-1])
    sweep.run(0, _last_key_block((i + 1) * bq, offset, bk, n_k), body, init, finish, scratch)


def _probs(q, k, lse, visible, scale):
    return jnp.where(visible, jnp.exp(dot(q, k, trans_b=True) * scale - lse), 0.0)


def _dkv_kernel(off_ref, q_ref, ql_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                *scratch, sweep, scale, bq, bk, n_q):
    j = pl.program_id(2)
    offset = off_ref[0]
    k, v, mask_row = k_ref[...], v_ref[...], mask_ref[...]

    def body(i, carry):
        dk, dv = carry
        rows = sweep.tile(i, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        p = _probs(q, k, lse_ref[rows, :], _visible(i * bq, j * bk, offset, ql_ref[rows, :], mask_row, bq, bk), scale)
        ds = p * (dot(do, v, trans_b=True) - delta_ref[rows, :])
        return dk + dot(ds.astype(q.dtype), q, trans_a=True) * scale, dv + dot(p.astype(do.dtype), do, trans_a=True)

    def finish(carry):
        dk_ref[...], dv_ref[...] = carry

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    sweep.run(_first_query_block(j * bk, offset, bq, n_q), n_q, body, init, finish, scratch)


def _dq_kernel(off_ref, q_ref, ql_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dq_ref, *scratch,
               sweep, scale, bq, bk, n_k):
    i = pl.program_id(2)
    offset = off_ref[0]
    q, q_labels, do, lse, delta = q_ref[...], ql_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def body(j, dq):
        keys = sweep.tile(j, bk)
        k = k_ref[keys, :]
        p = _probs(q, k, lse, _visible(i * bq, j * bk, offset, q_labels, mask_ref[:, keys], bq, bk), scale)
        ds = p * (dot(do, v_ref[keys, :], trans_b=True) - delta)
        return dq + dot(ds.astype(k.dtype), k) * scale

    def finish(dq):
        dq_ref[...] = dq

    sweep.run(0, _last_key_block((i + 1) * bq, offset, bk, n_k), body, jnp.zeros(q.shape, jnp.float32), finish,
              scratch)


class _Blocks:
    """Blocks of head-major arrays: q/o/do ``[B, H, Lq, D]``, k/v ``[B, G, Lk, D]``, mask ``[B, 1, Lk]``, per-query
    rows (lse, delta) ``[B, H, Lq, 1]``. A program is (batch, head, x): x a query block (forward, dQ) or a key
    block (dK/dV); ``s`` is the tile of the walked axis (key blocks, or query blocks for dK/dV)."""

    def __init__(self, h, g, lq, lk, bq, bk):
        kv_head = lambda hh: lax.div(hh, h // g)  # noqa: E731
        self.query = lambda d: Block((None, None, bq, d), lambda b, hh, x, s: (b, hh, x, 0))  # noqa: E731
        self.rows = self.query(1)
        self.labels = Block((None, None, bq, 1), lambda b, hh, x, s: (b, 0, x, 0))  # [B, 1, Lq, 1]
        self.labels_walked = Block((None, None, bq, 1), lambda b, hh, x, s: (b, 0, s, 0), walked=2, full=lq)
        self.key_walked = lambda d: Block((None, None, bk, d), lambda b, hh, x, s: (b, kv_head(hh), s, 0),  # noqa: E731
                                          walked=2, full=lk)
        self.mask_walked = Block((None, 1, bk), lambda b, hh, x, s: (b, 0, s), walked=2, full=lk)
        self.key = lambda d: Block((None, None, bk, d), lambda b, hh, x, s: (b, kv_head(hh), x, 0))  # noqa: E731
        self.key_out = lambda d: Block((None, None, bk, d), lambda b, hh, x, s: (b, hh, x, 0))  # noqa: E731
        self.mask = Block((None, 1, bk), lambda b, hh, x, s: (b, 0, x))
        self.query_walked = lambda d: Block((None, None, bq, d), lambda b, hh, x, s: (b, hh, s, 0),  # noqa: E731
                                            walked=2, full=lq)
        self.rows_walked = self.query_walked(1)


def _key_sweep(bq, bk, n_k):
    """Forward and dQ: query block x walks the key blocks it may see; later steps stay on the last one."""
    return lambda b, hh, x, step, offset: jnp.minimum(step, jnp.maximum(_last_key_block((x + 1) * bq, offset, bk, n_k)
                                                                        - 1, 0))


def _forward(q, q_labels, k, v, mask, offset, scale, blocks, target):
    b, h, lq, dqk = q.shape
    g, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    bq, bk, n_k = blocks.block_q, blocks.block_k, lk // blocks.block_k
    s = _Blocks(h, g, lq, lk, bq, bk)
    kernel = functools.partial(_forward_kernel, sweep=Sweep(target.sweep_in_grid, 3), scale=scale, bq=bq, bk=bk,
                               n_k=n_k)
    return sweep_call(
        kernel, target=target, name="flash_attention_forward", outer=(b, h, lq // bq), steps=n_k,
        step_map=_key_sweep(bq, bk, n_k),
        inputs=[s.query(dqk), s.labels, s.key_walked(dqk), s.key_walked(dv), s.mask_walked],
        outputs=[s.query(dv), s.rows],
        out_shape=[jax.ShapeDtypeStruct((b, h, lq, dv), q.dtype), jax.ShapeDtypeStruct((b, h, lq, 1), jnp.float32)],
        scratch=[(bq, 1), (bq, 1), (bq, dv)],
    )(offset, q, q_labels, k, v, mask)


def _backward(q, q_labels, k, v, mask, offset, o, lse, do, scale, blocks, target):
    b, h, lq, dqk = q.shape
    g, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    bq, bk, n_q, n_k = blocks.block_q, blocks.block_k, lq // blocks.block_q, lk // blocks.block_k
    s = _Blocks(h, g, lq, lk, bq, bk)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    f32 = jnp.float32
    dkv_sweep = lambda b_, hh, x, step, offset: jnp.minimum(  # noqa: E731
        jnp.maximum(step, _first_query_block(x * bk, offset, bq, n_q)), n_q - 1)
    dk, dv_ = sweep_call(
        functools.partial(_dkv_kernel, sweep=Sweep(target.sweep_in_grid, 3), scale=scale, bq=bq, bk=bk, n_q=n_q),
        target=target, name="flash_attention_dkv", outer=(b, h, n_k), steps=n_q, step_map=dkv_sweep,
        inputs=[s.query_walked(dqk), s.labels_walked, s.key(dqk), s.key(dv), s.mask, s.query_walked(dv),
                s.rows_walked, s.rows_walked],
        outputs=[s.key_out(dqk), s.key_out(dv)],
        out_shape=[jax.ShapeDtypeStruct((b, h, lk, dqk), f32), jax.ShapeDtypeStruct((b, h, lk, dv), f32)],
        scratch=[(bk, dqk), (bk, dv)],
    )(offset, q, q_labels, k, v, mask, do, lse, delta)
    dq = sweep_call(
        functools.partial(_dq_kernel, sweep=Sweep(target.sweep_in_grid, 3), scale=scale, bq=bq, bk=bk, n_k=n_k),
        target=target, name="flash_attention_dq", outer=(b, h, n_q), steps=n_k, step_map=_key_sweep(bq, bk, n_k),
        inputs=[s.query(dqk), s.labels, s.key_walked(dqk), s.key_walked(dv), s.mask_walked, s.query(dv), s.rows,
                s.rows],
        outputs=[s.query(dqk)], out_shape=[jax.ShapeDtypeStruct((b, h, lq, dqk), f32)], scratch=[(bq, dqk)],
    )(offset, q, q_labels, k, v, mask, do, lse, delta)[0]
    per_group = lambda t: t.reshape(b, g, h // g, lk, t.shape[-1]).sum(axis=2)  # noqa: E731
    return dq, per_group(dk), per_group(dv_)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def flash_scan(q, q_labels, k, v, mask, offset, scale: float, blocks: BlockSizes, target: Target):
    """Head-major padded arrays of one dtype: q ``[B, H, Lq, Dqk]``, k ``[B, G, Lk, Dqk]``, v ``[B, G, Lk, Dv]``;
    labels float32: q_labels ``[B, 1, Lq, 1]``, mask ``[B, 1, Lk]`` (0: not a key); offset ``[1]`` int32
    → o ``[B, H, Lq, Dv]``."""
    return _forward(q, q_labels, k, v, mask, offset, scale, blocks, target)[0]


def _flash_fwd(q, q_labels, k, v, mask, offset, scale, blocks, target):
    o, lse = _forward(q, q_labels, k, v, mask, offset, scale, blocks, target)
    return o, (q, q_labels, k, v, mask, offset, o, lse)


def _flash_bwd(scale, blocks, target, residuals, do):
    q, q_labels, k, v, mask, offset, o, lse = residuals
    dq, dk, dv = _backward(q, q_labels, k, v, mask, offset, o, lse, do.astype(q.dtype), scale, blocks, target)
    return dq.astype(q.dtype), None, dk.astype(k.dtype), dv.astype(v.dtype), None, None


flash_scan.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, kv_mask=None, q_offset=0, scale=None, segment_ids=None,
                    block_sizes: BlockSizes | None = None, interpret: bool | None = None, backend: str | None = None):
    """Same contract as ``attention_reference``: q ``[B, Lq, H, Dqk]``, k ``[B, Lk, G, Dqk]``, v ``[B, Lk, G, Dv]``,
    kv_mask ``[B, Lk]`` bool, q_offset (int or traced scalar), segment_ids ``[B, Lk]`` int (ids >= 1) or None
    → ``[B, Lq, H, Dv]``. Differentiable in q, k, v.

    The products take q, k, v in their common dtype (bf16/fp16 operands on the tensor cores, float32 at full
    precision) and accumulate in float32. ``backend`` ("gpu", "tpu"; default: the current one) picks the
    kernel form and tiles; ``interpret=True`` (always so on a CPU) runs the kernels as plain JAX."""
    target = resolve_target(backend, interpret)
    blocks = block_sizes or BlockSizes.for_backend(target.backend)
    blocks.validate(target.backend)
    b, lq, h, dqk = q.shape
    lk, dv = k.shape[1], v.shape[-1]
    scale = dqk ** -0.5 if scale is None else scale
    pad_q, pad_k = -lq % blocks.block_q, -lk % blocks.block_k
    d_pad, v_pad = lane_padded(dqk), lane_padded(dv)
    dtype = jnp.result_type(q, k, v)

    def head_major(t, length_pad, dim):  # [B, L, heads, D] → [B, heads, L + pad, dim], zeros appended
        t = jnp.pad(t.astype(dtype), [(0, 0), (0, length_pad), (0, 0), (0, dim - t.shape[-1])])
        return jnp.swapaxes(t, 1, 2)

    mask = jnp.ones((b, lk), bool) if kv_mask is None else kv_mask
    if segment_ids is None:
        k_labels, q_labels = mask.astype(jnp.float32), jnp.ones((b, lq), jnp.float32)
    else:
        k_labels = jnp.where(mask, segment_ids, 0).astype(jnp.float32)
        q_labels = query_segments(segment_ids, q_offset, lq).astype(jnp.float32)
        q_labels = jnp.where(q_labels > 0, q_labels, -1.0)  # a padding query matches no key, masked ones included
    k_labels = jnp.pad(k_labels, [(0, 0), (0, pad_k)])[:, None, :]
    q_labels = jnp.pad(q_labels, [(0, 0), (0, pad_q)], constant_values=-1.0)[:, None, :, None]
    offset = jnp.asarray(q_offset, jnp.int32).reshape(1)
    o = flash_scan(head_major(q, pad_q, d_pad), q_labels, head_major(k, pad_k, d_pad), head_major(v, pad_k, v_pad),
                   k_labels, offset, float(scale), blocks, target)
    return jnp.swapaxes(o, 1, 2)[:, :lq, :, :dv].astype(v.dtype)
