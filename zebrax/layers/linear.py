"""Linear maps and embeddings whose parameters carry logical axis names."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from zebrax.ops.auto import target_backend

default_kernel_init = nn.initializers.normal(stddev=0.02)
FEW_TOKENS = 256  # an embedding lookup of at most this many tokens slices the table (``Embed.__call__``)


def contract(x: jax.Array, kernel: jax.Array, n_in: int, out_dtype=None) -> jax.Array:
    """x ``[*lead, *in_shape]`` · kernel ``[*in_shape, *features]`` → ``[*lead, *features]``, with the lead axes
    flattened into one token axis first. Flattening matters for training speed, not the result: the weight gradient
    then contracts one token axis, which XLA multiplies in place, where contracting the unflattened batch and length
    axes makes it materialise a transposed copy of the activations (on the CPU that copy, fused with the recomputed
    activation, took as long as the matmul itself). The kernel keeps its shape: reshaping a ``[embed, heads,
    head_dim]`` kernel to 2-D is a relayout on a TPU (its tiles span the last two axes), a copy of the weight in
    every step (1.6 GB a decode step for Llama-3.1-8B's q/k/v). ``out_dtype``: the product's dtype, accumulated in
    it (``preferred_element_type``; default: the operands')."""
    lead, in_shape = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in:]
    dims = ((tuple(range(1, n_in + 1)), tuple(range(n_in))), ((), ()))  # in_shape of x against the kernel's
    y = jax.lax.dot_general(x.reshape(-1, *in_shape), kernel, dims, preferred_element_type=out_dtype)
    return y.reshape(*lead, *kernel.shape[n_in:])


class Linear(nn.Module):
    """``y = x · kernel (+ bias)``, contracting the last ``len(in_axes)`` axes of x.

    kernel: ``[*in_shape, *features]`` with logical axes ``in_axes + out_axes``; bias: ``[*features]``.
    Example: the attention output map contracts ``[B, L, heads, head_dim]`` with a
    ``[heads, head_dim, embed]`` kernel. ``out_dtype``: y's dtype, the product accumulated in it (the LM head:
    float32 from bf16 operands); default ``dtype``.
    """

    features: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    use_bias: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    out_dtype: str | None = None
    kernel_init: nn.initializers.Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_axes)
        in_shape = x.shape[-n_in:]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self._fan_in_init(in_shape), self.in_axes + self.out_axes),
            (*in_shape, *self.features),
            self.param_dtype,
        )
        y = contract(x.astype(self.dtype), kernel.astype(self.dtype), n_in, self.out_dtype)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.out_axes),
                self.features, self.param_dtype,
            )
            y = y + bias.astype(y.dtype)
        return checkpoint_name(y, self.name)  # what a remat policy may keep (models.decoder.REMAT_POLICIES)

    def _fan_in_init(self, in_shape):
        """The kernel init sees a 2-D ``[fan_in, fan_out]`` matrix, whatever the axis split."""
        fan_in = int(np.prod(in_shape))

        def init(key, shape, dtype):
            return self.kernel_init(key, (fan_in, int(np.prod(shape[len(in_shape):]))), dtype).reshape(shape)

        return init


class Embed(nn.Module):
    """Token embedding ``[vocab, embed]``; ``attend`` gives the tied LM head."""

    num_embeddings: int
    features: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(default_kernel_init, ("vocab", "embed")),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens ``[B, L]`` int → ``[B, L, embed]``.

        On a TPU a handful of tokens (a decode step: at most ``FEW_TOKENS``) are looked up as one dynamic slice
        each of the table's transpose, ids clamped to the table: a TPU keeps a ``[vocab, embed]`` table whose embed
        axis is no multiple of 128 column-major (SmolLM2's 49152 × 576), and a gather from it makes XLA relayout
        the whole table on every call (113 MB a step, more than the rest of SmolLM2's decode step reads); a slice
        reads the row where it lies. Elsewhere tables are row-major, and a gather reads the rows."""
        if tokens.size > FEW_TOKENS or target_backend() != "tpu":
            return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
        columns = [jax.lax.dynamic_slice_in_dim(self.embedding.T, t, 1, axis=1) for t in tokens.reshape(-1)]
        return jnp.concatenate(columns, axis=1).T.reshape(*tokens.shape, self.features).astype(self.dtype)

    def attend(self, x: jax.Array, out_dtype=None) -> jax.Array:
        """x ``[..., embed]`` → logits ``[..., vocab]`` (in ``out_dtype``, accumulated in it; default ``dtype``)."""
        return contract(x.astype(self.dtype), self.embedding.astype(self.dtype).T, 1, out_dtype)
