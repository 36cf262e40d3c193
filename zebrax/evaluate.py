"""How close a model is to its teacher on held-out rows: KL(teacher ‖ model) per counted token and the model's
perplexity on the rows' next tokens. Rows as ``zebrax.data`` makes them (``tokens``, ``token_mask``, ``loss_mask``)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from zebrax.distill.losses import kl_loss


@functools.lru_cache(maxsize=8)
def _sums(teacher, model):
    """The jitted per-batch sums of one (teacher, model) pair of modules: compiled once, whatever the parameters."""

    @jax.jit
    def sums(teacher_params, params, tokens, token_mask, loss_mask):  # parameters as arguments, never constants
        counted = loss_mask & token_mask
        t_logits = teacher.apply({"params": teacher_params}, tokens, token_mask=token_mask)[0]
        logits = model.apply({"params": params}, tokens, token_mask=token_mask)[0]
        kl = kl_loss(t_logits, logits, counted, normalize="sequence") * tokens.shape[0]
        nxt = counted[:, :-1] & token_mask[:, 1:]
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], axis=-1), tokens[:, 1:, None], axis=-1)[..., 0]
        return kl, jnp.sum(counted), -jnp.sum(jnp.where(nxt, logp, 0.0)), jnp.sum(nxt)

    return sums


def kl_and_perplexity(teacher, teacher_params, model, params, rows: dict, *, batch_size: int = 8) -> dict:
    """``{"kl": …, "perplexity": …, "tokens": …}`` of ``model`` (a ``DecoderLM``) against ``teacher``, both float32
    sums over every counted position of every row (a last partial batch included), divided by their counts. KL is
    taken where ``loss_mask`` and ``token_mask`` hold; perplexity over the next tokens those positions predict."""
    sums = _sums(teacher, model)
    totals = np.zeros(4)
    n = len(rows["tokens"])
    for start in range(0, n, batch_size):
        part = [np.asarray(rows[k][start:start + batch_size]) for k in ("tokens", "token_mask", "loss_mask")]
        totals += np.array([float(x) for x in sums(teacher_params, params, part[0], part[1].astype(bool),
                                                   part[2].astype(bool))])
    kl, kl_count, nll, nll_count = totals
    return {"kl": kl / max(kl_count, 1), "perplexity": math.exp(nll / max(nll_count, 1)), "tokens": int(kl_count)}
