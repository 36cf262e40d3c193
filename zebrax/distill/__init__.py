"""Distillation (METHOD §6): the losses of the three stages (``losses.py``); the data pipeline, the jitted steps and
the trainer build on them."""

from zebrax.distill.losses import (
    ce_loss,
    dpo_loss,
    ild_loss,
    kl_loss,
    sequence_logprobs,
    topk_kl_loss,
)

__all__ = ["ce_loss", "dpo_loss", "ild_loss", "kl_loss", "sequence_logprobs", "topk_kl_loss"]
