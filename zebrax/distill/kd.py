"""Stage 2, end-to-end knowledge distillation (METHOD §6): the student learns the teacher's next-token
distributions. Teacher and student run in the same jitted step; the teacher is never differentiated. The LM heads
and the loss are float32 whatever the compute dtype (``DecoderLM`` returns float32 logits)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from zebrax.distill.losses import ce_loss, kl_loss
from zebrax.models.decoder import DecoderLM


def make_kd_step(teacher: DecoderLM, student: DecoderLM, optimizer: optax.GradientTransformation, *,
                 direction: str = "forward", temperature: float = 1.0, normalize: str = "token",
                 ce_weight: float = 0.0) -> Callable:
    """A jitted ``step(student_params, opt_state, teacher_params, tokens, token_mask, loss_mask) -> (student_params,
    opt_state, metrics)``: ``token_mask`` marks real tokens (padding is False, for attention and the Mamba2 state),
    ``loss_mask`` the positions whose predictions count (e.g. False on prompt tokens). Loss: ``kl_loss`` (forward
    KL at temperature 1 by default, as the paper) plus ``ce_weight`` × the cross-entropy of the next tokens."""

    def loss_fn(student_params, teacher_params, tokens, token_mask, loss_mask):
        teacher_logits = jax.lax.stop_gradient(
            teacher.apply({"params": teacher_params}, tokens, token_mask=token_mask)[0])
        logits = student.apply({"params": student_params}, tokens, token_mask=token_mask)[0]
        kl = kl_loss(teacher_logits, logits, loss_mask, direction=direction, temperature=temperature,
                     normalize=normalize)
        ce = ce_loss(logits[:, :-1], tokens[:, 1:], loss_mask[:, :-1] & token_mask[:, 1:], normalize=normalize)
        return kl + ce_weight * ce, {"kl": kl, "ce": ce}

    @jax.jit
    def step(student_params, opt_state, teacher_params, tokens, token_mask, loss_mask):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            student_params, teacher_params, tokens, token_mask.astype(bool), loss_mask.astype(bool))
        updates, opt_state = optimizer.update(grads, opt_state, student_params)
        return optax.apply_updates(student_params, updates), opt_state, {"loss": loss, **metrics}

    return step


__all__ = ["make_kd_step"]
