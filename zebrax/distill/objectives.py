"""The objectives of the pipeline's training stages (METHOD §6), each in the trainer's form ``objective(params,
frozen, batch) -> (loss, metrics)``: ILD (every student layer on the teacher's input to it, learning its output), KD
(the teacher's next-token distributions), DPO (preference pairs, the distilled model the frozen reference), and the
tiny teacher's next-token cross-entropy. ``stage_objective`` builds a stage's objective from an ``Experiment``; the
stages, ``zebrax compile`` and ``zebrax bench train`` all build their steps through it. The teacher runs inside the
same jitted step and is never differentiated; the LM heads and losses are float32 whatever the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from zebrax import data
from zebrax.data import TOPK_FIELDS, next_in_document
from zebrax.errors import InvalidArgument
from zebrax.losses import (
    ce_loss,
    dpo_loss,
    ild_loss,
    kl_per_token,
    next_tokens,
    normalized,
    token_chunks,
    token_logprobs,
    topk_kl_per_token,
)
from zebrax.models import build
from zebrax.models.decoder import Block, DecoderLM, LMHead, layer_io, make_slots, remat_block

TARGETS = ("mixer_output", "block_output")  # what ILD compares


def _compute(exp, config, *, trained: bool):
    """The module a training step runs: ``config`` computing in ``exp.compute_dtype`` (its parameters stay in
    ``config.param_dtype``), with remat for a trained model when ``exp.remat``."""
    return build(config.replace(dtype=exp.compute_dtype), remat=trained and exp.remat)


def _chunk(exp) -> int:
    """``exp.loss_chunk`` where it divides ``seq_len`` (else the largest divisor below it), 0 for whole rows."""
    if not exp.loss_chunk or exp.loss_chunk >= exp.seq_len:
        return 0
    return max(c for c in range(1, exp.loss_chunk + 1) if exp.seq_len % c == 0)


def stage_objective(exp, stage: str, teacher, trained: dict) -> Callable:
    """The objective a training stage of ``exp`` runs (``trainer`` form): ``stage`` "ild", "kd" or "dpo";
    ``teacher`` the teacher's config; ``trained`` {name: config} of what the stage trains (ILD: both students;
    KD and DPO: {"": the hybrid}). ``zebrax compile`` and ``zebrax bench train`` build their steps on it."""
    if stage == "ild":
        return ild_objective(_compute(exp, teacher, trained=False),
                             {n: _compute(exp, c, trained=True) for n, c in trained.items()}, kind=exp.ild_kind)
    if stage == "kd":
        return kd_objective(_compute(exp, teacher, trained=False), _compute(exp, trained[""], trained=True),
                            direction=exp.kd_direction, temperature=exp.kd_temperature, normalize=exp.kd_normalize,
                            ce_weight=exp.kd_ce_weight, top_k=exp.kd_top_k, chunk=_chunk(exp))
    if stage == "dpo":
        return dpo_objective(_compute(exp, trained[""], trained=True), beta=exp.dpo_beta, chunk=_chunk(exp))
    raise InvalidArgument(f"stage={stage!r}: expected 'ild', 'kd' or 'dpo'")


def teacher_forced(module: DecoderLM, params: dict, inputs: list[jax.Array], tokens: jax.Array,
                   token_mask: jax.Array | None = None, segment_ids: jax.Array | None = None) -> dict:
    """Each of the student's layers run on the given per-layer inputs (the teacher's), independently →
    ``{"mixer_output": […], "block_output": […]}``."""
    cfg = module.config
    slots = make_slots(tokens, None, token_mask, None, segment_ids)
    out = {"mixer_output": [], "block_output": []}
    block = remat_block(module.remat)
    for i, spec in enumerate(cfg.plan()):
        _, state = block(spec, cfg, module.impls).apply({"params": params[f"layers_{i}"]}, inputs[i], slots,
                                                        mutable=["intermediates"])
        for name in out:
            out[name].append(state["intermediates"][name][0])
    return out


def ild_objective(teacher: DecoderLM, students: dict[str, DecoderLM], *, kind: str = "l2") -> Callable:
    """The trainer's objective for ILD of several students at once (the teacher runs once per batch):
    ``objective(params, teacher_params, batch) -> (Σ_students ild_loss, {"ild_NAME": …})`` with ``params`` =
    ``{NAME: student params}`` and ``batch`` holding ``tokens``, ``token_mask`` and (packed rows) ``segment_ids``.
    Only the students' layers receive gradients (embeddings, final norm and head are not on the ILD path).

    The loss is a sum over layers, each depending on its own parameters only, so the students' layers are trained
    one after another: each layer's forward and backward run together inside the forward pass of a ``custom_vjp``
    (its gradient is the residual), and the next layer starts only when they are done (an
    ``optimization_barrier``). Only one layer's activations are ever live, and none is recomputed (``remat``
    changes nothing here). Left to itself, XLA interleaves the independent layers' recomputations and holds their
    activations together: the 8B ILD step needed 149 GiB a chip on v5p-16."""
    layers = [(name, i, Block(spec, module.config, module.impls))
              for name, module in students.items() for i, spec in enumerate(module.config.plan())]

    def layer_loss(params, block, x, target, slots, mask):
        _, state = block.apply({"params": params}, x, slots, mutable=["intermediates"])
        return ild_loss({k: [state["intermediates"][k][0]] for k in TARGETS}, {k: [target[k]] for k in TARGETS},
                        mask, kind=kind)

    def run(params, targets, tokens, mask, seg, with_grads):
        slots = make_slots(tokens, None, mask, None, seg)
        losses = {name: jnp.zeros((), jnp.float32) for name in students}
        grads = {name: {} for name in students}
        done = None
        for name, i, block in layers:
            x, target = targets["block_input"][i], {k: targets[k][i] for k in TARGETS}
            if done is not None:  # this layer waits for the previous one's loss and gradients
                x, _ = jax.lax.optimization_barrier((x, done))
            p = params[name][f"layers_{i}"]
            if with_grads:
                loss, grads[name][f"layers_{i}"] = jax.value_and_grad(layer_loss)(p, block, x, target, slots, mask)
            else:
                loss = layer_loss(p, block, x, target, slots, mask)
            losses[name] += loss
            done = (loss, grads[name].get(f"layers_{i}"))
        return losses, grads

    @jax.custom_vjp
    def layerwise(params, targets, tokens, mask, seg):
        return run(params, targets, tokens, mask, seg, with_grads=False)[0]

    def forward(params, targets, tokens, mask, seg):
        return run(params, targets, tokens, mask, seg, with_grads=True)

    def backward(grads, cotangents):
        scaled = {name: jax.tree.map(lambda g, c=cotangents[name]: (g * c).astype(g.dtype), grads[name])
                  for name in grads}
        return scaled, None, None, None, None

    layerwise.defvjp(forward, backward)

    def objective(params, teacher_params, batch):
        tokens, mask, seg = batch["tokens"], batch["token_mask"], batch.get("segment_ids")
        targets = jax.tree.map(jax.lax.stop_gradient, layer_io(teacher, teacher_params, tokens, mask, seg))
        trained = {name: {f"layers_{i}": params[name][f"layers_{i}"] for i in range(m.config.num_hidden_layers)}
                   for name, m in students.items()}
        losses = layerwise(trained, targets, tokens, mask, seg)
        return sum(losses.values()), {f"ild_{name}": loss for name, loss in losses.items()}

    return objective


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


def lm_objective(model):
    """Next-token cross-entropy over counted positions: how the tiny teacher learns the data."""
    def objective(params, _, batch):
        tokens, token_mask = batch["tokens"], batch["token_mask"].astype(bool)
        logits = model.apply({"params": params}, tokens, token_mask=token_mask, segment_ids=batch.get("segment_ids"))[0]
        mask = batch["loss_mask"][:, :-1].astype(bool) & data.next_in_document(batch)
        ce = ce_loss(logits[:, :-1], tokens[:, 1:], mask)
        return ce, {"ce": ce}

    return objective


def real_tokens(batch: dict) -> int:
    return int(sum(np.sum(v) for k, v in batch.items() if k.endswith("token_mask")))


def counted(batch: dict) -> int:
    """The tokens a batch's loss counts (``data.counted``; both replies of DPO pairs)."""
    return int(sum(data.counted(batch, k.removesuffix("loss_mask")).sum() for k in batch if k.endswith("loss_mask")))
