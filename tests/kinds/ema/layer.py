"""``ema``: per head and channel, ``s_t = a_t · s_{t−1} + (1 − a_t) · v_t`` with ``a_t = sigmoid(a_proj(x_t))`` and
``v = v_proj(x)``, read out by ``o_proj``. A padded token is a no-op step (``a = 1``); a document start drops the
state. The state ``[B, H, D]`` is the decode cache: constant in length."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from tests.kinds.ema.config import EMAConfig
from zebrax.cache import Slots, document_starts
from zebrax.layers.linear import Linear


@struct.dataclass
class EMACache:
    state: jax.Array  # [B, H, D] float32


class EMAMixer(nn.Module):
    config: EMAConfig
    dtype: str = "float32"
    param_dtype: str = "float32"
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, slots: Slots, cache: EMACache | None = None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        v = Linear((cfg.n_heads, cfg.head_dim), ("embed",), ("ssm_heads", "head_dim"), name="v_proj", **kw)(x)
        a = jax.nn.sigmoid(Linear((cfg.n_heads,), ("embed",), ("ssm_heads",), name="a_proj", **kw)(x))
        a = jnp.where(slots.token_mask[..., None], a.astype(jnp.float32), 1.0)
        keep = jnp.ones(x.shape[:2], bool) if slots.segment_ids is None else ~document_starts(slots.segment_ids)
        state = jnp.zeros((x.shape[0], cfg.n_heads, cfg.head_dim), jnp.float32) if cache is None else cache.state

        def step(s, inputs):
            a_t, v_t, keep_t = inputs
            s = jnp.where(keep_t[:, None, None], s, 0.0) * a_t[..., None] + (1 - a_t[..., None]) * v_t
            return s, s

        state, ys = jax.lax.scan(step, state, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(v.astype(jnp.float32), 1, 0),
                                               jnp.moveaxis(keep, 1, 0)))
        y = jnp.moveaxis(ys, 0, 1).astype(self.dtype)
        out = Linear((x.shape[-1],), ("ssm_heads", "head_dim"), ("embed",), name="o_proj", **kw)(y)
        return out, None if cache is None else EMACache(state=state)

    @staticmethod
    def init_cache(cfg: EMAConfig, batch: int, max_len: int, dtype) -> EMACache:
        return EMACache(state=jnp.zeros((batch, cfg.n_heads, cfg.head_dim), jnp.float32))
