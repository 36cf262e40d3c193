"""The distillation losses against values computed by hand on tiny tensors (float32)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zebrax.errors import InvalidArgument
from zebrax.losses import ce_loss, dpo_loss, ild_loss, kl_loss, token_logprobs, topk_kl_loss

LOG2 = math.log(2)


def test_ild_is_the_non_squared_l2_norm_per_token_summed_over_layers_and_both_outputs():
    # one layer, B=1, L=2, D=2: block outputs differ by (3, 4) and (0, 0) -> norms 5 and 0, mean 2.5;
    # mixer outputs differ by (1, 0) at both tokens -> mean 1. Total 3.5.
    teacher = {"block_output": [jnp.zeros((1, 2, 2))], "mixer_output": [jnp.zeros((1, 2, 2))]}
    student = {"block_output": [jnp.array([[[3.0, 4.0], [0.0, 0.0]]])],
               "mixer_output": [jnp.array([[[1.0, 0.0], [1.0, 0.0]]])]}
    assert float(ild_loss(student, teacher)) == pytest.approx(3.5)
    # the second token masked out: 5 + 1
    assert float(ild_loss(student, teacher, jnp.array([[True, False]]))) == pytest.approx(6.0)
    # MSE: the block's per-token means over D are 12.5 and 0 (mean 6.25), the mixer's 0.5 and 0.5 (mean 0.5)
    assert float(ild_loss(student, teacher, kind="mse")) == pytest.approx(6.25 + 0.5)
    two_layers = {k: v * 2 for k, v in student.items()}
    assert float(ild_loss(two_layers, {k: v * 2 for k, v in teacher.items()})) == pytest.approx(7.0)


def test_forward_and_reverse_kl_with_masks_and_both_normalisations():
    # token 0: teacher (1/2, 1/2) vs student (0.8, 0.2); token 1: equal distributions
    teacher = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
    student = jnp.log(jnp.array([[[0.8, 0.2], [0.9, 0.1]]]))
    fwd0 = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)  # KL(t || s) at token 0; token 1 is 0
    rev0 = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert float(kl_loss(teacher, student)) == pytest.approx(fwd0 / 2, rel=1e-5)
    assert float(kl_loss(teacher, student, direction="reverse")) == pytest.approx(rev0 / 2, rel=1e-5)
    mask = jnp.array([[True, False]])
    assert float(kl_loss(teacher, student, mask)) == pytest.approx(fwd0, rel=1e-5)
    # "sequence": the sum over counted tokens divided by the batch size (1 here): the same as the token sum
    assert float(kl_loss(teacher, student, normalize="sequence")) == pytest.approx(fwd0, rel=1e-5)
    batch = jnp.concatenate([teacher, teacher]), jnp.concatenate([student, student])
    assert float(kl_loss(*batch, normalize="sequence")) == pytest.approx(fwd0, rel=1e-5)  # 2·fwd0 / 2 sequences
    assert float(kl_loss(*batch, normalize="token")) == pytest.approx(fwd0 / 2, rel=1e-5)  # 2·fwd0 / 4 tokens
    with pytest.raises(InvalidArgument, match="normalize='batch'"):
        kl_loss(teacher, student, normalize="batch")


def test_temperature_softens_both_distributions_and_scales_by_its_square():
    teacher = jnp.array([[[2.0 * LOG2, 0.0]]])  # at T = 2: logits (log 2, 0) -> (2/3, 1/3)
    student = jnp.array([[[0.0, 0.0]]])  # (1/2, 1/2)
    want = 4 * (2 / 3 * math.log((2 / 3) / 0.5) + 1 / 3 * math.log((1 / 3) / 0.5))
    assert float(kl_loss(teacher, student, temperature=2.0)) == pytest.approx(want, rel=1e-5)


def test_topk_kl_renormalises_the_teachers_top_tokens():
    # teacher's top-2 of a 3-token vocabulary: logits (0, 0) at tokens 2 and 0 -> (1/2, 1/2) there;
    # student's full distribution (1/4, 1/4, 1/2): log q at tokens 2 and 0 = log 1/2, log 1/4
    values, indices = jnp.array([[[0.0, 0.0]]]), jnp.array([[[2, 0]]])
    student = jnp.log(jnp.array([[[0.25, 0.25, 0.5]]]))
    want = 0.5 * math.log(0.5 / 0.5) + 0.5 * math.log(0.5 / 0.25)
    assert float(topk_kl_loss(values, indices, student)) == pytest.approx(want, rel=1e-5)


def test_cross_entropy_and_token_logprobs():
    logits = jnp.log(jnp.array([[[0.25, 0.75], [0.5, 0.5]]]))
    targets = jnp.array([[1, 0]])
    assert float(ce_loss(logits, targets)) == pytest.approx(-(math.log(0.75) + math.log(0.5)) / 2, rel=1e-5)
    np.testing.assert_allclose(token_logprobs(logits, targets), [[math.log(0.75), math.log(0.5)]], rtol=1e-6)


def test_dpo_sigmoid_loss_rewards_margin_and_accuracy():
    policy_c, policy_r = jnp.array([-1.0, -2.0]), jnp.array([-3.0, -1.0])
    ref_c, ref_r = jnp.array([-2.0, -2.0]), jnp.array([-2.0, -2.0])
    beta = 0.5
    # pair 0: chosen +1, rejected -1 -> margin 0.5·(1 + 1) = 1; pair 1: chosen 0, rejected +1 -> margin -0.5
    loss, m = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=beta)
    want = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(m["reward_margin"]) == pytest.approx(0.25) and float(m["reward_accuracy"]) == 0.5
    assert float(m["reward_chosen"]) == pytest.approx(0.25) and float(m["reward_rejected"]) == pytest.approx(0.0)
    assert float(dpo_loss(ref_c, ref_r, ref_c, ref_r, beta=beta)[0]) == pytest.approx(LOG2)  # policy = reference


def test_ild_l2_has_finite_gradients_where_student_and_teacher_agree_exactly():
    """Padding of packed rows: teacher and student both output exact zeros there; sqrt's derivative at 0 must not
    turn into NaN through the mask."""
    h = jnp.zeros((1, 3, 4)).at[0, 0, 0].set(1.0)
    student = {"block_output": [h], "mixer_output": [h]}
    teacher = {"block_output": [jnp.zeros((1, 3, 4))], "mixer_output": [jnp.zeros((1, 3, 4))]}
    mask = jnp.array([[True, True, False]])
    grad = jax.grad(lambda s: ild_loss({"block_output": [s], "mixer_output": [s]}, teacher, mask))(h)
    assert bool(jnp.all(jnp.isfinite(grad)))
    np.testing.assert_allclose(np.asarray(grad[0, 0]), [1.0, 0, 0, 0])  # 2 terms × d‖h‖/dh / 2 tokens
    assert float(ild_loss(student, teacher, mask)) == 1.0
