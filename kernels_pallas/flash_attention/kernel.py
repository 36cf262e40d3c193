"""Causal flash attention as Pallas kernels: forward (online softmax) and backward (FlashAttention-2:
one kernel for dK/dV, one for dQ), joined by ``jax.custom_vjp``.

One program per (batch, head, block of queries) — or of keys for dK/dV — loops over the other axis with
``lax.fori_loop``, only as far as causality allows, so the kernels lower with Triton (GPU) and Mosaic
(TPU) and run with ``interpret=True`` on the CPU. The key mask and the slot offset of the first query
follow the reference's semantics; a query that sees no key outputs zeros. Grouped KV heads are read
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

from kernels_pallas.common import compiler_params, dot, lane_padded, resolve_backend

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


def _visible(q_start, k_start, offset, mask_row, bq, bk):
    """[bq, bk] bool: key slot <= query slot (offset + position) and the key is real."""
    q_slot = offset + q_start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_slot = k_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    return (k_slot <= q_slot) & (mask_row > 0)


def _last_key_block(q_end, offset, bk, n_k):
    """Key blocks 0 … n-1 hold every slot a query below ``q_end`` may see."""
    return jnp.clip((offset + q_end + bk - 1) // bk, 0, n_k)


def online_softmax_step(carry, s, visible, v):
    """One key block of the online softmax: carry (running max ``[rows, 1]``, denominator ``[rows, 1]``,
    accumulator ``[rows, Dv]``), scores s ``[rows, bk]`` (masked to NEG), values v ``[bk, Dv]``."""
    m, denom, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    return m_new, alpha * denom + jnp.sum(p, axis=1, keepdims=True), alpha * acc + dot(p, v)


def online_softmax_init(rows: int, dv: int):
    return (jnp.full((rows, 1), NEG, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, dv), jnp.float32))


def online_softmax_finish(carry, empty_lse: float):
    """(output ``[rows, Dv]``, log-sum-exp ``[rows, 1]``); rows that saw no key give 0 and ``empty_lse``."""
    m, denom, acc = carry
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    return acc / safe, jnp.where(seen, m + jnp.log(safe), empty_lse)


def _forward_kernel(off_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, *, scale, bq, bk, n_k):
    i = pl.program_id(2)
    offset = off_ref[0, 0]
    q = q_ref[...].astype(jnp.float32)

    def body(j, carry):
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k, v = k_ref[keys, :].astype(jnp.float32), v_ref[keys, :].astype(jnp.float32)
        visible = _visible(i * bq, j * bk, offset, mask_ref[:, keys], bq, bk)
        return online_softmax_step(carry, jnp.where(visible, dot(q, k, trans_b=True) * scale, NEG), visible, v)

    n_blocks = _last_key_block((i + 1) * bq, offset, bk, n_k)
    carry = lax.fori_loop(0, n_blocks, body, online_softmax_init(bq, v_ref.shape[-1]))
    o, lse = online_softmax_finish(carry, empty_lse=0.0)  # the backward masks empty rows itself
    o_ref[...], lse_ref[...] = o.astype(o_ref.dtype), lse


def _probs(q, k, lse, visible, scale):
    return jnp.where(visible, jnp.exp(dot(q, k, trans_b=True) * scale - lse), 0.0)


def _dkv_kernel(off_ref, q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                *, scale, bq, bk, n_q):
    j = pl.program_id(2)
    offset = off_ref[0, 0]
    keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
    k, v = k_ref[...].astype(jnp.float32), v_ref[...].astype(jnp.float32)
    mask_row = mask_ref[:, keys]

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
        q, do = q_ref[rows, :].astype(jnp.float32), do_ref[rows, :].astype(jnp.float32)
        p = _probs(q, k, lse_ref[rows, :], _visible(i * bq, j * bk, offset, mask_row, bq, bk), scale)
        ds = p * (dot(do, v, trans_b=True) - delta_ref[rows, :])
        return dk + dot(ds, q, trans_a=True) * scale, dv + dot(p, do, trans_a=True)

    first = jnp.clip((j * bk - offset) // bq, 0, n_q)  # earlier query blocks cannot see this key block
    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(first, n_q, body, init)
    dk_ref[...], dv_ref[...] = dk, dv


def _dq_kernel(off_ref, q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, bq, bk, n_k):
    i = pl.program_id(2)
    offset = off_ref[0, 0]
    q, do = q_ref[...].astype(jnp.float32), do_ref[...].astype(jnp.float32)
    lse, delta = lse_ref[...], delta_ref[...]

    def body(j, dq):
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k, v = k_ref[keys, :].astype(jnp.float32), v_ref[keys, :].astype(jnp.float32)
        p = _probs(q, k, lse, _visible(i * bq, j * bk, offset, mask_ref[:, keys], bq, bk), scale)
        return dq + dot(p * (dot(do, v, trans_b=True) - delta), k) * scale

    dq = lax.fori_loop(0, _last_key_block((i + 1) * bq, offset, bk, n_k), body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq


class _Specs:
    """BlockSpecs on head-major arrays: q/o/do ``[B, H, Lq, D]``, k/v ``[B, G, Lk, D]``, mask ``[B, 1, Lk]``,
    per-query rows ``[B, H, Lq, 1]``, offset ``[1, 1]``. The grid's third axis walks query or key blocks."""

    def __init__(self, h, g, lq, lk, dqk, dv, bq, bk):
        r = h // g
        self.offset = pl.BlockSpec((1, 1), lambda b, hh, x: (0, 0))
        self.mask = pl.BlockSpec((None, 1, lk), lambda b, hh, x: (b, 0, 0))
        self.k_all = pl.BlockSpec((None, None, lk, dqk), lambda b, hh, x: (b, hh // r, 0, 0))
        self.v_all = pl.BlockSpec((None, None, lk, dv), lambda b, hh, x: (b, hh // r, 0, 0))
        self.q_block = pl.BlockSpec((None, None, bq, dqk), lambda b, hh, x: (b, hh, x, 0))
        self.o_block = pl.BlockSpec((None, None, bq, dv), lambda b, hh, x: (b, hh, x, 0))
        self.row_block = pl.BlockSpec((None, None, bq, 1), lambda b, hh, x: (b, hh, x, 0))
        self.q_all = pl.BlockSpec((None, None, lq, dqk), lambda b, hh, x: (b, hh, 0, 0))
        self.o_all = pl.BlockSpec((None, None, lq, dv), lambda b, hh, x: (b, hh, 0, 0))
        self.row_all = pl.BlockSpec((None, None, lq, 1), lambda b, hh, x: (b, hh, 0, 0))
        self.k_block = pl.BlockSpec((None, None, bk, dqk), lambda b, hh, x: (b, hh // r, x, 0))
        self.v_block = pl.BlockSpec((None, None, bk, dv), lambda b, hh, x: (b, hh // r, x, 0))
        self.dk_block = pl.BlockSpec((None, None, bk, dqk), lambda b, hh, x: (b, hh, x, 0))
        self.dv_block = pl.BlockSpec((None, None, bk, dv), lambda b, hh, x: (b, hh, x, 0))


def _call(kernel, grid, in_specs, out_specs, out_shape, backend, name):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=backend == "interpret", compiler_params=compiler_params(backend, 3), name=name)


def _forward(q, k, v, mask, offset, scale, blocks, backend):
    b, h, lq, dqk = q.shape
    g, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    bq, bk = blocks.block_q, blocks.block_k
    s = _Specs(h, g, lq, lk, dqk, dv, bq, bk)
    kernel = functools.partial(_forward_kernel, scale=scale, bq=bq, bk=bk, n_k=lk // bk)
    return _call(kernel, (b, h, lq // bq), [s.offset, s.q_block, s.k_all, s.v_all, s.mask], [s.o_block, s.row_block],
                 [jax.ShapeDtypeStruct((b, h, lq, dv), q.dtype), jax.ShapeDtypeStruct((b, h, lq, 1), jnp.float32)],
                 backend, "flash_attention_forward")(offset, q, k, v, mask)


def _backward(q, k, v, mask, offset, o, lse, do, scale, blocks, backend):
    b, h, lq, dqk = q.shape
    g, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    bq, bk = blocks.block_q, blocks.block_k
    s = _Specs(h, g, lq, lk, dqk, dv, bq, bk)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    f32 = jnp.float32
    dk, dv_ = _call(
        functools.partial(_dkv_kernel, scale=scale, bq=bq, bk=bk, n_q=lq // bq), (b, h, lk // bk),
        [s.offset, s.q_all, s.k_block, s.v_block, s.mask, s.o_all, s.row_all, s.row_all], [s.dk_block, s.dv_block],
        [jax.ShapeDtypeStruct((b, h, lk, dqk), f32), jax.ShapeDtypeStruct((b, h, lk, dv), f32)],
        backend, "flash_attention_dkv",
    )(offset, q, k, v, mask, do, lse, delta)
    dq = _call(
        functools.partial(_dq_kernel, scale=scale, bq=bq, bk=bk, n_k=lk // bk), (b, h, lq // bq),
        [s.offset, s.q_block, s.k_all, s.v_all, s.mask, s.o_block, s.row_block, s.row_block], s.q_block,
        jax.ShapeDtypeStruct((b, h, lq, dqk), f32), backend, "flash_attention_dq",
    )(offset, q, k, v, mask, do, lse, delta)
    per_group = lambda t: t.reshape(b, g, h // g, lk, t.shape[-1]).sum(axis=2)  # noqa: E731
    return dq, per_group(dk), per_group(dv_)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def flash_scan(q, k, v, mask, offset, scale: float, blocks: BlockSizes, backend: str):
    """Head-major padded arrays: q ``[B, H, Lq, Dqk]``, k ``[B, G, Lk, Dqk]``, v ``[B, G, Lk, Dv]``, mask
    ``[B, 1, Lk]`` float (1 real, 0 not), offset ``[1, 1]`` int32 → o ``[B, H, Lq, Dv]``."""
    return _forward(q, k, v, mask, offset, scale, blocks, backend)[0]


def _flash_fwd(q, k, v, mask, offset, scale, blocks, backend):
    o, lse = _forward(q, k, v, mask, offset, scale, blocks, backend)
    return o, (q, k, v, mask, offset, o, lse)


def _flash_bwd(scale, blocks, backend, residuals, do):
    q, k, v, mask, offset, o, lse = residuals
    dq, dk, dv = _backward(q, k, v, mask, offset, o, lse, do, scale, blocks, backend)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


flash_scan.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, kv_mask=None, q_offset=0, scale=None, block_sizes: BlockSizes | None = None,
                    interpret: bool | None = None, backend: str | None = None):
    """Same contract as ``attention_reference``: q ``[B, Lq, H, Dqk]``, k ``[B, Lk, G, Dqk]``, v ``[B, Lk, G, Dv]``,
    kv_mask ``[B, Lk]`` bool, q_offset (int or traced scalar) → ``[B, Lq, H, Dv]``. Differentiable in q, k, v."""
    backend = resolve_backend(backend, interpret)
    blocks = block_sizes or BlockSizes.for_backend(backend)
    blocks.validate(backend)
    b, lq, h, dqk = q.shape
    lk, dv = k.shape[1], v.shape[-1]
    scale = dqk ** -0.5 if scale is None else scale
    pad_q, pad_k = -lq % blocks.block_q, -lk % blocks.block_k
    d_pad, v_pad = lane_padded(dqk), lane_padded(dv)

    def head_major(t, length_pad, dim):  # [B, L, heads, D] → [B, heads, L + pad, dim], zeros appended
        t = jnp.pad(t, [(0, 0), (0, length_pad), (0, 0), (0, dim - t.shape[-1])])
        return jnp.swapaxes(t, 1, 2)

    mask = jnp.ones((b, lk), bool) if kv_mask is None else kv_mask
    mask = jnp.pad(mask.astype(jnp.float32), [(0, 0), (0, pad_k)])[:, None, :]
    offset = jnp.asarray(q_offset, jnp.int32).reshape(1, 1)
    o = flash_scan(head_major(q, pad_q, d_pad), head_major(k, pad_k, d_pad), head_major(v, pad_k, v_pad), mask,
                   offset, float(scale), blocks, backend)
    return jnp.swapaxes(o, 1, 2)[:, :lq, :, :dv]
