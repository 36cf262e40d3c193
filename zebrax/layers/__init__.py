"""Flax Linen building blocks. Parameters carry logical axis names; see ``zebrax.sharding``."""

from zebrax.layers.attention import Attention
from zebrax.layers.linear import Embed, Linear
from zebrax.layers.mlp import SwiGLU
from zebrax.layers.norms import RMSNorm

__all__ = ["Attention", "Embed", "Linear", "RMSNorm", "SwiGLU"]
