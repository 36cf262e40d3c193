"""Distillation (METHOD §6): an ``Experiment`` (``experiment.py``) is a list of stages (``stages.py``) run in one work
directory (``workdir.py``) on the inputs prepared and checked before any work (``inputs.py``); each training stage
runs its objective (``objectives.py``: ILD, KD, DPO) through the trainer (``trainer.py``); ``pipeline.run`` runs
them all. The losses are ``zebrax.losses``."""

from zebrax.distill.objectives import dpo_objective, ild_objective, kd_objective, response_logprobs, teacher_forced
from zebrax.distill.trainer import TrainConfig, make_optimizer, make_step, train

__all__ = ["TrainConfig", "dpo_objective", "ild_objective", "kd_objective", "make_optimizer", "make_step",
           "response_logprobs", "teacher_forced", "train"]
