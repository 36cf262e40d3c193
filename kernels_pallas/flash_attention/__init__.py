"""Causal flash attention (online softmax, blocked; qk head dim may differ from v head dim; grouped KV heads)."""

from kernels_pallas.flash_attention.kernel import BlockSizes, KVLayout, flash_attention, flash_scan
from kernels_pallas.flash_attention.reference import attention_reference

__all__ = ["BlockSizes", "KVLayout", "attention_reference", "flash_attention", "flash_scan"]
