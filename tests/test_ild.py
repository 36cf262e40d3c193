"""Stage 1 (intermediate-layer distillation) and stage 2 (KD): the teacher's layer inputs and outputs, teacher forcing,
and trainer steps on each objective that learn. fp32."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import zebrax
from tests.helpers import TEACHER, TWO_LAYERS, close, hybrid, random_model
from zebrax.distill import TrainConfig, ild_objective, make_optimizer, make_step, teacher_forced
from zebrax.init import init_hybrid
from zebrax.losses import ild_loss
from zebrax.models import layer_io
from zebrax.recipe import from_teacher


def test_a_student_equal_to_its_teacher_has_zero_ild_loss(rng):
    """An all-attention plan with the teacher's weights, forced with the teacher's inputs, reproduces every layer's
    mixer and block output exactly."""
    teacher = random_model(TEACHER, seed=2)
    copy = zebrax.Model(from_teacher(TEACHER, mla_layers="none", attention_layers=list(range(5)),
                                                  kv_lora_rank=8, q_lora_rank=8), teacher.params)
    tokens = rng.integers(0, 97, (2, 9))
    io = layer_io(teacher.module, teacher.params, tokens)
    assert [x.shape for x in io["block_input"]] == [(2, 9, 48)] * 5
    np.testing.assert_array_equal(io["block_output"][2], io["block_input"][3])
    forced = teacher_forced(copy.module, copy.params, io["block_input"], tokens)
    assert float(ild_loss(forced, io)) == 0.0


def test_ild_steps_bring_both_students_toward_the_teacher(rng):
    """Both students in one step (the teacher runs once); embeddings and head are off the ILD path: untouched."""
    teacher = random_model(TEACHER, seed=2)
    batch = {"tokens": rng.integers(0, 97, (4, 16)), "token_mask": np.ones((4, 16), bool)}
    students = {name: (config, init_hybrid(TEACHER, teacher.params, config, jax.random.key(0))[0])
                for name, config in (("mla", hybrid("all")), ("mamba2", hybrid("none")))}
    params = {name: jax.tree.map(jax.numpy.asarray, p) for name, (_, p) in students.items()}
    objective = ild_objective(teacher.module, {name: zebrax.Model(c, p).module for name, (c, p) in students.items()})
    optimizer = make_optimizer(TrainConfig(steps=25, learning_rate=3e-3, warmup_ratio=0.0, final_lr_ratio=1.0),
                               params)
    step, state = make_step(objective, optimizer), optimizer.init(params)
    losses = []
    for _ in range(25):
        params, state, metrics = step(params, state, teacher.params, batch)
        losses.append({k: float(metrics[f"ild_{k}"]) for k in students})
    for name in students:
        assert losses[-1][name] < 0.7 * losses[0][name], (name, losses[0], losses[-1])
        for part in ("embed_tokens", "norm"):  # not on the ILD path: no gradient, no update
            for a, b in zip(jax.tree.leaves(params[name][part]), jax.tree.leaves(students[name][1][part]), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kd_steps_bring_a_hybrid_toward_the_teacher_and_never_touch_the_teacher(rng):
    """Forward KL, padding in the batch and the first half of each row masked out of the loss (a 'prompt')."""
    from zebrax.distill import kd_objective
    from zebrax.losses import kl_loss

    teacher = random_model(TEACHER, seed=2)
    config = hybrid([0, 3])
    params, _ = init_hybrid(TEACHER, teacher.params, config, jax.random.key(0))
    student = zebrax.Model(config, params)
    tokens = rng.integers(0, 97, (4, 16))
    token_mask = np.ones((4, 16), bool)
    token_mask[1, :3] = False  # a left-padded row
    loss_mask = token_mask.copy()
    loss_mask[:, :8] = False
    batch = {"tokens": tokens, "token_mask": token_mask, "loss_mask": loss_mask}
    params = jax.tree.map(jax.numpy.asarray, params)
    optimizer = make_optimizer(TrainConfig(steps=20, learning_rate=2e-3, warmup_ratio=0.0, final_lr_ratio=1.0),
                               params)
    step, state = make_step(kd_objective(teacher.module, student.module), optimizer), optimizer.init(params)
    teacher_before = jax.tree.map(np.asarray, teacher.params)
    before = float(kl_loss(teacher.logits(tokens, token_mask), student.logits(tokens, token_mask), loss_mask))
    losses = []
    for _ in range(20):
        params, state, metrics = step(params, state, teacher.params, batch)
        losses.append(float(metrics["loss"]))
    assert abs(losses[0] - before) < 1e-4 * max(1.0, before)  # the step computes the KL it reports
    assert losses[-1] < 0.7 * losses[0], (losses[0], losses[-1])
    jax.tree.map(np.testing.assert_array_equal, teacher_before, jax.tree.map(np.asarray, teacher.params))


def test_remat_and_bf16_compute(rng):
    """Remat recomputes, it does not change a gradient, under any policy (fp32, 1e-6); bf16 compute keeps float32
    logits and master weights and gives the float32 loss within bf16 rounding (5e-2 relative)."""
    from zebrax.distill import kd_objective
    from zebrax.errors import InvalidArgument
    from zebrax.models import build
    from zebrax.models.decoder import REMAT_POLICIES

    teacher = random_model(TWO_LAYERS, seed=2)
    config = hybrid([0], teacher=TWO_LAYERS)  # L S
    params = jax.tree.map(jax.numpy.asarray, init_hybrid(TWO_LAYERS, teacher.params, config, jax.random.key(0))[0])
    batch = {"tokens": rng.integers(0, 97, (1, 8)), "token_mask": np.ones((1, 8), bool),
             "loss_mask": np.ones((1, 8), bool)}

    def loss_and_grads(student, teacher_module):
        objective = kd_objective(teacher_module, student)
        return jax.jit(jax.value_and_grad(lambda p: objective(p, teacher.params, batch)[0]))(params)

    plain = loss_and_grads(build(config), build(TWO_LAYERS))
    remat = loss_and_grads(build(config, remat=True), build(TWO_LAYERS))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    for policy in REMAT_POLICIES:  # what a policy keeps changes memory, never a gradient
        kept = loss_and_grads(build(config, remat=policy), build(TWO_LAYERS))
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(kept), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    with pytest.raises(InvalidArgument, match="remat = 'save_qkv': expected True, False, 'none' or one of full"):
        build(config, remat="save_qkv")
    bf16 = loss_and_grads(build(config.replace(dtype="bfloat16")), build(TWO_LAYERS.replace(dtype="bfloat16")))
    assert bf16[0].dtype == np.float32 and all(g.dtype == np.float32 for g in jax.tree.leaves(bf16[1]))
    np.testing.assert_allclose(float(bf16[0]), float(plain[0]), rtol=5e-2)


def test_top_k_kd_is_the_renormalised_kl_over_the_teachers_top_tokens(rng):
    """With k = the vocabulary it is the full forward KL (1e-5); with k = 5 it equals topk_kl_loss on the teacher's
    5 largest logits, computed here by hand, and so does KD from those logits stored in the batch (no teacher run;
    gradients 1e-4 of the largest magnitude). fp32."""
    from zebrax.distill import kd_objective
    from zebrax.errors import InvalidArgument
    from zebrax.losses import kl_loss, topk_kl_loss
    from zebrax.models import build

    teacher = random_model(TEACHER, seed=2)
    config = hybrid([0, 3])
    params = init_hybrid(TEACHER, teacher.params, config, jax.random.key(0))[0]
    student = zebrax.Model(config, params)
    tokens = rng.integers(0, 97, (2, 8))
    batch = {"tokens": tokens, "token_mask": np.ones((2, 8), bool), "loss_mask": np.ones((2, 8), bool)}
    t_logits, s_logits = teacher.logits(tokens), student.logits(tokens)
    full = jax.jit(kd_objective(build(TEACHER), build(config), top_k=97))(params, teacher.params, batch)[0]
    np.testing.assert_allclose(float(full), float(kl_loss(t_logits, s_logits)), rtol=1e-5)
    order = np.argsort(-t_logits, axis=-1)[..., :5]
    want = topk_kl_loss(np.take_along_axis(t_logits, order, -1), order, s_logits)
    got = jax.jit(kd_objective(build(TEACHER), build(config), top_k=5))(params, teacher.params, batch)[0]
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    # the same from stored top-k logits, in chunks of 4 tokens, with no teacher parameters: loss and gradients
    stored = {**batch, "teacher_topk_values": np.take_along_axis(t_logits, order, -1), "teacher_topk_indices": order}
    offline = kd_objective(build(TEACHER), build(config), top_k=5, chunk=4)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: offline(p, None, stored)[0]))(params)
    online = kd_objective(build(TEACHER), build(config), top_k=5)
    want_grads = jax.jit(jax.grad(lambda p: online(p, teacher.params, batch)[0]))(params)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        close(g, w, 1e-4)
    with pytest.raises(InvalidArgument, match="stored teacher logits are its top 5, top_k is 3"):
        kd_objective(build(TEACHER), build(config), top_k=3)(params, None, stored)
    with pytest.raises(InvalidArgument, match="top-k KD is the forward KL at temperature 1"):
        kd_objective(build(TEACHER), build(config), top_k=5, direction="reverse")


def test_dpo_in_token_chunks_gives_the_whole_sequence_loss_and_gradients(rng):
    """DPO's reply log-likelihoods with the LM head 4 tokens at a time equal the whole rows' (fp32: 1e-5 relative,
    or 1e-5 of each gradient leaf's largest entry: DPO's gradient is the difference of the chosen and rejected
    replies', which cancel, and the chunks sum each in another order; measured 8e-6)."""
    from zebrax.distill import dpo_objective
    from zebrax.models import build

    model = random_model(hybrid([0], teacher=TWO_LAYERS), seed=3)
    mask = np.arange(12)[None] < np.array([[12], [9]])
    batch = {k: v for side in ("chosen", "rejected") for k, v in (
        (f"{side}_tokens", rng.integers(0, 97, (2, 12))), (f"{side}_token_mask", mask),
        (f"{side}_loss_mask", mask & (np.arange(12) > 4)))}
    reference = jax.tree.map(lambda x: x * 0.9, model.params)
    results = [jax.jit(jax.value_and_grad(lambda p, chunk=chunk: dpo_objective(build(model.config), beta=0.5,
                                                                               chunk=chunk)(p, reference, batch)[0]))(
        model.params) for chunk in (0, 4)]
    for whole, chunked in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        whole = np.asarray(whole)
        np.testing.assert_allclose(np.asarray(chunked), whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())


def test_kd_in_token_chunks_gives_the_whole_sequence_loss_and_gradients(rng):
    """The LM heads and the losses 4 tokens at a time (``chunk=4``, rematerialised) equal the whole-sequence
    computation on packed rows with padding, reverse at temperature 2 with a CE term, and top-k (fp32: 1e-6
    relative, or 1e-6 of each gradient leaf's largest entry; the forward KL is the default path of every KD test)."""
    from zebrax.distill import kd_objective
    from zebrax.models import build

    teacher = random_model(TWO_LAYERS, seed=2)
    config = hybrid([0], teacher=TWO_LAYERS)
    params = random_model(config, seed=4).params
    segments = np.array([[1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 0], [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0]])
    batch = {"tokens": rng.integers(0, 97, (2, 12)), "token_mask": segments > 0, "segment_ids": segments,
             "loss_mask": rng.random((2, 12)) < 0.7}
    for kw in (dict(direction="reverse", temperature=2.0, ce_weight=0.5), dict(top_k=5)):
        results = [jax.jit(jax.value_and_grad(
            lambda p, chunk=chunk: kd_objective(build(TWO_LAYERS), build(config), chunk=chunk, **kw)(  # noqa: B023
                p, teacher.params, batch)[0]))(params) for chunk in (0, 4)]
        for whole, chunked in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
            whole = np.asarray(whole)
            np.testing.assert_allclose(np.asarray(chunked), whole, rtol=1e-6, atol=1e-6 * np.abs(whole).max())


def test_ild_layer_by_layer_gives_the_whole_loss_and_its_gradients(rng):
    """The objective trains each layer inside its own forward pass (a custom VJP): its loss and gradients equal
    autodiff of ``ild_loss`` over ``teacher_forced`` on packed rows with padding, for an MLA and a Mamba2 student,
    with the loss scaled by 2.5 so that the cotangent is not 1 (fp32: 1e-5 relative, or 1e-5 of each leaf's largest
    entry: the sums run in another order; measured 1.5e-6); the embeddings and heads get zero gradients."""
    from zebrax.models import build

    teacher = random_model(TWO_LAYERS, seed=2)
    configs = {"mla": hybrid("all", teacher=TWO_LAYERS), "mamba2": hybrid("none", teacher=TWO_LAYERS)}
    params = {name: random_model(c, seed=4).params for name, c in configs.items()}
    segments = np.array([[1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 0], [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0]])
    batch = {"tokens": rng.integers(0, 97, (2, 12)), "token_mask": segments > 0, "segment_ids": segments}
    objective = ild_objective(build(TWO_LAYERS), {name: build(c) for name, c in configs.items()})

    def whole(p):
        io = layer_io(build(TWO_LAYERS), teacher.params, batch["tokens"], batch["token_mask"], segments)
        return sum(ild_loss(teacher_forced(build(c), p[name], io["block_input"], batch["tokens"],
                                           batch["token_mask"], segments), io, batch["token_mask"])
                   for name, c in configs.items())

    want = jax.jit(jax.value_and_grad(lambda p: 2.5 * whole(p)))(params)
    got = jax.jit(jax.value_and_grad(lambda p: 2.5 * objective(p, teacher.params, batch)[0]))(params)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        a = np.asarray(a)
        np.testing.assert_allclose(np.asarray(b), a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    assert not np.any(np.asarray(got[1]["mla"]["embed_tokens"]["embedding"]))
    assert float(np.abs(np.asarray(jax.tree.leaves(got[1]["mamba2"]["layers_1"])[0])).max()) > 0


def test_remat_policies_keep_the_projections_they_name(rng, capsys):
    """What each policy saves for the backward pass (JAX's own list of residuals): "full" no projection,
    "save_qkv_proj" the mixers' input projections, "save_out_proj" the output maps, neither the MLP's gate,
    "save_dots" every matmul's output."""
    from jax.ad_checkpoint import print_saved_residuals

    from zebrax.models import build

    config = hybrid([0], teacher=TWO_LAYERS)  # L S
    params = random_model(config, seed=4).params
    tokens = rng.integers(0, 97, (1, 8))

    def saved(policy):
        module = build(config, remat=policy)
        print_saved_residuals(lambda p: module.apply({"params": p}, tokens)[0].sum(), params)
        return capsys.readouterr().out

    full, qkv, out, dots = saved("full"), saved("save_qkv_proj"), saved("save_out_proj"), saved("save_dots")
    assert "named" not in full
    assert "named 'q_a_proj'" in qkv and "named 'in_proj'" in qkv and "named 'o_proj'" not in qkv
    assert "named 'o_proj'" in out and "named 'out_proj'" in out and "named 'q_a_proj'" not in out
    assert "named 'gate_proj'" not in qkv + out
    assert dots.count("dot_general") > full.count("dot_general")
