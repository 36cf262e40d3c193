"""MLA decode as a Pallas kernel: a few new tokens' queries attend over the latent cache, split along the
cache length (flash-decoding) with a combine step.

The latent ``[c_kv ; k_pe]`` is read once per block and serves as both key and value (the value is its
first ``value_dim`` entries), as FlashMLA's "MQA mode" does. Every head of every new token is one row of
a ``[rows, D]`` query tile, so the arithmetic intensity is ~2·rows FLOP per cached byte: at decode this
kernel is memory-bound, and the split over the cache length is what fills the machine. Each range walks
its tiles as ``kernels_pallas.common.Sweep`` does (a loop with Triton, the last grid axis with Mosaic), and
stops at the last slot a new token may see. Forward only: training uses the materialised path.

The cache is read as it is stored, in place, and a last tile that runs past its end has the rows past it zeroed
(never visible): a decode step moves no copy of the cache. Mosaic reads whole-width tiles (a block dimension equal
to the array's is legal at any width, 224 or 576). Triton loads only power-of-two tiles, so the GPU form reads a
tile in power-of-two column pieces, the value's (``c_kv``: 160 = 128 + 32) and the rotated key's (64), and masks
the rows past the end. Only a latent whose two parts are not whole multiples of 16 columns is padded to a power
of two, a copy of the cache each call (none of the presets'; the GPU form has not run on a GPU here).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.common import Block, Sweep, cdiv, dot, lane_padded, resolve_target, sweep_call
from kernels_pallas.flash_attention.kernel import NEG, online_softmax_finish, online_softmax_init, online_softmax_step


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_k cached tokens per tile; the cache is split into ``num_splits`` ranges (None: enough ranges of
    at least 4 tiles each to use up to 16 programs per sequence)."""

    block_k: int = 64
    num_splits: int | None = None

    @classmethod
    def for_backend(cls, backend: str) -> BlockSizes:
        return cls(128) if backend == "tpu" else cls(64) if backend == "gpu" else cls(16)

    def splits(self, cache_len: int) -> int:
        if self.num_splits is not None:
            return self.num_splits
        return max(1, min(16, cache_len // (4 * self.block_k)))

    def validate(self, backend: str) -> None:
        n = self.block_k
        if backend == "tpu" and n % 128:
            raise ValueError(f"BlockSizes.block_k={n} must be a multiple of 128 on TPU")
        if backend != "tpu" and (n < 16 or n & (n - 1)):
            raise ValueError(f"BlockSizes.block_k={n} must be a power of two >= 16")


def _visible_blocks(split, offset, lq, bk, n_blocks):
    """Blocks of this split's range that hold a slot some new token may see (the slots up to offset + lq − 1)."""
    return jnp.clip(cdiv(offset + lq, bk) - split * n_blocks, 0, n_blocks)


def _split_kernel(off_ref, slot_ref, q_ref, kv_ref, mask_ref, o_ref, lse_ref, *scratch, sweep, scale, bk, n_blocks,
                  lq, length, pieces, n_values):
    """One cache range: partial softmax over its filled blocks for every query row. ``length``: the cache's slots;
    a tile's rows past it read as zeros. ``pieces``: the (first column, width) the latent is read in, the first
    ``n_values`` of them the value's; the output holds those."""
    split = pl.program_id(1)
    offset = off_ref[0]
    q = [q_ref[:, pl.ds(c, w)] for c, w in pieces]  # [rows, w] each
    q_slot = offset + slot_ref[...]  # [rows, 1]: the cache slot each row's token sits in

    def load(keys, start, c, w):  # [bk, w]: key, and value in the value's pieces
        index = (keys, pl.ds(c, w))
        if length % bk == 0:
            return kv_ref[index].astype(q[0].dtype)
        valid = start + lax.broadcasted_iota(jnp.int32, (bk, w), 0) < length
        if not sweep.in_grid:  # Triton must not load past the end
            from jax.experimental.pallas import triton as pltriton

            return pltriton.load(kv_ref.at[index], mask=valid, other=0).astype(q[0].dtype)
        return jnp.where(valid, kv_ref[index], 0).astype(q[0].dtype)  # Mosaic's partial tile: unspecified values

    def body(j, carry):
        block = split * n_blocks + j
        keys = sweep.tile(block, bk)
        kv = tuple(load(keys, block * bk, c, w) for c, w in pieces)
        k_slot = block * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        visible = (k_slot <= q_slot) & (mask_ref[:, keys] > 0)
        s = sum(dot(q_c, kv_c, trans_b=True) for q_c, kv_c in zip(q, kv, strict=True))
        return online_softmax_step(carry, jnp.where(visible, s * scale, NEG), visible, kv[:n_values])

    def finish(carry):
        o, lse_ref[...] = online_softmax_finish(carry, empty_lse=NEG)  # empty ranges get weight 0
        for (c, w), o_c in zip(pieces[:n_values], o, strict=True):
            o_ref[:, pl.ds(c, w)] = o_c

    init = online_softmax_init(q[0].shape[0], tuple(w for _, w in pieces[:n_values]))
    sweep.run(0, _visible_blocks(split, offset, lq, bk, n_blocks), body, init, finish, scratch)


def _powers_of_two(start: int, width: int) -> tuple[tuple[int, int], ...]:
    """Columns ``start … start + width - 1`` as (first column, width) pieces of descending powers of two."""
    pieces = []
    for bit in reversed(range(width.bit_length())):
        if width >> bit & 1:
            pieces.append((start, 1 << bit))
            start += 1 << bit
    return tuple(pieces)


def mla_decode(q, latent, *, value_dim, kv_mask=None, q_offset=0, scale, block_sizes: BlockSizes | None = None,
               interpret: bool | None = None, backend: str | None = None):
    """Same contract as ``latent_attention_reference``: q ``[B, Lq, H, D]``, latent ``[B, S, D]`` → ``[B, Lq, H,
    value_dim]``. Blocks past the last slot a new token may see are neither read nor computed."""
    target = resolve_target(backend, interpret)
    blocks = block_sizes or BlockSizes.for_backend(target.backend)
    blocks.validate(target.backend)
    b, lq, h, d = q.shape
    s = latent.shape[1]
    bk, splits = blocks.block_k, blocks.splits(s)
    n_blocks = -(-s // (bk * splits))  # tiles a range
    if target.sweep_in_grid:  # Mosaic: whole-width tiles, the output as wide (the rope columns dropped below)
        d_pad, pieces, n_values = d, ((0, d),), 1
    elif value_dim % 16 == 0 and (d - value_dim) % 16 == 0:  # Triton: power-of-two pieces (module docstring)
        values = _powers_of_two(0, value_dim)
        d_pad, pieces, n_values = d, values + _powers_of_two(value_dim, d - value_dim), len(values)
    else:  # Triton, a width not in pieces of 16 or more: padded to a power of two, a copy of the cache each call
        d_pad = lane_padded(d)
        pieces, n_values = ((0, d_pad),), 1
    out_width = sum(w for _, w in pieces[:n_values])
    rows = lane_padded(lq * h)
    dtype = jnp.result_type(q, latent)
    s_tiles = n_blocks * bk * splits

    q_rows = jnp.pad(q.astype(dtype).reshape(b, lq * h, d), [(0, 0), (0, rows - lq * h), (0, d_pad - d)])
    kv = latent if d_pad == d else jnp.pad(latent, [(0, 0), (0, 0), (0, d_pad - d)])
    mask = jnp.ones((b, s), bool) if kv_mask is None else kv_mask
    mask = jnp.pad(mask.astype(jnp.float32), [(0, 0), (0, s_tiles - s)])[:, None, :]  # [B, 1, S]: a 1/D of the cache
    slot = jnp.minimum(jnp.arange(rows, dtype=jnp.int32) // h, lq - 1)[:, None]  # padded rows copy the last token
    offset = jnp.asarray(q_offset, jnp.int32).reshape(1)
    kernel = functools.partial(_split_kernel, sweep=Sweep(target.sweep_in_grid, 2), scale=float(scale), bk=bk,
                               n_blocks=n_blocks, lq=lq, length=s, pieces=pieces, n_values=n_values)
    last = -(-s // bk) - 1  # the last tile holding a slot: an empty range's resident tile is never past it
    cache_tile = lambda i, split, step: jnp.minimum(split * n_blocks + step, last)  # noqa: E731
    o, lse = sweep_call(
        kernel, target=target, name="mla_decode", outer=(b, splits), steps=n_blocks,
        step_map=lambda i, split, step, off: jnp.minimum(
            step, jnp.maximum(_visible_blocks(split, off, lq, bk, n_blocks) - 1, 0)),
        inputs=[Block((rows, 1), lambda i, split, step: (0, 0)),
                Block((None, rows, d_pad), lambda i, split, step: (i, 0, 0)),
                Block((None, bk, d_pad), lambda *a: (a[0], cache_tile(*a), 0), walked=1, full=s),
                Block((None, 1, bk), lambda *a: (a[0], 0, cache_tile(*a)), walked=2, full=s_tiles)],
        outputs=[Block((None, None, rows, out_width), lambda i, split, step: (i, split, 0, 0)),
                 Block((None, None, rows, 1), lambda i, split, step: (i, split, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, splits, rows, out_width), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, rows, 1), jnp.float32)],
        scratch=[(rows, 1), (rows, 1), *((rows, w) for _, w in pieces[:n_values])],
    )(offset, slot, q_rows, kv, mask)
    # combine the ranges: weights exp(lse_split − lse_total); ranges that saw nothing carry weight 0
    weights = jax.nn.softmax(lse, axis=1)  # [B, splits, rows, 1]
    out = jnp.sum(weights * o, axis=1)[:, : lq * h, :value_dim]
    return out.reshape(b, lq, h, value_dim).astype(q.dtype)
