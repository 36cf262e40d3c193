"""The Gated DeltaNet mixer (Yang, Kautz & Hatamizadeh 2024; the linear mixer of Qwen3-Next and of HyLo):
q/k/v/gate projections → causal depthwise conv over [q ; k ; v] → SiLU → L2-normalised q and k → the gated delta
rule (``zebrax.ops.gated_delta``) → per-head RMSNorm gated by SiLU(z) → out_proj.

Per head: the log decay ``g = −exp(A_log) · softplus(a + dt_bias)`` and the write strength ``β = sigmoid(b)``, with
``a`` and ``b`` projections of the input. ``q``, ``k`` and ``v`` may have fewer heads than the ``n_heads`` state
heads and are repeated to them: Qwen3-Next's layout has q and k on ``k_heads`` heads; the attention-shaped variant
(initialised from a teacher's GQA, ``zebrax.init.gated_delta_from_attention``) has q on the query heads and k, v on
the KV heads, as attention does.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from zebrax.cache import Slots, SSMCache, document_starts
from zebrax.layers.activations import ACTIVATIONS
from zebrax.layers.conv import causal_conv
from zebrax.layers.decay import a_log_init, dt_bias_init, head_param
from zebrax.layers.linear import Linear
from zebrax.layers.norms import rms_normalize
from zebrax.mixers.gdn.config import GatedDeltaConfig
from zebrax.ops.gated_delta import gated_delta_chunked, gated_delta_reference, gated_delta_step

IMPLS = ("reference", "chunked", "auto")  # ``auto`` is the chunked form on every backend


class GatedDeltaMixer(nn.Module):
    """x ``[B, L, d_model]`` → ``[B, L, d_model]``; with a cache (``SSMCache``: conv ``[B, conv_dim, kernel − 1]``,
    state ``[B, n_heads, head_k_dim, head_v_dim]`` float32), the conv and delta-rule states are read and returned.

    Padded positions (``slots.token_mask`` False) are no-op steps (zero conv input, no decay, no write); with
    ``slots.segment_ids`` the conv reads no input across a document start and the state resets there.
    ``impl``: ``chunked`` (the WY form) or ``reference`` (the recurrence, token by token).
    """

    config: GatedDeltaConfig
    dtype: str = "float32"
    param_dtype: str = "float32"
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, slots: Slots, cache: SSMCache | None = None):
        cfg = self.config
        b, length, _ = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, d_k, d_v = cfg.n_heads, cfg.head_k_dim, cfg.head_v_dim
        q = Linear((cfg.q_heads * d_k,), ("embed",), ("ssm_conv",), name="q_proj", **kw)(x)
        k = Linear((cfg.k_heads * d_k,), ("embed",), ("ssm_conv",), name="k_proj", **kw)(x)
        v = Linear((cfg.v_heads * d_v,), ("embed",), ("ssm_conv",), name="v_proj", **kw)(x)
        z = Linear((h, d_v), ("embed",), ("ssm_heads", "head_dim"), name="g_proj", **kw)(x)
        a = Linear((h,), ("embed",), ("ssm_heads",), name="a_proj", **kw)(x)
        beta = Linear((h,), ("embed",), ("ssm_heads",), name="b_proj", **kw)(x)
        mask = slots.token_mask[..., None]

        qkv, conv_state = causal_conv(self, jnp.concatenate([q, k, v], axis=-1) * mask,
                                      None if cache is None else cache.conv, slots.segment_ids,
                                      kernel_size=cfg.conv_kernel, use_bias=False, **kw)
        sizes = cfg.conv_sizes()
        q, k, v = jnp.split(ACTIVATIONS[cfg.activation](qkv), [sizes["q"], sizes["q"] + sizes["k"]], axis=-1)
        q = _l2(q.reshape(b, length, cfg.q_heads, d_k), cfg.l2_eps)
        k = _l2(k.reshape(b, length, cfg.k_heads, d_k), cfg.l2_eps)
        v = jnp.repeat(v.reshape(b, length, cfg.v_heads, d_v), h // cfg.v_heads, axis=2)
        if cfg.q_heads != cfg.k_heads:  # the op groups q and k together: give both every head
            q, k = (jnp.repeat(t, h // t.shape[2], axis=2) for t in (q, k))

        A = -jnp.exp(self._param("A_log", a_log_init(cfg)).astype(jnp.float32))
        dt_bias = self._param("dt_bias", dt_bias_init(cfg)).astype(jnp.float32)
        g = A * jax.nn.softplus(a.astype(jnp.float32) + dt_bias) * mask
        beta = jax.nn.sigmoid(beta.astype(jnp.float32)) * mask

        if cache is not None and length == 1:
            y, state = gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], cache.ssm)
            y = y[:, None]
        else:
            reset = None if slots.segment_ids is None else document_starts(slots.segment_ids)
            form = gated_delta_reference if self.impl == "reference" else gated_delta_chunked
            chunk = {} if self.impl == "reference" else {"chunk_size": cfg.chunk_size}
            y, state = form(q, k, v, g, beta, initial_state=None if cache is None else cache.ssm, reset=reset,
                            **chunk)
        y = HeadGatedRMSNorm(cfg.norm_eps, name="norm", **kw)(y, z)
        out = Linear((x.shape[-1],), ("ssm_heads", "head_dim"), ("embed",), name="out_proj", **kw)(y)
        return out, None if cache is None else SSMCache(conv=conv_state, ssm=state)

    def _param(self, name, init):
        return head_param(self, name, init, self.config.n_heads, self.param_dtype)

    @staticmethod
    def init_cache(cfg: GatedDeltaConfig, batch: int, max_len: int, dtype) -> SSMCache:
        """The conv and delta-rule states of ``batch`` sequences; constant in length (``max_len`` is not used)."""
        return SSMCache.init(batch, cfg.conv_dim, cfg.conv_kernel, cfg.n_heads, cfg.head_k_dim, cfg.head_v_dim, dtype)


class HeadGatedRMSNorm(nn.Module):
    """``scale ⊙ RMSNorm(y) ⊙ SiLU(z)``, normalised over each head's ``head_v_dim`` values (one ``scale`` for every
    head): the norm before the gate, as Qwen3-Next and FLA's ``FusedRMSNormGated`` do (Mamba2's gates first)."""

    eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("head_dim",)), (y.shape[-1],),
                           self.param_dtype)
        normed = rms_normalize(y, self.eps).astype(self.dtype) * scale.astype(self.dtype)
        return (normed * nn.silu(z.astype(jnp.float32))).astype(self.dtype)


def _l2(x: jax.Array, eps: float) -> jax.Array:
    """``x / sqrt(Σ x² + eps)`` over the last axis, in float32 (FLA's and Qwen3-Next's ``l2norm``)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)

