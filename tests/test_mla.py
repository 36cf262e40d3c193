"""The MLA layer: absorbed decode equals materialised attention, cached decoding, cache bytes, configs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zebrax
from tests.helpers import random_params
from zebrax.cache import Cache, LatentCache, Slots
from zebrax.config import DeepseekV3Config, MLAConfig, RopeScaling
from zebrax.errors import ConfigError
from zebrax.generate import Generator
from zebrax.mixers.mla.layer import MLAttention
from zebrax.models import build

# Zebra's shape: K/V groups = the teacher's KV heads (2 of 6), low-rank query, no latent norms, YaRN
ZEBRA = MLAConfig(d_model=48, n_heads=6, kv_groups=2, q_lora_rank=40, kv_lora_rank=20, qk_nope_head_dim=8,
                  qk_rope_head_dim=8, v_head_dim=8, rope_scaling=RopeScaling("yarn", factor=32.0,
                                                                             original_max_position_embeddings=64))
# DeepSeek's shape: one K/V group per head, latent norms, interleaved RoPE pairs
DEEPSEEK = MLAConfig(d_model=48, n_heads=4, kv_groups=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=12,
                     qk_rope_head_dim=4, v_head_dim=12, q_latent_norm=True, kv_latent_norm=True, rope_interleave=True)


@pytest.mark.parametrize("tpu_cache", [False, True], ids=["latent_width", "tpu_width"])
@pytest.mark.parametrize("cfg", [ZEBRA, DEEPSEEK], ids=["zebra", "deepseek"])
def test_absorbed_equals_materialised(cfg, tpu_cache, rng):
    """fp32, 1e-5 of the output's largest value (two summation orders of fp32 values up to 8: an AVX-512 Xeon's
    differ by 1.2e-5 where an AVX2 EPYC's agree within 1e-5): over a whole sequence without a cache, and for one new
    token over a filled cache — also one allocated as for a TPU, 128 columns wide with zeros after the latent
    (``LatentCache``)."""
    from zebrax.ops.auto import compiling_for

    layer = MLAttention(cfg)
    x = jnp.asarray(rng.normal(size=(2, 13, cfg.d_model)), jnp.float32)
    slots = Slots.without_cache(jnp.broadcast_to(jnp.arange(13), (2, 13)), jnp.ones((2, 13), bool))
    params = random_params(layer, x, slots)
    apply = jax.jit(lambda *a, absorbed=False: layer.apply({"params": params}, *a, absorbed=absorbed),
                    static_argnames="absorbed")
    run = lambda absorbed, *a: apply(*a, absorbed=absorbed)[0]  # noqa: E731
    want = run(False, x, slots)
    assert float(jnp.std(want)) > 0.1
    tol = 1e-5 * float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(run(True, x, slots), want, rtol=0, atol=tol)

    with compiling_for("tpu" if tpu_cache else "cpu"):
        cache = Cache.init(2, 16, (MLAttention.init_cache(cfg, 2, 16, jnp.float32),))
    assert cache.layers[0].kv.shape[-1] == (128 if tpu_cache else cfg.latent_dim)
    prefill = cache.slots(slots.positions[:, :12], jnp.ones((2, 12), bool))
    _, filled = apply(x[:, :12], prefill, cache.layers[0])
    cache = cache.advance(prefill, (filled,), 12)
    step = cache.slots(jnp.full((2, 1), 12), jnp.ones((2, 1), bool))
    absorbed = run(True, x[:, 12:], step, cache.layers[0])
    np.testing.assert_allclose(absorbed, run(False, x[:, 12:], step, cache.layers[0]), rtol=0, atol=tol)
    np.testing.assert_allclose(absorbed, want[:, 12:], rtol=0, atol=tol)


def tiny_model(attention: MLAConfig, dtype="float32") -> zebrax.Model:
    config = DeepseekV3Config(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                              attention=attention, eos_token_id=(3,), dtype=dtype, param_dtype=dtype)
    module = build(config)
    return zebrax.Model(config, random_params(module, jnp.zeros((1, 1), jnp.int32)))


@pytest.mark.parametrize("cfg", [ZEBRA, DEEPSEEK], ids=["zebra", "deepseek"])
def test_prefill_then_decode_steps_equal_full_forward(cfg, rng):
    """Materialised prefill, then absorbed one-token steps, against one materialised pass: fp32, within 1e-5 of
    the largest logit (|logit| reaches ~12 here; the two paths sum in different orders across 3 layers)."""
    model = tiny_model(cfg)
    tokens = rng.integers(0, 97, (2, 20)).astype(np.int32)
    full = model.logits(tokens)
    atol = 1e-5 * float(np.abs(full).max())
    gen = Generator(model.module)
    prompt = np.concatenate([np.zeros((2, 3), np.int32), tokens[:, :9]], axis=1)  # 3 slots of left padding
    mask = np.concatenate([np.zeros((2, 3), bool), np.ones((2, 9), bool)], axis=1)
    logits, cache = gen.prefill(model.params, prompt, mask, max_len=23)
    np.testing.assert_allclose(logits, full[:, 8], rtol=0, atol=atol)
    step = jax.jit(gen.decode_step)
    for i in range(9, 20):
        logits, cache = step(model.params, cache, jnp.asarray(tokens[:, i]))
        np.testing.assert_allclose(logits, full[:, i], rtol=0, atol=atol)


@pytest.mark.parametrize("dtype, nbytes", [("float32", 4), ("bfloat16", 2)])
def test_cache_bytes_are_the_latent_width(dtype, nbytes):
    """Measured from the arrays the decode loop allocates: layers x (kv_lora_rank + qk_rope_head_dim) x bytes."""
    model = tiny_model(ZEBRA, dtype)
    assert model.cache_bytes_per_token() == 3 * (20 + 8) * nbytes and model.cache_state_bytes() == 0
    cache = model.module.init_cache(model.config, 1, 5)
    assert all(isinstance(c, LatentCache) and c.kv.shape == (1, 5, 28) and c.kv.dtype == jnp.dtype(dtype)
               for c in cache.layers)


@pytest.mark.parametrize(
    "changes, needles",
    [
        (dict(kv_groups=4), ["kv_groups=4", "n_heads=6"]),
        (dict(qk_rope_head_dim=7), ["qk_rope_head_dim=7", "even"]),
        (dict(kv_lora_rank=0), ["kv_lora_rank=0"]),
        (dict(q_lora_rank=-3), ["q_lora_rank=-3"]),
    ],
)
def test_bad_mla_config_names_the_fields(changes, needles):
    with pytest.raises(ConfigError) as e:
        MLAConfig(**{**ZEBRA.__dict__, **changes})
    for needle in needles:
        assert needle in str(e.value)


def test_lm_config_checks_the_attention_width_and_round_trips():
    with pytest.raises(ConfigError, match="attention.d_model=48 must equal hidden_size=64"):
        DeepseekV3Config(hidden_size=64, attention=ZEBRA)
    config = DeepseekV3Config(vocab_size=97, hidden_size=48, attention=ZEBRA)
    assert DeepseekV3Config.from_dict(config.to_dict()) == config
