"""The Mamba2 mixer in both shapes: cached decoding, the attention-shaped variant, configs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zebrax
from tests.helpers import random_model
from zebrax.config import Mamba2Config, Mamba2LMConfig
from zebrax.convert.hf_config import to_hf
from zebrax.errors import ConfigError
from zebrax.generate import Generator

STANDARD = Mamba2Config(d_model=32, d_inner=64, n_heads=4, head_dim=16, d_state=8, n_groups=2, chunk_size=8)
# Zebra's shape: x and B like V and K (2 KV heads), C like Q (one group per head), expand 1, d_state = head_dim
ATTENTION_SHAPED = Mamba2Config(d_model=32, d_inner=32, n_heads=4, head_dim=8, d_state=8, n_groups=4, xb_heads=2,
                                chunk_size=8)


def mamba2_lm(mixer: Mamba2Config, seed: int = 0) -> zebrax.Model:
    """A 2-layer LM with weights large enough that every path matters (kernels ~ N(0, 0.3²))."""
    return random_model(Mamba2LMConfig(vocab_size=97, num_hidden_layers=2, mixer=mixer, eos_token_id=(3,)), seed)


@pytest.mark.parametrize("mixer", [STANDARD, ATTENTION_SHAPED], ids=["standard", "attention_shaped"])
@pytest.mark.parametrize("pad", [0, 3])
def test_prefill_then_decode_steps_equal_full_forward(mixer, pad, rng):
    model = mamba2_lm(mixer)
    tokens = rng.integers(0, 97, (2, 21)).astype(np.int32)
    full = model.logits(tokens)
    assert full.std() > 0.3
    gen = Generator(model.module)
    prompt = np.concatenate([np.zeros((2, pad), np.int32), tokens[:, :11]], axis=1)
    mask = np.concatenate([np.zeros((2, pad), bool), np.ones((2, 11), bool)], axis=1)
    logits, cache = gen.prefill(model.params, prompt, mask, max_len=pad + 21)
    np.testing.assert_allclose(logits, full[:, 10], rtol=0, atol=1e-5)
    step = gen.decode_step
    for i in range(11, 21):
        logits, cache = step(model.params, cache, jnp.asarray(tokens[:, i]))
        np.testing.assert_allclose(logits, full[:, i], rtol=0, atol=1e-5)


def test_attention_shaped_equals_standard_with_repeated_weights(rng):
    """The attention-shaped mixer is the standard one (n_groups = heads) whose x and B rows of in_proj and
    conv channels are repeated per head: repeat-after-conv equals conv-after-repeat."""
    zebra = mamba2_lm(ATTENTION_SHAPED)
    m = ATTENTION_SHAPED
    expanded_cfg = Mamba2Config(**{**m.__dict__, "xb_heads": None})
    r = m.n_heads // m.xb_heads

    def widen(w, axis):  # columns [z | x | B | C | dt] (axis -1) or conv channels [x | B | C]
        sizes = m.in_proj_sizes() if w.shape[axis] == sum(m.in_proj_sizes().values()) else {
            k: v for k, v in m.in_proj_sizes().items() if k in "xBC"}
        parts = dict(zip(sizes, jnp.split(w, np.cumsum(list(sizes.values()))[:-1], axis=axis), strict=True))
        for name, width in (("x", m.head_dim), ("B", m.d_state)):
            p = parts[name]
            heads = p.reshape(*p.shape[:-1], m.xb_heads, width)
            parts[name] = jnp.repeat(heads, r, axis=-2).reshape(*p.shape[:-1], m.xb_heads * r * width)
        return jnp.concatenate(list(parts.values()), axis=axis)

    params = jax.tree.map(lambda p: p, zebra.params)
    for layer in ("layers_0", "layers_1"):
        mixer = dict(params[layer]["mixer"])
        mixer["in_proj"] = {"kernel": widen(mixer["in_proj"]["kernel"], -1)}
        mixer["conv_kernel"] = widen(mixer["conv_kernel"], -1)
        mixer["conv_bias"] = widen(mixer["conv_bias"], -1)
        params[layer] = {**params[layer], "mixer": mixer}
    standard = zebrax.Model(zebra.config.replace(mixer=expanded_cfg), params)
    tokens = rng.integers(0, 97, (2, 19))
    np.testing.assert_allclose(standard.logits(tokens), zebra.logits(tokens), rtol=0, atol=1e-5)


def test_pallas_impl_in_the_model_equals_chunked(rng):
    model = mamba2_lm(ATTENTION_SHAPED)
    pallas = zebrax.Model(model.config, model.params, impl="pallas")
    tokens = rng.integers(0, 97, (1, 13))
    np.testing.assert_allclose(pallas.logits(tokens), model.logits(tokens), rtol=0, atol=1e-4)


def test_attention_shaped_cache_sizes():
    model = mamba2_lm(ATTENTION_SHAPED)
    m = ATTENTION_SHAPED
    conv = (m.xb_heads * m.head_dim * 2 + m.n_groups * m.d_state) * (m.conv_kernel - 1) * 4
    ssm = m.n_heads * m.head_dim * m.d_state * 4
    assert model.cache_bytes_per_token() == 0 and model.cache_state_bytes() == 2 * (conv + ssm)


@pytest.mark.parametrize(
    "changes, needles",
    [
        (dict(n_groups=3), ["n_groups=3", "n_heads=4"]),
        (dict(d_inner=48), ["n_heads=4 x head_dim=16 = 64", "d_inner=48"]),
        (dict(xb_heads=3), ["xb_heads=3", "n_heads=4"]),
        (dict(dt_limit=(0.5, 0.1)), ["dt_limit"]),
        (dict(conv_kernel=0), ["conv_kernel=0"]),
    ],
)
def test_bad_mamba2_config_names_the_fields(changes, needles):
    with pytest.raises(ConfigError) as e:
        Mamba2Config(**{**STANDARD.__dict__, **changes})
    for needle in needles:
        assert needle in str(e.value)


def test_mamba2_lm_config_round_trips():
    config = Mamba2LMConfig(vocab_size=97, num_hidden_layers=2, mixer=ATTENTION_SHAPED)
    assert Mamba2LMConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="no attention-shaped mixer"):
        to_hf(config)
