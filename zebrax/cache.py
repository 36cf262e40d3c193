"""Decode caches.

A ``Cache`` is the decode state of a whole model: the slot bookkeeping every mixer shares (the next
free slot and which slots hold real tokens) plus one cache per layer. A layer cache is a pytree whose
leaves either grow with the sequence (a KV cache: ``[B, S, ...]``) or are a constant state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kernels_pallas.flash_attention.kernel import KVLayout
from zebrax.errors import InvalidArgument
from zebrax.ops.auto import target_backend


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """``[B, L]`` bool: the first token of each document of packed rows (where the Mamba2 state resets)."""
    return jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """RoPE positions ``[B, L]`` int32 of packed rows: each token's index within its document."""
    index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
    return index - jax.lax.cummax(jnp.where(document_starts(segment_ids), index, 0), axis=1)


def token_positions(token_mask: jax.Array, before: jax.Array) -> jax.Array:
    """RoPE positions ``[B, L]`` int32: each real token's index among the real tokens of its row, after ``before``
    ``[B]`` earlier ones (padding is not counted; a padded slot gets its neighbour's position, which no query sees).
    The one definition of positions: a full forward pass, a prefill and every decode step use it."""
    return jnp.maximum(before[:, None] + jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - 1, 0).astype(jnp.int32)


@struct.dataclass
class Slots:
    """Where the tokens of one call sit.

    positions ``[B, L]`` int32: RoPE positions of the new tokens (padding excluded from the count);
    token_mask ``[B, L]`` bool: which new tokens are real (left padding is False);
    kv_mask ``[B, S]`` bool: which key slots hold real tokens (S = L without a cache);
    offset ``[]`` int32: the slot of the first new token (0 without a cache);
    segment_ids ``[B, L]`` int32 or None: documents packed into one row (ids >= 1, 0 for padding), kept apart by
    attention and by the Mamba2 conv and state (full forward passes only, no cache).
    """

    positions: jax.Array
    token_mask: jax.Array
    kv_mask: jax.Array
    offset: jax.Array
    segment_ids: jax.Array | None = None

    @classmethod
    def without_cache(cls, positions: jax.Array, token_mask: jax.Array, segment_ids: jax.Array | None = None) -> Slots:
        mask = token_mask.astype(bool)
        return cls(positions=positions, token_mask=mask, kv_mask=mask, offset=jnp.zeros((), jnp.int32),
                   segment_ids=segment_ids)


@struct.dataclass
class KVCache:
    """Keys and values of one attention layer, ``keys()``/``values()`` ``[B, S, kv_heads, head_dim]``.

    Stored in ``layout`` (``kernels_pallas.flash_attention.KVLayout``), the layout the flash-attention kernel reads
    in place: as they are off a TPU; on a TPU heads-major, ``[B, kv_heads, S, head_dim]``, or ``[B, kv_heads,
    head_dim, S]`` when head_dim is no multiple of 128. A TPU lays an array out by its shape (row-major ``[B, S, 8,
    128]``, keys-minor ``[B, S, 3, 64]``), and a decode step whose products take the heads as a batch axis relaid out
    every layer's cache every step (Llama-3.1-8B at 32k: 17 GB a chip, 1.70× the bytes the step must read);
    SmolLM2's ``[B, 3, S, 64]``, which a TPU keeps keys-minor, is the bytes of ``[B, 3, 64, S]`` row-major, the only
    form of them a Pallas kernel reads (4.39× at 32k when the kernel read ``[B, 3, S, 64]``). The XLA path reads any
    of them where it lies."""

    k: jax.Array
    v: jax.Array
    layout: KVLayout = struct.field(pytree_node=False, default=KVLayout())

    @classmethod
    def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype) -> KVCache:
        layout = KVLayout.for_head_dim(head_dim, target_backend())
        shape = tuple((batch, max_len, num_kv_heads, head_dim)[a] for a in layout.axes)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), layout=layout)

    def axes(self) -> dict[str, tuple[str, ...]]:
        """Each array's logical axis names (``sharding.cache_shardings``)."""
        names = tuple(("batch", "seq", "kv_heads", "head_dim")[a] for a in self.layout.axes)
        return {"k": names, "v": names}

    def keys(self) -> jax.Array:
        return self.layout.logical(self.k)

    def values(self) -> jax.Array:
        return self.layout.logical(self.v)

    def update(self, k: jax.Array, v: jax.Array, offset: jax.Array) -> KVCache:
        """Write ``[B, L, G, D]`` keys/values at slots ``offset … offset + L - 1``."""
        at = tuple(offset if a == 1 else 0 for a in self.layout.axes)
        write = lambda cache, new: jax.lax.dynamic_update_slice(  # noqa: E731
            cache, self.layout.arrange(new).astype(cache.dtype), at)
        return KVCache(k=write(self.k, k), v=write(self.v, v), layout=self.layout)


