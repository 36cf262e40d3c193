"""MLA decode: attention of a few new tokens over the latent cache, split along the cache length."""

from kernels_pallas.mla_decode.kernel import BlockSizes, mla_decode
from kernels_pallas.mla_decode.reference import latent_attention_reference

__all__ = ["BlockSizes", "latent_attention_reference", "mla_decode"]
