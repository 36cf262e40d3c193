"""Ops with one signature and several implementations behind an ``impl`` argument."""

from zebrax.ops.attention import AttentionImpl, attention

__all__ = ["AttentionImpl", "attention"]
