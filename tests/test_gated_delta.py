"""The gated delta rule (zebrax/ops/gated_delta.py): the chunked (WY) form and the decode step against the
token-by-token recurrence, values and gradients; and against an independent implementation, transformers' Qwen3-Next
`torch_chunk_gated_delta_rule` and `torch_recurrent_gated_delta_rule` (PyTorch). fp32 unless stated: outputs and
states 1e-5 absolute (measured: 1.2e-7), gradients 1e-4 relative."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zebrax.ops import gated_delta as ops
from zebrax.ops.gated_delta import _unit_lower_inverse

# jitted as a model calls them: one program a call shape (eagerly, each primitive would be compiled on its own)
gated_delta_chunked = jax.jit(ops.gated_delta_chunked, static_argnames=("chunk_size",))
gated_delta_reference = jax.jit(ops.gated_delta_reference)
gated_delta_step = jax.jit(ops.gated_delta_step)


def inputs(batch=2, length=37, k_heads=2, heads=4, d_k=8, d_v=6, seed=0):
    """q and k L2-normalised as a Gated DeltaNet layer feeds them; g ≤ 0; β ∈ (0, 1); a non-zero initial state."""
    r = np.random.default_rng(seed)

    def unit(*shape):
        x = r.standard_normal(shape)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    return dict(q=unit(batch, length, k_heads, d_k), k=unit(batch, length, k_heads, d_k),
                v=r.standard_normal((batch, length, heads, d_v)).astype(np.float32),
                g=(-0.5 * np.abs(r.standard_normal((batch, length, heads)))).astype(np.float32),
                beta=(1 / (1 + np.exp(-r.standard_normal((batch, length, heads))))).astype(np.float32),
                initial_state=(0.1 * r.standard_normal((batch, heads, d_k, d_v))).astype(np.float32))


@pytest.mark.parametrize("chunk_size,length,k_heads", [(8, 37, 2), (4, 8, 4), (64, 37, 1), (1, 5, 2)])
def test_the_chunked_form_is_the_recurrence(chunk_size, length, k_heads):
    x = inputs(length=length, k_heads=k_heads)
    out, state = gated_delta_chunked(**x, chunk_size=chunk_size)
    ref_out, ref_state = gated_delta_reference(**x)
    assert out.shape == (2, length, 4, 6) and state.shape == (2, 4, 8, 6)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(state, ref_state, atol=1e-5)


@pytest.mark.parametrize("c", [1, 2, 3, 16, 64])
@pytest.mark.parametrize("entries", ["random", "repeated"])
def test_the_unit_lower_inverse_is_the_inverse(c, entries):
    """(I + N)⁻¹ by forward substitution (no LAPACK call), against numpy's float64 inverse: within 1e-5 of its
    largest entry in float32, for entries like the chunked form's (|N_ij| ≤ 1: β ≤ 1, unit keys, decays ≤ 1) — random
    ones, and those of one key repeated with β and decay near 1 (all 0.99), where the power series
    Π_j (I + (−N)^(2^j)) lost the inverse in float32 (its terms reach C(64, 31) ≈ 1.8e18)."""
    r = np.random.default_rng(c)
    n = np.tril(r.uniform(-1, 1, (3, c, c)) if entries == "random" else np.full((3, c, c), 0.99), -1)
    want = np.linalg.inv(np.eye(c) + n)
    got = np.asarray(jax.jit(_unit_lower_inverse)(jnp.asarray(n, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_a_long_repeated_text_stays_the_recurrence():
    """600 tokens whose keys cycle through 5 (a repeated sentence), β ≈ 0.99 and decay ≈ 1, in chunks of 64: the
    chunked form stays finite and equal to the recurrence (1e-4), where the power-series inverse overflowed the
    state within 512 tokens."""
    x = inputs(batch=1, length=600, k_heads=1, heads=2)
    x["k"] = np.tile(x["k"][:, :5], (1, 120, 1, 1))
    x["q"] = np.tile(x["q"][:, :5], (1, 120, 1, 1))
    x["beta"] = np.full_like(x["beta"], 0.99)
    x["g"] = np.full_like(x["g"], -1e-3)
    out, state = gated_delta_chunked(**x, chunk_size=64)
    ref_out, ref_state = gated_delta_reference(**x)
    assert np.isfinite(out).all() and np.isfinite(state).all()
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-4 * max(1.0, np.abs(ref_out).max()))
    np.testing.assert_allclose(state, ref_state, rtol=0, atol=1e-4 * max(1.0, np.abs(ref_state).max()))


def test_the_chunked_form_has_the_gradients_of_the_recurrence():
    x = inputs(length=21)
    r = np.random.default_rng(1)
    w_out, w_state = r.standard_normal((2, 21, 4, 6)), r.standard_normal((2, 4, 8, 6))

    def loss(fn, args):
        out, state = fn(**args)
        return jnp.sum(out * w_out) + jnp.sum(state * w_state)

    chunked = jax.grad(lambda a: loss(lambda **b: gated_delta_chunked(**b, chunk_size=8), a))(x)
    reference = jax.grad(lambda a: loss(gated_delta_reference, a))(x)
    for name in x:
        scale = np.abs(reference[name]).max()
        np.testing.assert_allclose(chunked[name], reference[name], atol=1e-4 * scale, err_msg=name)


def test_a_prefill_then_decode_steps_is_the_recurrence_over_the_whole_sequence():
    x = inputs(length=30)
    ref_out, ref_state = gated_delta_reference(**x)
    head = {n: (a[:, :18] if n != "initial_state" else a) for n, a in x.items()}
    out, state = gated_delta_chunked(**head, chunk_size=8)
    outs = [out]
    for t in range(18, 30):
        o, state = gated_delta_step(*(x[n][:, t] for n in ("q", "k", "v", "g", "beta")), state)
        outs.append(o[:, None])
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), ref_out, atol=1e-5)
    np.testing.assert_allclose(state, ref_state, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [8, 5, 64])
def test_a_reset_starts_a_document_afresh(chunk_size):
    """Two documents packed into one row (a reset at token 13; in the second row also at 0 and 30, so a chunk holds
    two starts) give what each document gives alone from a zero state, in both forms, gradients included."""
    x = inputs(length=37)
    reset = np.zeros((2, 37), bool)
    reset[:, 13] = True
    reset[1, [0, 30]] = True
    chunked, state = gated_delta_chunked(**x, chunk_size=chunk_size, reset=reset)
    reference, ref_state = gated_delta_reference(**x, reset=reset)
    np.testing.assert_allclose(chunked, reference, atol=1e-5)
    np.testing.assert_allclose(state, ref_state, atol=1e-5)
    alone = {n: (a[:, 13:30] if n != "initial_state" else None) for n, a in x.items()}
    second, _ = gated_delta_reference(**alone)
    np.testing.assert_allclose(chunked[:, 13:30], second, atol=1e-5)
    first, _ = gated_delta_reference(**{n: (a[:1, :13] if n != "initial_state" else a[:1]) for n, a in x.items()})
    np.testing.assert_allclose(chunked[:1, :13], first, atol=1e-5)

    def loss(fn, args):
        return jnp.sum(fn(**args, reset=reset)[0] ** 2)

    g_chunked = jax.grad(lambda a: loss(lambda **b: gated_delta_chunked(**b, chunk_size=chunk_size), a))(x)
    g_reference = jax.grad(lambda a: loss(gated_delta_reference, a))(x)
    for name in x:
        np.testing.assert_allclose(g_chunked[name], g_reference[name], atol=1e-4 * np.abs(g_reference[name]).max(),
                                   err_msg=name)
    assert np.all(np.asarray(g_chunked["initial_state"])[1] == 0)  # the second row's state is reset at token 0


def test_bfloat16_inputs_are_computed_in_float32():
    x = inputs()
    low = {n: jnp.asarray(a, jnp.bfloat16) if n != "initial_state" else a for n, a in x.items()}
    out, state = gated_delta_chunked(**low, chunk_size=8)
    ref_out, _ = gated_delta_reference(**{n: np.asarray(a, np.float32) for n, a in low.items()})
    assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=2e-2)


def test_key_heads_must_divide_value_heads():
    x = inputs(k_heads=3, heads=4)
    with pytest.raises(ValueError, match="3 key heads do not divide 4 value heads"):
        gated_delta_chunked(**x)


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_transformers_qwen3_next_gated_delta_rule_agrees(form):
    """An independent implementation: transformers' PyTorch forms of Qwen3-Next's rule (grouped heads, a start
    state, a length that is not a multiple of the chunk)."""
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_next import modeling_qwen3_next as qwen3_next

    x = inputs()
    args = [torch.from_numpy(x[n]) for n in ("q", "k", "v", "g", "beta")]
    start = torch.from_numpy(x["initial_state"])
    if form == "chunk":
        out, state = qwen3_next.torch_chunk_gated_delta_rule(*args, chunk_size=8, initial_state=start,
                                                             output_final_state=True)
    else:
        out, state = qwen3_next.torch_recurrent_gated_delta_rule(*args, initial_state=start, output_final_state=True)
    ours, our_state = gated_delta_chunked(**x, chunk_size=8)
    np.testing.assert_allclose(ours, out.numpy(), atol=1e-5)
    np.testing.assert_allclose(our_state, state.numpy(), atol=1e-5)
