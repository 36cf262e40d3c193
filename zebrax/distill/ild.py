"""Stage 1, intermediate-layer distillation (METHOD §6): every student layer gets the teacher's input to that layer
and learns to reproduce the teacher layer's mixer output and block output. The teacher runs once per batch inside
the same jitted step and is never differentiated.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

from zebrax.distill.losses import ild_loss
from zebrax.models.decoder import Block, DecoderLM, make_slots

OUTPUTS = ("block_input", "mixer_output", "block_output")


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
    block = nn.remat(Block) if module.remat else Block
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
    Only the students' layers receive gradients (embeddings, final norm and head are not on the ILD path)."""

    def objective(params, teacher_params, batch):
        tokens, mask, seg = batch["tokens"], batch["token_mask"], batch.get("segment_ids")
        targets = jax.tree.map(jax.lax.stop_gradient, layer_io(teacher, teacher_params, tokens, mask, seg))
        losses = {f"ild_{name}": ild_loss(teacher_forced(module, params[name], targets["block_input"], tokens, mask,
                                                         seg), targets, mask, kind=kind)
                  for name, module in students.items()}
        return sum(losses.values()), losses

    return objective
