"""Causal flash attention as Pallas kernels: forward (online softmax) and backward (FlashAttention-2:
one kernel for dK/dV, one for dQ), joined by ``jax.custom_vjp``.

The query heads that share a KV head are stacked as the rows of one tile: a row is a (query, head of the group)
pair, so one program per (batch, KV group, block of rows) — or of keys for dK/dV — reads each KV tile once for
the whole group (a decode step of Llama-3.1-8B reads its cache once, not once for each of the 4 heads that share
it). A program walks the other axis one tile at a time, only as far as causality allows
(``kernels_pallas.common.Sweep``: a ``fori_loop`` in the program with Triton, the last grid axis with Mosaic), so
the kernels lower for GPU and TPU and run with ``interpret=True`` on the CPU. The key mask and the slot offset of
the first query follow the reference's semantics; a query that sees no key outputs zeros. Keys and rows carry
labels: the mask row holds a key's label (its segment id, 1 without segments; 0 when masked) and each row its
query's (its segment id, or 1): a key is visible to a row whose label it shares.

The forward reads k and v where a KV cache keeps them (``KVLayout``): as the caller holds them, ``[B, Lk, G, D]``,
in the loop form (Triton reads any strides); heads-major in the grid form, ``[B, G, Lk, D]``, or ``[B, G, D, Lk]``
when D is no multiple of 128 lanes, which is how a TPU stores a heads-major array of such a D anyway
(``common.keys_minor``) and the only row-major form of those bytes Mosaic can read. A last tile that runs past the
keys is masked, never padded: a decode step copies no cache. The backward (training) takes k and v heads-major
and padded to whole tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.common import (
    Block,
    Sweep,
    Target,
    cdiv,
    dot,
    keys_minor,
    lane_padded,
    next_power_of_two,
    resolve_target,
    sweep_call,
)
from kernels_pallas.flash_attention.reference import query_segments

NEG = -1e30  # finite "minus infinity": fully masked rows stay free of NaN


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows (query, head of the group) and keys per tile. Triton wants powers of two >= 16; Mosaic TPU wants
    multiples of 128 for the key block (the mask row is sliced along lanes) and of 8 for the row block."""

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

    def row_tile(self, rows: int, backend: str) -> int:
        """``block_q``, or for fewer rows (a decode step: the heads of one group) the least legal tile holding them."""
        least = -(-rows // 8) * 8 if backend == "tpu" else max(16, next_power_of_two(rows))
        return min(self.block_q, least)


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """Where k or v lies: ``[B, Lk, G, D]`` with its axes in the order ``axes``. The one definition of the KV layout:
    a KV cache is stored in it (``zebrax.cache.KVCache`` carries it) and the forward kernel reads it where it lies.
    ``for_head_dim``: ``(0, 1, 2, 3)`` off a TPU; on a TPU heads-major, ``(0, 2, 1, 3)``, or ``(0, 2, 3, 1)`` when
    ``common.keys_minor(dim)``."""

    axes: tuple[int, ...] = (0, 1, 2, 3)

    @classmethod
    def for_head_dim(cls, dim: int, backend: str) -> KVLayout:
        """The layout the forward kernel reads k (or v) of head dim ``dim`` in on ``backend``."""
        if backend != "tpu":
            return cls((0, 1, 2, 3))
        return cls((0, 2, 3, 1) if keys_minor(dim, backend) else (0, 2, 1, 3))

    @property
    def keys_last(self) -> bool:
        return self.axes[-1] == 1

    def arrange(self, t):
        """``[B, Lk, G, D]`` → this layout."""
        return jnp.transpose(t, self.axes)

    def logical(self, t):
        """This layout → ``[B, Lk, G, D]``."""
        return jnp.transpose(t, [self.axes.index(a) for a in range(4)])

    def heads_major(self, t):
        """This layout → ``[B, G, Lk, D]``."""
        return jnp.swapaxes(self.logical(t), 1, 2)

    def from_heads_major(self, t):
        return self.arrange(jnp.swapaxes(t, 1, 2))

    def block(self, d: int, bk: int, lk: int, key_tile) -> Block:
        """The walked block: tile ``key_tile(b, group, x, s)`` of the keys of one (batch, group)."""
        shape = {0: None, 1: bk, 2: None, 3: d}
        index = lambda b, gg, x, s: {0: b, 1: key_tile(b, gg, x, s), 2: gg, 3: 0}  # noqa: E731
        return Block(tuple(shape[a] for a in self.axes), lambda *a: tuple(index(*a)[ax] for ax in self.axes),
                     walked=self.axes.index(1), full=lk)

    def tile(self, ref, keys, start, lk: int, bk: int, loop: bool):
        """Keys ``start … start + bk - 1``: ``[bk, D]``, or ``[D, bk]`` keys-last; keys at or past ``lk`` read as
        zeros (a probability of 0 times whatever lies past the end could be NaN)."""
        index = (slice(None), keys) if self.keys_last else (keys, slice(None))
        if lk % bk == 0:
            return ref[index]
        d = ref.shape[0 if self.keys_last else 1]
        valid = start + lax.broadcasted_iota(jnp.int32, (d, bk) if self.keys_last else (bk, d),
                                             1 if self.keys_last else 0) < lk
        if loop:  # Triton must not load past the end
            from jax.experimental.pallas import triton as pltriton

            return pltriton.load(ref.at[index], mask=valid, other=0)
        return jnp.where(valid, ref[index], 0)  # Mosaic's last block runs past the end: unspecified values


def _visible(q_slots, k_start, q_labels, k_labels, bk):
    """[rows, bk] bool: key slot <= the row's query slot ``[rows, 1]`` and the key's label ``[1, bk]`` is the row's
    ``[rows, 1]``."""
    k_slot = k_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    return (k_slot <= q_slots) & (k_labels == q_labels)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Tiles of one call: ``bq`` rows and ``bk`` keys; ``r`` query heads per KV head; ``lq`` queries, ``n_q`` row
    tiles, ``n_k`` key tiles."""

    bq: int
    bk: int
    r: int
    lq: int
    n_q: int
    n_k: int

    def last_key_block(self, x, offset):
        """Key tiles 0 … n-1 hold every slot a row of row tile ``x`` may see."""
        last_query = jnp.minimum(lax.div((x + 1) * self.bq - 1, self.r), self.lq - 1)
        return jnp.clip(cdiv(offset + last_query + 1, self.bk), 0, self.n_k)

    def first_row_block(self, x, offset):
        """Row tiles before this one cannot see key tile ``x``."""
        return jnp.minimum(lax.div(jnp.maximum(x * self.bk - offset, 0) * self.r, self.bq), self.n_q)

    def key_sweep(self, b, gg, x, step, offset):
        """Forward and dQ: row tile x walks the key tiles it may see; later steps stay on the last one."""
        return jnp.minimum(step, jnp.maximum(self.last_key_block(x, offset) - 1, 0))

    def row_sweep(self, b, gg, x, step, offset):
        """dK/dV: key tile x walks the row tiles that may see it; earlier steps stay on the first one."""
        return jnp.minimum(jnp.maximum(step, self.first_row_block(x, offset)), self.n_q - 1)


def online_softmax_step(carry, s, visible, v, *, v_keys_last: bool = False):
    """One key block of the online softmax: carry (running max ``[rows, 1]``, denominator ``[rows, 1]``,
    accumulator ``[rows, Dv]``), scores s ``[rows, bk]`` (masked to NEG), values v ``[bk, Dv]`` (``[Dv, bk]``
    keys-last), or a tuple of column pieces of them with the accumulator the matching tuple; the probabilities meet
    the values in the values' dtype."""
    m, denom, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    weigh = lambda a, t: alpha * a + dot(p.astype(t.dtype), t, trans_b=v_keys_last)  # noqa: E731
    acc = tuple(map(weigh, acc, v)) if isinstance(v, tuple) else weigh(acc, v)
    return m_new, alpha * denom + jnp.sum(p, axis=1, keepdims=True), acc


def online_softmax_init(rows: int, dv: int | tuple[int, ...]):
    """The carry before any key; ``dv`` a tuple of widths: the accumulator in those column pieces."""
    zeros = lambda d: jnp.zeros((rows, d), jnp.float32)  # noqa: E731
    return (jnp.full((rows, 1), NEG, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            tuple(map(zeros, dv)) if isinstance(dv, tuple) else zeros(dv))


def online_softmax_finish(carry, empty_lse: float):
    """(output ``[rows, Dv]`` (or its pieces), log-sum-exp ``[rows, 1]``); rows that saw no key give 0 and
    ``empty_lse``."""
    m, denom, acc = carry
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    return jax.tree.map(lambda a: a / safe, acc), jnp.where(seen, m + jnp.log(safe), empty_lse)


def _forward_kernel(off_ref, qi_ref, q_ref, ql_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, *scratch, sweep, geo,
                    k_layout, v_layout, lk, scale):
    i = pl.program_id(2)
    offset = off_ref[0]
    q, q_slots, q_labels = q_ref[...], offset + qi_ref[...], ql_ref[...]
    bk = geo.bk

    def body(j, carry):
        keys = sweep.tile(j, bk)
        visible = _visible(q_slots, j * bk, q_labels, mask_ref[:, keys], bk)
        k = k_layout.tile(k_ref, keys, j * bk, lk, bk, not sweep.in_grid)
        s = jnp.where(visible, dot(q, k, trans_b=not k_layout.keys_last) * scale, NEG)
        v = v_layout.tile(v_ref, keys, j * bk, lk, bk, not sweep.in_grid)
        return online_softmax_step(carry, s, visible, v, v_keys_last=v_layout.keys_last)

    def finish(carry):
        o, lse = online_softmax_finish(carry, empty_lse=0.0)  # the backward masks empty rows itself
        o_ref[...], lse_ref[...] = o.astype(o_ref.dtype), lse

    init = online_softmax_init(q.shape[0], o_ref.shape[-1])
    sweep.run(0, geo.last_key_block(i, offset), body, init, finish, scratch)


def _probs(q, k, lse, visible, scale):
    return jnp.where(visible, jnp.exp(dot(q, k, trans_b=True) * scale - lse), 0.0)


def _dkv_kernel(off_ref, qi_ref, q_ref, ql_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                *scratch, sweep, geo, scale):
    j = pl.program_id(2)
    offset = off_ref[0]
    k, v, mask_row = k_ref[...], v_ref[...], mask_ref[...]

    def body(i, carry):
        dk, dv = carry
        rows = sweep.tile(i, geo.bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        visible = _visible(offset + qi_ref[rows, :], j * geo.bk, ql_ref[rows, :], mask_row, geo.bk)
        p = _probs(q, k, lse_ref[rows, :], visible, scale)
        ds = p * (dot(do, v, trans_b=True) - delta_ref[rows, :])
        return dk + dot(ds.astype(q.dtype), q, trans_a=True) * scale, dv + dot(p.astype(do.dtype), do, trans_a=True)

    def finish(carry):
        dk_ref[...], dv_ref[...] = carry

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    sweep.run(geo.first_row_block(j, offset), geo.n_q, body, init, finish, scratch)


def _dq_kernel(off_ref, qi_ref, q_ref, ql_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dq_ref, *scratch,
               sweep, geo, scale):
    i = pl.program_id(2)
    offset = off_ref[0]
    q, q_slots, q_labels, do, lse, delta = (q_ref[...], offset + qi_ref[...], ql_ref[...], do_ref[...], lse_ref[...],
                                            delta_ref[...])

    def body(j, dq):
        keys = sweep.tile(j, geo.bk)
        k = k_ref[keys, :]
        p = _probs(q, k, lse, _visible(q_slots, j * geo.bk, q_labels, mask_ref[:, keys], geo.bk), scale)
        ds = p * (dot(do, v_ref[keys, :], trans_b=True) - delta)
        return dq + dot(ds.astype(k.dtype), k) * scale

    def finish(dq):
        dq_ref[...] = dq

    sweep.run(0, geo.last_key_block(i, offset), body, jnp.zeros(q.shape, jnp.float32), finish, scratch)


class _Blocks:
    """Blocks of the rows ``[B, G, rows, D]`` (q, o, dO; lse and delta with D = 1), their query indices
    ``[rows, 1]`` and labels ``[B, 1, rows, 1]``, heads-major k/v ``[B, G, Lk, D]`` and the mask ``[B, 1, Lk]``. A
    program is (batch, group, x): x a row tile (forward, dQ) or a key tile (dK/dV); ``s`` the tile of the walked
    axis (key tiles, or row tiles for dK/dV)."""

    def __init__(self, geo: _Geometry, rows: int, lk: int):
        bq, bk = geo.bq, geo.bk
        self.query = lambda d: Block((None, None, bq, d), lambda b, gg, x, s: (b, gg, x, 0))  # noqa: E731
        self.index = Block((bq, 1), lambda b, gg, x, s: (x, 0))
        self.labels = Block((None, None, bq, 1), lambda b, gg, x, s: (b, 0, x, 0))
        self.query_walked = lambda d: Block((None, None, bq, d), lambda b, gg, x, s: (b, gg, s, 0),  # noqa: E731
                                            walked=2, full=rows)
        self.index_walked = Block((bq, 1), lambda b, gg, x, s: (s, 0), walked=0, full=rows)
        self.labels_walked = Block((None, None, bq, 1), lambda b, gg, x, s: (b, 0, s, 0), walked=2, full=rows)
        self.key_walked = lambda d: Block((None, None, bk, d), lambda b, gg, x, s: (b, gg, s, 0),  # noqa: E731
                                          walked=2, full=lk)
        self.key = lambda d: Block((None, None, bk, d), lambda b, gg, x, s: (b, gg, x, 0))  # noqa: E731
        self.mask_walked = Block((None, 1, bk), lambda b, gg, x, s: (b, 0, s), walked=2, full=lk)
        self.mask = Block((None, 1, bk), lambda b, gg, x, s: (b, 0, x))


@dataclasses.dataclass(frozen=True)
class _Call:
    """What one call's kernels share: the tiles, where they run, the scale and the layouts of k and v."""

    geo: _Geometry
    target: Target
    scale: float
    k_layout: KVLayout
    v_layout: KVLayout
    lk: int  # keys (the walked length of k and v in the forward)


def _forward(qi, q, q_labels, k, v, mask, offset, call: _Call):
    b, g, rows, dqk = q.shape
    dv = v.shape[call.v_layout.axes.index(3)]
    geo, target = call.geo, call.target
    s = _Blocks(geo, rows, mask.shape[-1])
    tile = lambda b_, gg, x, step: step  # noqa: E731  (the sweep's clamping is in ``step_map``)
    kernel = functools.partial(_forward_kernel, sweep=Sweep(target.sweep_in_grid, 3), geo=geo,
                               k_layout=call.k_layout, v_layout=call.v_layout, lk=call.lk, scale=call.scale)
    return sweep_call(
        kernel, target=target, name="flash_attention_forward", outer=(b, g, geo.n_q), steps=geo.n_k,
        step_map=geo.key_sweep,
        inputs=[s.index, s.query(dqk), s.labels, call.k_layout.block(dqk, geo.bk, call.lk, tile),
                call.v_layout.block(dv, geo.bk, call.lk, tile), s.mask_walked],
        outputs=[s.query(dv), s.query(1)],
        out_shape=[jax.ShapeDtypeStruct((b, g, rows, dv), q.dtype), jax.ShapeDtypeStruct((b, g, rows, 1), jnp.float32)],
        scratch=[(geo.bq, 1), (geo.bq, 1), (geo.bq, dv)],
    )(offset, qi, q, q_labels, k, v, mask)


def _backward(qi, q, q_labels, k, v, mask, offset, o, lse, do, call: _Call):
    """Heads-major k, v ``[B, G, Lk_pad, D]`` (whole tiles) → (dq, dk, dv) float32."""
    b, g, rows, dqk = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    geo, target, f32 = call.geo, call.target, jnp.float32
    s = _Blocks(geo, rows, lk)
    delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1, keepdims=True)
    dk, dv_ = sweep_call(
        functools.partial(_dkv_kernel, sweep=Sweep(target.sweep_in_grid, 3), geo=geo, scale=call.scale),
        target=target, name="flash_attention_dkv", outer=(b, g, lk // geo.bk), steps=geo.n_q, step_map=geo.row_sweep,
        inputs=[s.index_walked, s.query_walked(dqk), s.labels_walked, s.key(dqk), s.key(dv), s.mask,
                s.query_walked(dv), s.query_walked(1), s.query_walked(1)],
        outputs=[s.key(dqk), s.key(dv)],
        out_shape=[jax.ShapeDtypeStruct((b, g, lk, dqk), f32), jax.ShapeDtypeStruct((b, g, lk, dv), f32)],
        scratch=[(geo.bk, dqk), (geo.bk, dv)],
    )(offset, qi, q, q_labels, k, v, mask, do, lse, delta)
    dq = sweep_call(
        functools.partial(_dq_kernel, sweep=Sweep(target.sweep_in_grid, 3), geo=geo, scale=call.scale),
        target=target, name="flash_attention_dq", outer=(b, g, geo.n_q), steps=geo.n_k, step_map=geo.key_sweep,
        inputs=[s.index, s.query(dqk), s.labels, s.key_walked(dqk), s.key_walked(dv), s.mask_walked, s.query(dv),
                s.query(1), s.query(1)],
        outputs=[s.query(dqk)], out_shape=[jax.ShapeDtypeStruct((b, g, rows, dqk), f32)], scratch=[(geo.bq, dqk)],
    )(offset, qi, q, q_labels, k, v, mask, do, lse, delta)[0]
    return dq, dk, dv_


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def flash_scan(qi, q, q_labels, k, v, mask, offset, call: _Call):
    """Rows of one dtype: q ``[B, G, rows, Dqk]`` (whole row tiles), qi ``[rows, 1]`` int32 (each row's query),
    labels float32: q_labels ``[B, 1, rows, 1]``, mask ``[B, 1, Lk_pad]`` (0: not a key, and past the keys);
    k, v in ``call``'s layouts; offset ``[1]`` int32 → o ``[B, G, rows, Dv]``."""
    return _forward(qi, q, q_labels, k, v, mask, offset, call)[0]


def _flash_fwd(qi, q, q_labels, k, v, mask, offset, call):
    o, lse = _forward(qi, q, q_labels, k, v, mask, offset, call)
    return o, (qi, q, q_labels, k, v, mask, offset, o, lse)


def _flash_bwd(call, residuals, do):
    qi, q, q_labels, k, v, mask, offset, o, lse = residuals
    pad = [(0, 0), (0, 0), (0, mask.shape[-1] - call.lk), (0, 0)]
    heads = lambda layout, t: jnp.pad(layout.heads_major(t), pad)  # noqa: E731
    dq, dk, dv = _backward(qi, q, q_labels, heads(call.k_layout, k), heads(call.v_layout, v), mask, offset, o, lse,
                           do.astype(q.dtype), call)
    back = lambda layout, t, like: layout.from_heads_major(t[:, :, :call.lk]).astype(like.dtype)  # noqa: E731
    return None, dq.astype(q.dtype), None, back(call.k_layout, dk, k), back(call.v_layout, dv, v), None, None


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
    lk, g, dv = k.shape[1], k.shape[2], v.shape[-1]
    r, rows = h // g, lq * (h // g)
    scale = dqk ** -0.5 if scale is None else scale
    dtype = jnp.result_type(q, k, v)
    bq, bk = blocks.row_tile(rows, target.backend), blocks.block_k
    geo = _Geometry(bq=bq, bk=bk, r=r, lq=lq, n_q=-(-rows // bq), n_k=-(-lk // bk))
    # Triton's tiles are powers of two wide; Mosaic reads a block as wide as the array at any width
    width = (lambda d: d) if target.sweep_in_grid else lane_padded
    d_qk, d_v = width(dqk), width(dv)
    k_layout, v_layout = (KVLayout.for_head_dim(d, target.backend) for d in (d_qk, d_v))
    call = _Call(geo=geo, target=target, scale=float(scale), k_layout=k_layout, v_layout=v_layout, lk=lk)

    def lanes(t, d):  # zeros appended to the last axis (a copy only where Triton needs a power of two)
        return t if t.shape[-1] == d else jnp.pad(t, [(0, 0)] * 3 + [(0, d - t.shape[-1])])

    # rows: [B, Lq, H, D] → [B, G, Lq * R, D], a row is (query, head of the group), padded to whole row tiles
    q_rows = q.astype(dtype).reshape(b, lq, g, r, dqk).transpose(0, 2, 1, 3, 4).reshape(b, g, rows, dqk)
    q_rows = jnp.pad(q_rows, [(0, 0), (0, 0), (0, geo.n_q * bq - rows), (0, d_qk - dqk)])
    qi = jnp.minimum(jnp.arange(geo.n_q * bq, dtype=jnp.int32) // r, lq - 1)[:, None]
    mask = jnp.ones((b, lk), bool) if kv_mask is None else kv_mask
    if segment_ids is None:
        k_labels, q_labels = mask.astype(jnp.float32), jnp.ones((b, lq), jnp.float32)
    else:
        k_labels = jnp.where(mask, segment_ids, 0).astype(jnp.float32)
        q_labels = query_segments(segment_ids, q_offset, lq).astype(jnp.float32)
        q_labels = jnp.where(q_labels > 0, q_labels, -1.0)  # a padding query matches no key, masked ones included
    k_labels = jnp.pad(k_labels, [(0, 0), (0, geo.n_k * bk - lk)])[:, None, :]  # [B, 1, Lk]: a 1/D of the cache
    q_labels = jnp.pad(jnp.repeat(q_labels, r, axis=1), [(0, 0), (0, geo.n_q * bq - rows)], constant_values=-1.0)
    offset = jnp.asarray(q_offset, jnp.int32).reshape(1)
    o = flash_scan(qi, q_rows, q_labels[:, None, :, None], k_layout.arrange(lanes(k.astype(dtype), d_qk)),
                   v_layout.arrange(lanes(v.astype(dtype), d_v)), k_labels, offset, call)
    o = o[:, :, :rows, :dv].reshape(b, g, lq, r, dv).transpose(0, 2, 1, 3, 4)
    return o.reshape(b, lq, h, dv).astype(v.dtype)
