"""RMSNorm, computed in float32 whatever the activation dtype (as Llama does)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """``x / sqrt(mean(x², last axis) + eps)`` in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """``scale ⊙ RMSNorm(x)`` over the last axis; ``axis_name`` is the logical name of that axis."""

    eps: float = 1e-5
    axis_name: str = "embed"
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],), self.param_dtype,
        )
        return rms_normalize(x, self.eps).astype(self.dtype) * scale.astype(self.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba2's output norm: ``scale ⊙ RMSNorm(y ⊙ silu(z))``, normalised separately over each of ``groups``
    equal slices of the last axis (float32 inside)."""

    groups: int = 1
    eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        width = y.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("ssm_inner",)), (width,), self.param_dtype
        )
        gated = y.astype(jnp.float32) * nn.silu(z.astype(jnp.float32))
        grouped = gated.reshape(*gated.shape[:-1], self.groups, width // self.groups)
        normed = rms_normalize(grouped, self.eps).reshape(gated.shape)
        return normed.astype(self.dtype) * scale.astype(self.dtype)
