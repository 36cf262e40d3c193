"""Layer pieces against independent definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zebrax.config import RopeScaling
from zebrax.layers.rope import apply_rope, inv_frequencies


@pytest.mark.parametrize(
    "scaling",
    [
        RopeScaling(),
        RopeScaling("linear", factor=4.0),
        RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64),
    ],
)
def test_rope_frequencies_match_transformers(scaling):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": scaling.rope_type, "rope_theta": 500000.0}
    if scaling.rope_type != "default":
        params.update(factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
                      high_freq_factor=scaling.high_freq_factor,
                      original_max_position_embeddings=scaling.original_max_position_embeddings)
    config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=params)
    if scaling.rope_type == "default":
        want = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    else:
        want, _ = ROPE_INIT_FUNCTIONS[scaling.rope_type](config, "cpu")
    np.testing.assert_allclose(inv_frequencies(128, 500000.0, scaling), want.numpy(), rtol=1e-6)


def test_rope_is_a_rotation_and_relative():
    """Norms are kept, and <rope(q, m), rope(k, n)> depends only on m - n."""
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 1, 1, 1, 16)).astype(np.float32)
    inv = inv_frequencies(16, 10000.0, RopeScaling())

    def rot(x, pos):
        return np.asarray(apply_rope(x, np.array([[pos]]), inv))

    np.testing.assert_allclose(np.linalg.norm(rot(q, 37)), np.linalg.norm(q), rtol=1e-5)
    dot = lambda m, n: float((rot(q, m) * rot(k, n)).sum())  # noqa: E731
    np.testing.assert_allclose(dot(10, 3), dot(107, 100), rtol=1e-4)


@pytest.mark.parametrize("extra", [{}, {"mscale": 0.707, "mscale_all_dim": 0.707}, {"mscale_all_dim": 1.0}])
def test_yarn_frequencies_and_factors_match_transformers(extra):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from zebrax.layers.rope import attention_factor, softmax_scale

    params = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 32.0, "original_max_position_embeddings": 64,
              "beta_fast": 32.0, "beta_slow": 1.0, **extra}
    config = transformers.DeepseekV3Config(qk_rope_head_dim=16, qk_nope_head_dim=16, rope_parameters=params,
                                           max_position_embeddings=2048)
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    scaling = RopeScaling("yarn", factor=32.0, original_max_position_embeddings=64, **extra)
    np.testing.assert_allclose(inv_frequencies(16, 10000.0, scaling), want.numpy(), rtol=1e-6)
    np.testing.assert_allclose(attention_factor(scaling), want_factor, rtol=1e-7)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    np.testing.assert_allclose(softmax_scale(32, scaling), yarn_apply_mscale(params, 32 ** -0.5), rtol=1e-7)


@pytest.mark.parametrize("shape", [(3, 1), (2, 5), (4, 80)], ids=["decode", "few", "many"])
def test_an_embedding_lookup_of_few_tokens_slices_the_table_and_equals_the_gather(shape):
    """On a TPU up to ``FEW_TOKENS`` tokens are looked up by slicing the table (what a TPU reads without relaying
    the table out), more by a gather: the same rows, bit for bit (float32); the tied head is the table's product."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from zebrax.layers.linear import FEW_TOKENS, Embed
    from zebrax.ops.auto import compiling_for

    table = Embed(num_embeddings=97, features=24)
    params = nn.unbox(table.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    tokens = jax.random.randint(jax.random.PRNGKey(1), shape, 0, 97)
    with compiling_for("tpu"):  # the TPU's form, traced here (the ops run on the CPU)
        rows = table.apply(params, tokens)
        assert ("dynamic_slice" in str(jax.make_jaxpr(table.apply)(params, tokens))) == (tokens.size <= FEW_TOKENS)
    embedding = params["params"]["embedding"]
    assert (tokens.size <= FEW_TOKENS) == (shape != (4, 80))
    np.testing.assert_array_equal(rows, np.asarray(embedding)[np.asarray(tokens)])
    x = jax.random.normal(jax.random.PRNGKey(2), (*shape, 24))
    np.testing.assert_allclose(table.apply(params, x, method=Embed.attend), np.asarray(x) @ np.asarray(embedding).T,
                               rtol=1e-5, atol=1e-5)
