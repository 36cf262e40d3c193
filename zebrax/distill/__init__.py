"""Distillation (METHOD §6): the losses of the three stages (``losses.py``) and the steps of stage 1 (``ild.py``)
and stage 2 (``kd.py``); the data pipeline, DPO's step and the trainer build on them."""

from zebrax.distill.ild import layer_io, make_ild_step, teacher_forced
from zebrax.distill.kd import make_kd_step
from zebrax.distill.losses import (
    ce_loss,
    dpo_loss,
    ild_loss,
    kl_loss,
    sequence_logprobs,
    topk_kl_loss,
)

__all__ = ["ce_loss", "dpo_loss", "ild_loss", "kl_loss", "layer_io", "make_ild_step", "make_kd_step",
           "sequence_logprobs", "teacher_forced", "topk_kl_loss"]
