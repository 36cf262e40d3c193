"""Rotary position embedding (half-split layout, as in transformers' Llama).

Frequencies follow the checkpoint's ``RopeScaling``: ``default``, ``linear`` (every frequency divided
by ``factor``) or ``llama3`` (low frequencies divided by ``factor``, high ones kept, a smooth ramp
between wavelengths ``original_max_position_embeddings / low_freq_factor`` and ``/ high_freq_factor``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zebrax.config import RopeScaling


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
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate x ``[B, L, heads, D]`` at integer positions ``[B, L]``; angles in float32.

    Pairs are ``(x[..., i], x[..., i + D/2])`` (half-split), the layout of HF checkpoints.
    """
    angles = positions.astype(jnp.float32)[:, :, None, None] * jnp.asarray(inv_freq)  # [B, L, 1, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
