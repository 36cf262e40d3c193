"""Stage 2, end-to-end knowledge distillation (METHOD §6): the student learns the teacher's next-token
distributions. Teacher and student run in the same jitted step; the teacher is never differentiated. The LM heads
and the loss are float32 whatever the compute dtype (``DecoderLM`` returns float32 logits)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from zebrax.data import TOPK_FIELDS, next_in_document
from zebrax.distill.losses import kl_per_token, next_tokens, normalized, token_chunks, token_logprobs, topk_kl_per_token
from zebrax.errors import InvalidArgument
from zebrax.models.decoder import DecoderLM, LMHead


def check_top_k(top_k: int, direction: str, temperature: float) -> None:
    """``top_k`` >= 0; top-k KD (``top_k`` > 0) is the forward KL at temperature 1."""
    if top_k < 0 or (top_k and (direction != "forward" or temperature != 1.0)):
        raise InvalidArgument(f"kd: top_k={top_k} must be >= 0, and top-k KD is the forward KL at temperature 1 "
                              f"(got direction={direction!r}, temperature={temperature})")


def kd_objective(teacher: DecoderLM, student: DecoderLM, *, direction: str = "forward", temperature: float = 1.0,
                 normalize: str = "token", ce_weight: float = 0.0, top_k: int = 0, chunk: int = 0) -> Callable:
    """The trainer's objective ``(student_params, teacher_params, batch) -> (loss, {"kl", "ce"})``. ``batch``:
    ``tokens``, ``token_mask`` (real tokens; padding is False, for attention and the Mamba2 state), ``loss_mask``
    (positions whose predictions count, e.g. False on prompt tokens) and, for packed rows, ``segment_ids``. Loss:
    ``kl_loss`` (forward KL at temperature 1 by default, as the paper) plus ``ce_weight`` × the cross-entropy of the
    next tokens. ``normalize="token"`` (the default) averages over counted tokens, so the loss scale does not depend
    on lengths or padding; ``"sequence"`` sums over tokens and divides by the batch size, as the reference code
    does. ``top_k`` > 0: the forward KL against the teacher's k most likely tokens only, renormalised
    (``topk_kl_loss``), the distillation of stored top-k teacher logits (direction and temperature do not apply).
    ``chunk`` > 0: both LM heads and the per-token losses run ``chunk`` tokens at a time (``token_chunks``), so the
    step never holds ``[B, L, vocab]`` logits; the values are the same.

    A batch that carries the teacher's stored top-k logits (``data.TOPK_FIELDS``: ``[B, L, top_k]`` values and
    vocabulary indices, ``zebrax teacher-logits``) is distilled from them: the teacher does not run, and the step
    takes no teacher parameters (None)."""
    check_top_k(top_k, direction, temperature)
    t_head, s_head = LMHead(teacher.config), LMHead(student.config)

    def objective(student_params, teacher_params, batch):
        tokens, token_mask = batch["tokens"], batch["token_mask"].astype(bool)
        loss_mask = batch["loss_mask"].astype(bool) & token_mask
        rows = dict(token_mask=token_mask, segment_ids=batch.get("segment_ids"), hidden_only=True)
        s_hidden = student.apply({"params": student_params}, tokens, **rows)[0]
        targets = next_tokens(tokens)
        stored = TOPK_FIELDS[0] in batch

        def per_token(s_hidden, targets, *teacher_side):
            logits = s_head.apply({"params": student_params}, s_hidden)
            if stored:
                kl = topk_kl_per_token(*teacher_side, logits)
            else:
                t_logits = jax.lax.stop_gradient(t_head.apply({"params": teacher_params}, teacher_side[0]))
                kl = (topk_kl_per_token(*jax.lax.top_k(t_logits, top_k), logits) if top_k else
                      kl_per_token(t_logits, logits, direction=direction, temperature=temperature))
            return kl, -token_logprobs(logits, targets)

        if stored:
            if batch[TOPK_FIELDS[0]].shape[-1] != top_k:
                raise InvalidArgument(f"kd: the batch's stored teacher logits are its top "
                                      f"{batch[TOPK_FIELDS[0]].shape[-1]}, top_k is {top_k}")
            teacher_side = tuple(jax.lax.stop_gradient(batch[k]) for k in TOPK_FIELDS)
        else:
            teacher_side = (jax.lax.stop_gradient(teacher.apply({"params": teacher_params}, tokens, **rows)[0]),)
        kl, ce = token_chunks(per_token, (s_hidden, targets, *teacher_side), chunk or tokens.shape[1])
        follows = next_in_document(batch)  # [B, L-1]; the last position predicts nothing
        ce_mask = loss_mask & jnp.concatenate([follows, jnp.zeros_like(follows[:, :1])], axis=1)
        kl, ce = normalized(kl, loss_mask, normalize), normalized(ce, ce_mask, normalize)
        return kl + ce_weight * ce, {"kl": kl, "ce": ce}

    return objective
