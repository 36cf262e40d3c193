"""The Mamba2 mixer: in_proj → causal depthwise conv → SSD scan → gated RMSNorm → out_proj.

One module covers the standard Mamba2 and Zebra's attention-shaped variant (``Mamba2Config.xb_heads``):
x and B are repeated to the heads and groups after the conv, as GQA repeats V and K.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from zebrax import ops
from zebrax.cache import Slots, SSMCache, document_starts
from zebrax.layers.activations import ACTIVATIONS
from zebrax.layers.conv import causal_conv
from zebrax.layers.decay import a_log_init, dt_bias_init, head_param
from zebrax.layers.linear import Linear
from zebrax.layers.norms import GatedRMSNorm
from zebrax.mixers.mamba2.config import Mamba2Config


class Mamba2Mixer(nn.Module):
    """x ``[B, L, d_model]`` → ``[B, L, d_model]``; with a cache, the conv and SSM states are read and returned.

    Same call as the attention mixers. ``slots.token_mask`` ``[B, L]`` marks real tokens: padded positions
    are no-op steps (zero conv input, dt = 0), so left padding does not change the state. With
    ``slots.segment_ids`` (packed rows) the conv reads no input across a document start and the SSM state resets
    there (``ops.ssd``'s ``reset``).
    """

    config: Mamba2Config
    dtype: str = "float32"
    param_dtype: str = "float32"
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, slots: Slots, cache: SSMCache | None = None):
        cfg = self.config
        b, length, _ = x.shape
        sizes = cfg.in_proj_sizes()
        proj = Linear((sum(sizes.values()),), ("embed",), ("ssm_in",), use_bias=cfg.use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="in_proj")(x)
        z, xbc, dt = jnp.split(proj, [sizes["z"], sizes["z"] + cfg.conv_dim], axis=-1)
        mask = slots.token_mask[..., None]

        xbc, conv_state = causal_conv(self, xbc * mask, None if cache is None else cache.conv, slots.segment_ids,
                                      kernel_size=cfg.conv_kernel, use_bias=cfg.use_conv_bias, dtype=self.dtype,
                                      param_dtype=self.param_dtype)
        xbc = ACTIVATIONS[cfg.activation](xbc) * mask
        xs, B, C = jnp.split(xbc, [sizes["x"], sizes["x"] + sizes["B"]], axis=-1)
        xs = jnp.repeat(xs.reshape(b, length, cfg.x_heads, cfg.head_dim), cfg.n_heads // cfg.x_heads, axis=2)
        B = jnp.repeat(B.reshape(b, length, cfg.b_groups, cfg.d_state), cfg.n_groups // cfg.b_groups, axis=2)
        C = C.reshape(b, length, cfg.n_groups, cfg.d_state)

        dt_bias = self._param("dt_bias", dt_bias_init(cfg))
        A = -jnp.exp(self._param("A_log", a_log_init(cfg)).astype(jnp.float32))
        D = self._param("D", nn.initializers.ones)
        dt = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32))
        dt = jnp.clip(dt, *cfg.dt_limit) * mask

        if cache is not None and length == 1:
            y, ssm_state = ops.ssd_decode_step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, cache.ssm)
            y = y[:, None]
        else:
            reset = None if slots.segment_ids is None else document_starts(slots.segment_ids)
            y, ssm_state = ops.ssd(xs, dt, A, B, C, D, chunk_size=cfg.chunk_size,
                                   initial_state=None if cache is None else cache.ssm, reset=reset, impl=self.impl)
        y = GatedRMSNorm(cfg.n_groups, cfg.norm_eps, self.dtype, self.param_dtype, name="norm")(
            y.reshape(b, length, cfg.d_inner), z
        )
        out = Linear((x.shape[-1],), ("ssm_inner",), ("embed",), use_bias=cfg.use_bias, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="out_proj")(y)
        return out, None if cache is None else SSMCache(conv=conv_state, ssm=ssm_state)

    def _param(self, name, init):
        return head_param(self, name, init, self.config.n_heads, self.param_dtype)

    @staticmethod
    def init_cache(cfg: Mamba2Config, batch: int, max_len: int, dtype) -> SSMCache:
        """The conv and SSM states of ``batch`` sequences; constant in length, so ``max_len`` is not used."""
        return SSMCache.init(batch, cfg.conv_dim, cfg.conv_kernel, cfg.n_heads, cfg.head_dim, cfg.d_state, dtype)

