"""Stage 3, DPO (METHOD §6): the distilled student learns from preference pairs, its frozen copy the reference."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from zebrax.distill.losses import dpo_loss, next_tokens, token_chunks, token_logprobs
from zebrax.models.decoder import DecoderLM, LMHead


def response_logprobs(model: DecoderLM, params, batch: dict, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """``([B], [B])``: the log-likelihoods of the chosen and the rejected replies (their counted tokens), from one
    forward pass over both; ``chunk`` > 0: the LM head ``chunk`` tokens at a time (``token_chunks``)."""
    tokens, token_mask, loss_mask = (jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
                                     for k in ("tokens", "token_mask", "loss_mask"))
    token_mask = token_mask.astype(bool)
    hidden = model.apply({"params": params}, tokens, token_mask=token_mask, hidden_only=True)[0]
    targets = next_tokens(tokens)
    head = LMHead(model.config)
    logp = token_chunks(lambda h, t: token_logprobs(head.apply({"params": params}, h), t), (hidden, targets),
                        chunk or tokens.shape[1])
    counted = loss_mask[:, :-1].astype(bool) & token_mask[:, 1:]
    logp = jnp.sum(jnp.where(counted, logp[:, :-1], 0.0), axis=-1)
    return logp[: len(logp) // 2], logp[len(logp) // 2:]


def dpo_objective(model: DecoderLM, *, beta: float = 0.01, chunk: int = 0) -> Callable:
    """The trainer's objective ``(params, reference_params, batch) -> (loss, metrics)``: the sigmoid DPO loss, the
    reference's log-probabilities computed in the step (never differentiated); metrics: implicit rewards, their
    margin and accuracy. ``chunk``: as ``response_logprobs``'s."""

    def objective(params, reference_params, batch):
        reference = jax.lax.stop_gradient(response_logprobs(model, reference_params, batch, chunk))
        return dpo_loss(*response_logprobs(model, params, batch, chunk), *reference, beta=beta)

    return objective
