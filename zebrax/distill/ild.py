"""Stage 1, intermediate-layer distillation (METHOD §6): every student layer gets the teacher's input to that layer
and learns to reproduce the teacher layer's mixer output and block output. The teacher runs once per batch inside
the same jitted step and is never differentiated.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from zebrax.distill.losses import ild_loss
from zebrax.models.decoder import Block, DecoderLM, make_slots

OUTPUTS = ("block_input", "mixer_output", "block_output")


def layer_io(module: DecoderLM, params: dict, tokens: jax.Array, token_mask: jax.Array | None = None) -> dict:
    """One forward pass → ``{"block_input": [x_0, …], "mixer_output": […], "block_output": […]}``, each ``[B, L, D]``
    (what every block sows)."""
    _, state = module.apply({"params": params}, tokens, token_mask=token_mask, mutable=["intermediates"])
    layers = state["intermediates"]
    n = module.config.num_hidden_layers
    return {name: [layers[f"layers_{i}"][name][0] for i in range(n)] for name in OUTPUTS}


def teacher_forced(module: DecoderLM, params: dict, inputs: list[jax.Array], tokens: jax.Array,
                   token_mask: jax.Array | None = None) -> dict:
    """Each of the student's layers run on the given per-layer inputs (the teacher's), independently →
    ``{"mixer_output": […], "block_output": […]}``."""
    cfg = module.config
    slots = make_slots(tokens, None, token_mask, None)
    out = {"mixer_output": [], "block_output": []}
    for i, spec in enumerate(cfg.plan()):
        _, state = Block(spec, cfg, module.impls).apply({"params": params[f"layers_{i}"]}, inputs[i], slots,
                                                        mutable=["intermediates"])
        for name in out:
            out[name].append(state["intermediates"][name][0])
    return out


def make_ild_step(teacher: DecoderLM, student: DecoderLM, optimizer: optax.GradientTransformation, *,
                  kind: str = "l2") -> Callable:
    """A jitted ``step(student_params, opt_state, teacher_params, tokens, token_mask) -> (student_params, opt_state,
    loss)``. Only the student's layers receive gradients (its embeddings and head are not on the ILD path)."""

    def loss_fn(student_params, teacher_params, tokens, token_mask):
        targets = jax.tree.map(jax.lax.stop_gradient, layer_io(teacher, teacher_params, tokens, token_mask))
        got = teacher_forced(student, student_params, targets["block_input"], tokens, token_mask)
        return ild_loss(got, targets, token_mask, kind=kind)

    @jax.jit
    def step(student_params, opt_state, teacher_params, tokens, token_mask):
        loss, grads = jax.value_and_grad(loss_fn)(student_params, teacher_params, tokens, token_mask)
        updates, opt_state = optimizer.update(grads, opt_state, student_params)
        return optax.apply_updates(student_params, updates), opt_state, loss

    return step


__all__ = ["layer_io", "make_ild_step", "teacher_forced"]
