"""Rotary position embedding (half-split layout, as in transformers' Llama).

Frequencies follow the checkpoint's ``RopeScaling``: ``default``, ``linear`` (every frequency divided
by ``factor``), ``llama3`` (low frequencies divided by ``factor``, high ones kept, a smooth ramp
between wavelengths ``original_max_position_embeddings / low_freq_factor`` and ``/ high_freq_factor``)
or ``yarn`` (DeepSeek's: a linear ramp between the dimensions that complete ``beta_fast`` and ``beta_slow``
rotations over the original length, cos/sin scaled by an attention factor).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from zebrax.checks import RopeScaling


def inv_frequencies(rotary_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """The ``rotary_dim // 2`` angular frequencies, float32."""
    inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        wavelen = 2 * np.pi / inv_freq
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        ramp = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = np.where(
            wavelen > old_len / scaling.low_freq_factor,
            inv_freq / scaling.factor,
            np.where(wavelen < old_len / scaling.high_freq_factor, inv_freq, ramp),
        )
    elif scaling.rope_type == "yarn":
        low, high = (_yarn_correction_dim(rotations, rotary_dim, theta, scaling.original_max_position_embeddings)
                     for rotations in (scaling.beta_fast, scaling.beta_slow))
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        ramp = np.clip((np.arange(rotary_dim // 2) - low) / max(high - low, 1e-3), 0, 1)
        inv_freq = inv_freq / scaling.factor * ramp + inv_freq * (1 - ramp)
    return inv_freq.astype(np.float32)


def _yarn_correction_dim(rotations: float, dim: int, theta: float, length: int) -> float:
    """The rotary dimension that completes ``rotations`` turns over ``length`` positions."""
    return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(scaling: RopeScaling) -> float:
    """The factor YaRN puts on cos and sin (1 for the other types)."""
    if scaling.rope_type != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return yarn_mscale(scaling.factor)


def softmax_scale(head_dim: int, scaling: RopeScaling) -> float:
    """``head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim)²`` under YaRN with ``mscale_all_dim``."""
    scale = head_dim ** -0.5
    if scaling.rope_type == "yarn" and scaling.mscale_all_dim:
        scale *= yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2
    return scale


def interleaved_to_half(x: jax.Array) -> jax.Array:
    """Pairs ``(x0, x1), (x2, x3), …`` (DeepSeek's layout) → half-split ``(x0, x2, …, x1, x3, …)``."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, factor: float = 1.0) -> jax.Array:
    """Rotate x ``[B, L, heads, D]`` at integer positions ``[B, L]``; angles in float32; cos and sin
    scaled by ``factor`` (YaRN's attention factor).

    Pairs are ``(x[..., i], x[..., i + D/2])`` (half-split), the layout of HF Llama checkpoints.
    """
    angles = positions.astype(jnp.float32)[:, :, None, None] * jnp.asarray(inv_freq)  # [B, L, 1, D/2]
    cos, sin = jnp.cos(angles) * factor, jnp.sin(angles) * factor
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
