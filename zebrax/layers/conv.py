"""The causal depthwise conv over time that the linear mixers (Mamba2, Gated DeltaNet) run before their recurrence."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def conv_init(kernel_size: int):
    """PyTorch's Conv1d default for a depthwise conv, weight and bias alike: U(±1/sqrt(fan_in)) with fan_in = the
    kernel size (one input channel per group)."""
    bound = 1.0 / math.sqrt(kernel_size)

    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def causal_conv(module: nn.Module, x: jax.Array, conv_state: jax.Array | None, segment_ids: jax.Array | None, *,
                kernel_size: int, use_bias: bool, dtype, param_dtype) -> tuple[jax.Array, jax.Array]:
    """x ``[B, L, C]`` → (``Σ_i x[t - (k-1) + i] · conv_kernel[i] (+ conv_bias)`` ``[B, L, C]``, the new conv state
    ``[B, C, k - 1]``), with the parameters ``conv_kernel`` ``[k, C]`` and ``conv_bias`` ``[C]`` in ``module``'s
    scope. The k - 1 inputs before the first come from ``conv_state`` (zeros without one); with ``segment_ids``
    ``[B, L]`` only inputs of the output's own document count."""
    k, channels = kernel_size, x.shape[-1]
    kernel = module.param("conv_kernel", nn.with_logical_partitioning(conv_init(k), ("conv", "ssm_conv")),
                          (k, channels), param_dtype).astype(dtype)
    if conv_state is None:
        history = jnp.zeros((x.shape[0], k - 1, channels), x.dtype)
    else:
        history = jnp.swapaxes(conv_state, 1, 2).astype(x.dtype)
    padded = jnp.concatenate([history, x], axis=1)  # [B, k - 1 + L, C]
    length = x.shape[1]
    if segment_ids is None:
        out = sum(padded[:, i:i + length] * kernel[i] for i in range(k))
    else:  # tap i reads position t - (k - 1) + i: only from the same document
        seg = jnp.pad(segment_ids, ((0, 0), (k - 1, 0)), constant_values=-1)
        out = sum(jnp.where((seg[:, i:i + length] == segment_ids)[..., None], padded[:, i:i + length], 0)
                  * kernel[i] for i in range(k))
    if use_bias:
        bias = module.param("conv_bias", nn.with_logical_partitioning(conv_init(k), ("ssm_conv",)), (channels,),
                            param_dtype)
        out = out + bias.astype(dtype)
    return out, jnp.swapaxes(padded[:, padded.shape[1] - (k - 1):], 1, 2)
