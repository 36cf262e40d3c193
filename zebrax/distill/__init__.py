"""Distillation (METHOD §6): the losses of the three stages (``losses.py``), their objectives (``ild.py``,
``kd.py``, ``dpo.py``), the trainer that runs an objective (``trainer.py``) and the pipeline that chains the stages
(``pipeline.py``)."""

from zebrax.distill.dpo import dpo_objective, response_logprobs
from zebrax.distill.ild import ild_objective, layer_io, teacher_forced
from zebrax.distill.kd import kd_objective
from zebrax.distill.losses import (
    ce_loss,
    dpo_loss,
    ild_loss,
    kl_loss,
    sequence_logprobs,
    topk_kl_loss,
)
from zebrax.distill.trainer import TrainConfig, make_optimizer, make_step, train

__all__ = ["TrainConfig", "ce_loss", "dpo_loss", "dpo_objective", "ild_loss", "ild_objective", "kd_objective",
           "kl_loss", "layer_io", "make_optimizer", "make_step", "response_logprobs", "sequence_logprobs",
           "teacher_forced", "topk_kl_loss", "train"]
