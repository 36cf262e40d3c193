"""Ops with one signature and several implementations behind an ``impl`` argument (``reference``, a blocked or
chunked XLA form, ``pallas``, ``auto``); ``zebrax.models.Impls`` chooses one for each op a model runs."""

from __future__ import annotations

from zebrax.ops.attention import AttentionImpl, attention, latent_attention, latent_prefill_attention
from zebrax.ops.ssd import SSDImpl, ssd, ssd_decode_step

__all__ = ["AttentionImpl", "SSDImpl", "attention", "latent_attention", "latent_prefill_attention", "ssd",
           "ssd_decode_step"]
