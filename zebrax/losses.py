"""The losses of distillation, evaluation and SMART, in float32 whatever the compute dtype: ILD, KL (forward,
reverse, top-k), cross-entropy, DPO, and the one definition of a token's log-probability (``token_logprobs``).

Shapes: hidden states ``[B, L, D]``, logits ``[B, L, V]``, token masks ``[B, L]`` (True: the token counts; padding and,
for KD on chat data, prompt tokens are False).

Normalisation of the token losses (``normalize``):

- ``"token"`` (the default): the sum over counted tokens divided by their number — every token weighs the same
  whatever the batch's padding, so the loss scale does not move with sequence lengths;
- ``"sequence"``: the sum over counted tokens divided by the batch size — what AMD's reference code does (it masks
  nothing; pass an all-True mask to reproduce it); longer sequences weigh more.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zebrax.errors import InvalidArgument

NORMALIZE = ("token", "sequence")
ILD_KINDS = ("l2", "mse")
KL_DIRECTIONS = ("forward", "reverse")


def normalized(per_token: jax.Array, mask: jax.Array | None, normalize: str) -> jax.Array:
    """per_token ``[B, L]`` → a scalar, by ``normalize``."""
    if normalize not in NORMALIZE:
        raise InvalidArgument(f"normalize={normalize!r} is not one of {NORMALIZE}")
    mask = jnp.ones(per_token.shape, bool) if mask is None else mask.astype(bool)
    total = jnp.sum(jnp.where(mask, per_token, 0.0))
    if normalize == "token":
        return total / jnp.maximum(jnp.sum(mask), 1)
    return total / per_token.shape[0]


def _norm(diff: jax.Array) -> jax.Array:
    """‖diff‖₂ over the last axis, with gradient 0 (not NaN) where it is exactly 0 — e.g. at padding, where teacher
    and student both output zeros."""
    sq = jnp.sum(diff * diff, axis=-1)
    nonzero = sq > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def ild_loss(student: dict, teacher: dict, mask: jax.Array | None = None, *, kind: str = "l2") -> jax.Array:
    """Intermediate-layer distillation: Σ_l [mean over tokens of ‖h_s − h_t‖ + mean of ‖a_s − a_t‖], h the block
    outputs and a the mixer outputs of each layer (the reference code's non-squared L2 norm over the hidden axis),
    or with ``kind="mse"`` the mean squared error over every element.

    ``student`` / ``teacher``: ``{"block_output": [h_0, h_1, …], "mixer_output": [a_0, …]}``, each ``[B, L, D]``;
    the student's layers ran on the teacher's block inputs.
    """
    if kind not in ILD_KINDS:
        raise InvalidArgument(f"ild_loss: kind={kind!r} is not 'l2' or 'mse'")
    total = jnp.zeros((), jnp.float32)
    for name in ("block_output", "mixer_output"):
        if len(student[name]) != len(teacher[name]):
            raise InvalidArgument(f"ild_loss: {len(student[name])} student and {len(teacher[name])} teacher {name}s")
        for s, t in zip(student[name], teacher[name], strict=True):
            diff = s.astype(jnp.float32) - t.astype(jnp.float32)
            if kind == "l2":
                total += normalized(_norm(diff), mask, "token")
            else:
                total += normalized(jnp.mean(diff * diff, axis=-1), mask, "token")
    return total


def kl_per_token(teacher_logits: jax.Array, student_logits: jax.Array, *, direction: str = "forward",
                 temperature: float = 1.0) -> jax.Array:
    """``[B, L]``: KL between the teacher's and the student's next-token distributions at temperature T (times T²,
    so gradients keep their scale): ``forward`` = KL(p_teacher ‖ p_student) (the paper's), ``reverse`` =
    KL(p_student ‖ p_teacher)."""
    if direction not in KL_DIRECTIONS:
        raise InvalidArgument(f"kl_loss: direction={direction!r} is not 'forward' or 'reverse'")
    log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    p, log_p, log_q = (jnp.exp(log_t), log_t, log_s) if direction == "forward" else (jnp.exp(log_s), log_s, log_t)
    return jnp.sum(p * (log_p - log_q), axis=-1) * temperature ** 2


def kl_loss(teacher_logits: jax.Array, student_logits: jax.Array, mask: jax.Array | None = None, *,
            direction: str = "forward", temperature: float = 1.0, normalize: str = "token") -> jax.Array:
    """``kl_per_token`` over the counted tokens, by ``normalize``."""
    return normalized(kl_per_token(teacher_logits, student_logits, direction=direction, temperature=temperature),
                       mask, normalize)


def topk_kl_per_token(teacher_values: jax.Array, teacher_indices: jax.Array, student_logits: jax.Array) -> jax.Array:
    """``[B, L]``: forward KL against the teacher's top-k logits only (``[B, L, k]`` values and vocabulary indices,
    e.g. precomputed and stored): the teacher's distribution renormalised over its k tokens, the student's
    full-vocabulary log-probabilities at those tokens."""
    log_t = jax.nn.log_softmax(teacher_values.astype(jnp.float32), axis=-1)
    log_s = jnp.take_along_axis(jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1), teacher_indices,
                                axis=-1)
    return jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)


def topk_kl_loss(teacher_values: jax.Array, teacher_indices: jax.Array, student_logits: jax.Array,
                 mask: jax.Array | None = None, *, normalize: str = "token") -> jax.Array:
    """``topk_kl_per_token`` over the counted tokens, by ``normalize``."""
    return normalized(topk_kl_per_token(teacher_values, teacher_indices, student_logits), mask, normalize)


def next_tokens(tokens: jax.Array) -> jax.Array:
    """``[B, L]``: each position's next token (the last position's is its own, a placeholder that no mask counts),
    the targets of ``token_logprobs`` over whole rows."""
    return jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``[B, L]``: log p(target) of each position (``targets`` ``[B, L]``, the next tokens)."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]


def ce_loss(student_logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None, *,
            normalize: str = "token") -> jax.Array:
    """Cross-entropy of ``targets`` ``[B, L]`` (the next tokens) under the student."""
    return normalized(-token_logprobs(student_logits, targets), mask, normalize)


# tokens of the LM head at a time where a whole row's ``[B, L, vocab]`` logits would not fit (evaluation over long rows)
HEAD_CHUNK = 512


def token_chunks(per_token, inputs: tuple, chunk: int):
    """``per_token(*inputs)`` — a function of ``[B, L, …]`` arrays returning ``[B, L]`` arrays (or a tuple of them)
    whose value at a token depends only on that token's inputs — computed ``chunk`` tokens at a time: a ``lax.scan``
    over the sequence whose body is rematerialised (``jax.checkpoint``), so neither pass holds more than one chunk's
    intermediates (the ``[B, chunk, vocab]`` logits of an LM head inside ``per_token``) instead of ``[B, L, vocab]``.
    ``chunk`` must divide L; the values are ``per_token``'s on the whole sequence."""
    length = inputs[0].shape[1]
    if chunk >= length:
        return per_token(*inputs)
    if length % chunk:
        raise InvalidArgument(f"token_chunks: chunk={chunk} does not divide the {length} tokens of a row")
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], length // chunk, chunk, *x.shape[2:]), 1, 0)  # noqa: E731
    _, out = jax.lax.scan(lambda _, xs: (None, jax.checkpoint(per_token)(*xs)), None, tuple(map(split, inputs)))
    join = lambda y: jnp.moveaxis(y, 0, 1).reshape(y.shape[1], length)  # noqa: E731
    return jax.tree.map(join, out)


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, reference_chosen: jax.Array,
             reference_rejected: jax.Array, *, beta: float = 0.01) -> tuple[jax.Array, dict]:
    """Direct preference optimisation, sigmoid form: ``−log σ(β[(π_c − ref_c) − (π_r − ref_r)])`` averaged over pairs,
    from each response's sequence log-probability ``[B]``. Returns (loss, metrics): the implicit rewards
    ``β(π − ref)`` of the chosen and rejected responses, their margin, and the accuracy (margin > 0)."""
    chosen = beta * (policy_chosen - reference_chosen).astype(jnp.float32)
    rejected = beta * (policy_rejected - reference_rejected).astype(jnp.float32)
    margin = chosen - rejected
    loss = jnp.mean(-jax.nn.log_sigmoid(margin))
    return loss, {"reward_chosen": jnp.mean(chosen), "reward_rejected": jnp.mean(rejected),
                  "reward_margin": jnp.mean(margin), "reward_accuracy": jnp.mean((margin > 0).astype(jnp.float32))}
