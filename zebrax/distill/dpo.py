"""Stage 3, DPO (METHOD §6): the distilled student learns from preference pairs, its frozen copy the reference."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from zebrax.distill.losses import dpo_loss, sequence_logprobs
from zebrax.models.decoder import DecoderLM


def response_logprobs(model: DecoderLM, params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """``([B], [B])``: the log-likelihoods of the chosen and the rejected replies (their counted tokens), from one
    forward pass over both."""
    tokens, token_mask, loss_mask = (jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
                                     for k in ("tokens", "token_mask", "loss_mask"))
    token_mask = token_mask.astype(bool)
    logits = model.apply({"params": params}, tokens, token_mask=token_mask)[0]
    counted = loss_mask[:, :-1].astype(bool) & token_mask[:, 1:]
    logp = sequence_logprobs(logits[:, :-1], tokens[:, 1:], counted)
    return logp[: len(logp) // 2], logp[len(logp) // 2:]


def dpo_objective(model: DecoderLM, *, beta: float = 0.01) -> Callable:
    """The trainer's objective ``(params, reference_params, batch) -> (loss, metrics)``: the sigmoid DPO loss, the
    reference's log-probabilities computed in the step (never differentiated); metrics: implicit rewards, their
    margin and accuracy."""

    def objective(params, reference_params, batch):
        reference = jax.lax.stop_gradient(response_logprobs(model, reference_params, batch))
        return dpo_loss(*response_logprobs(model, params, batch), *reference, beta=beta)

    return objective
