"""The gated MLP of Llama: ``down(act(gate(x)) ⊙ up(x))``, SiLU (SwiGLU) unless the checkpoint says otherwise."""

from __future__ import annotations

import flax.linen as nn
import jax

from zebrax.layers.activations import ACTIVATIONS
from zebrax.layers.linear import Linear


class SwiGLU(nn.Module):
    """x ``[B, L, embed]`` → ``[B, L, embed]`` through an ``intermediate_size`` hidden layer; ``activation`` is a
    transformers ``hidden_act`` name (``layers/activations.py``)."""

    intermediate_size: int
    use_bias: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    activation: str = "silu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        m = (self.intermediate_size,)
        gate = Linear(m, ("embed",), ("mlp",), name="gate_proj", **kw)(x)
        up = Linear(m, ("embed",), ("mlp",), name="up_proj", **kw)(x)
        down = Linear((x.shape[-1],), ("mlp",), ("embed",), name="down_proj", **kw)
        return down(ACTIVATIONS[self.activation](gate) * up)
