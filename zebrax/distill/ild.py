"""Stage 1, intermediate-layer distillation (METHOD §6): every student layer gets the teacher's input to that layer
and learns to reproduce the teacher layer's mixer output and block output. The teacher runs once per batch inside
the same jitted step and is never differentiated.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from zebrax.distill.losses import ild_loss
from zebrax.models.decoder import Block, DecoderLM, make_slots, remat_block

OUTPUTS = ("block_input", "mixer_output", "block_output")
TARGETS = ("mixer_output", "block_output")  # what ILD compares


def layer_io(module: DecoderLM, params: dict, tokens: jax.Array, token_mask: jax.Array | None = None,
             segment_ids: jax.Array | None = None) -> dict:
    """One forward pass → ``{"block_input": [x_0, …], "mixer_output": […], "block_output": […]}``, each ``[B, L, D]``
    (what every block sows)."""
    _, state = module.apply({"params": params}, tokens, token_mask=token_mask, segment_ids=segment_ids,
                            mutable=["intermediates"])
    layers = state["intermediates"]
    n = module.config.num_hidden_layers
    return {name: [layers[f"layers_{i}"][name][0] for i in range(n)] for name in OUTPUTS}


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