@struct.dataclass
class LatentCache:
    """The MLA cache of one layer: kv ``[B, S, W]``, the latent ``c_kv`` and the rotated shared key ``k_pe`` of
    every token in its first ``kv_lora_rank + qk_rope_head_dim`` columns, zeros after them.

    ``W`` is the latent's width, rounded up to whole 128-lane tiles for a TPU: there an array whose last dimension
    is no multiple of 128 is kept keys-minor (the default layout of a ``[2, 32768, 224]`` cache), and every decode
    step relaid it out for the kernel (the 8B hybrid at 32k: 470 MB copied a chip a step, for 235 MB of cache).
    Allocated row-major once, it is read where it lies."""

    kv: jax.Array

    @classmethod
    def init(cls, batch: int, max_len: int, latent_dim: int, dtype) -> LatentCache:
        width = -(-latent_dim // 128) * 128 if target_backend() == "tpu" else latent_dim
        return cls(kv=jnp.zeros((batch, max_len, width), dtype))

    def axes(self) -> dict[str, tuple[str | None, ...]]:
        """The latent has no head axis: every chip of a tensor axis holds it whole."""
        return {"kv": ("batch", "seq", None)}

    def update(self, kv: jax.Array, offset: jax.Array) -> LatentCache:
        """Write ``[B, L, latent_dim]`` at slots ``offset … offset + L - 1``."""
        return LatentCache(kv=jax.lax.dynamic_update_slice(self.kv, kv.astype(self.kv.dtype), (0, offset, 0)))


@struct.dataclass
class SSMCache:
    """Decode state of one Mamba2 layer, constant in length: conv ``[B, conv_dim, kernel - 1]`` (the last
    inputs of the causal conv), ssm ``[B, heads, head_dim, d_state]`` float32."""

    conv: jax.Array
    ssm: jax.Array

    @classmethod
    def init(cls, batch: int, conv_dim: int, conv_kernel: int, heads: int, head_dim: int, d_state: int,
             dtype) -> SSMCache:
        return cls(conv=jnp.zeros((batch, conv_dim, conv_kernel - 1), dtype),
                   ssm=jnp.zeros((batch, heads, head_dim, d_state), jnp.float32))

    def axes(self) -> dict[str, tuple[str | None, ...]]:
        """The conv's channels are a concatenation (never split); the state's heads are the mixer's heads."""
        return {"conv": ("batch", "ssm_conv", None), "ssm": ("batch", "ssm_heads", None, None)}


@struct.dataclass
class Cache:
    """index ``[]`` int32 (next free slot), kv_mask ``[B, S]`` bool, layers: one cache per layer."""

    index: jax.Array
    kv_mask: jax.Array
    layers: tuple[Any, ...]

    @classmethod
    def init(cls, batch: int, max_len: int, layers: tuple[Any, ...]) -> Cache:
        return cls(
            index=jnp.zeros((), jnp.int32), kv_mask=jnp.zeros((batch, max_len), bool), layers=tuple(layers)
        )

    @property
    def max_len(self) -> int:
        return self.kv_mask.shape[1]

    def num_tokens(self) -> jax.Array:
        """Real tokens held per row ``[B]`` int32."""
        return jnp.sum(self.kv_mask, axis=1, dtype=jnp.int32)

    def slots(self, positions: jax.Array, token_mask: jax.Array) -> Slots:
        """The slots of ``L`` new tokens written at ``index``. Writing past ``max_len`` is an error: eagerly an
        InvalidArgument; under ``jit`` (a traced index) the computation fails with the same message when it runs."""
        _check_room(self.index, token_mask.shape[1], self.max_len)
        token_mask = token_mask.astype(bool)
        kv_mask = jax.lax.dynamic_update_slice(self.kv_mask, token_mask, (0, self.index))
        return Slots(positions=positions, token_mask=token_mask, kv_mask=kv_mask, offset=self.index)

    def advance(self, slots: Slots, layers: tuple[Any, ...], num_new: int) -> Cache:
        return Cache(index=self.index + num_new, kv_mask=slots.kv_mask, layers=tuple(layers))


def _overflow(index, num_new, max_len):
    raise InvalidArgument(f"cache: writing {num_new} tokens at slot {int(index)} runs past its {max_len} slots; "
                          "allocate a longer cache")


def _check_room(index: jax.Array, num_new: int, max_len: int) -> None:
    if num_new > max_len:
        _overflow(0, num_new, max_len)
    if not isinstance(index, jax.core.Tracer):
        if int(index) + num_new > max_len:
            _overflow(index, num_new, max_len)
        return
    # traced: a host callback that runs only when the write would overflow (dynamic_update_slice would clamp)
    jax.lax.cond(index + num_new > max_len,
                 lambda i: jax.debug.callback(_overflow, i, num_new, max_len), lambda i: None, index)


def cache_sizes(init_cache: Callable[[int, int], Cache]) -> tuple[int, int]:
    """(bytes per token, constant bytes) of one sequence's layer caches, summed over layers.

    Measured on the arrays ``init_cache(batch, max_len)`` really allocates (shapes only, nothing is
    allocated here): the growth from ``max_len`` 1 to 2 is the per-token cost, what remains the
    constant state (a Mamba2 layer's conv and SSM state, for instance).
    """

    def layer_bytes(max_len: int) -> int:
        shapes = jax.eval_shape(lambda: init_cache(1, max_len).layers)
        return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(shapes))

    one, two = layer_bytes(1), layer_bytes(2)
    return two - one, one - (two - one)
