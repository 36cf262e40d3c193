"""The pieces every model shares (each mixer kind's own layer is in its folder of ``zebrax.mixers``): linear maps and
embeddings, norms, RoPE, the SwiGLU MLP, activations, the causal conv and the decay parameters of the linear mixers.
Parameters carry logical axis names; see ``zebrax.sharding``."""

from zebrax.layers.linear import Embed, Linear
from zebrax.layers.mlp import SwiGLU
from zebrax.layers.norms import RMSNorm

__all__ = ["Embed", "Linear", "RMSNorm", "SwiGLU"]
