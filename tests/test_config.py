"""Configs: validation names the field, serialisation round-trips, HF translation, presets."""

from __future__ import annotations

import dataclasses

import pytest

from zebrax.config import LlamaConfig, RopeScaling
from zebrax.convert.hf_config import from_hf, to_hf
from zebrax.errors import ConfigError
from zebrax.models import abstract_params, logical_axes, param_count

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.mark.parametrize(
    "changes, needles",
    [
        (dict(num_key_value_heads=3), ["num_key_value_heads=3", "num_attention_heads=4"]),
        (dict(hidden_size=30), ["hidden_size=30", "num_attention_heads=4", "head_dim"]),
        (dict(head_dim=7), ["head_dim=7", "even"]),
        (dict(num_hidden_layers=0), ["num_hidden_layers=0"]),
        (dict(dtype="float8"), ["dtype='float8'"]),
        (dict(eos_token_id=(64,)), ["eos_token_id 64", "vocab_size=64"]),
        (dict(rms_norm_eps=0.0), ["rms_norm_eps"]),
    ],
)
def test_bad_llama_config_names_the_fields(changes, needles):
    with pytest.raises(ConfigError) as e:
        LlamaConfig(**{**TINY, **changes})
    for needle in needles:
        assert needle in str(e.value)


def test_bad_rope_scaling_names_the_fields():
    with pytest.raises(ConfigError, match="rope_type='yarnish'"):
        RopeScaling("yarnish")
    with pytest.raises(ConfigError, match="high_freq_factor=1.0, low_freq_factor=2.0"):
        RopeScaling("llama3", factor=8.0, low_freq_factor=2.0, high_freq_factor=1.0)


def test_dict_round_trip_and_unknown_fields():
    config = LlamaConfig(**TINY, rope_scaling=RopeScaling("llama3", 8.0), eos_token_id=(1, 2))
    assert LlamaConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"unknown fields \['hiden_size'\].*hidden_size"):
        LlamaConfig.from_dict({**config.to_dict(), "hiden_size": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hidden_size = 8


def test_from_hf_reads_both_transformers_generations():
    v4 = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rope_theta=500000.0, eos_token_id=[1, 2],
              rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192})
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**v4["rope_scaling"], "rope_theta": 500000.0}
    a, b = from_hf(LlamaConfig, v4), from_hf(LlamaConfig, v5)
    assert a == b and a.rope_theta == 500000.0 and a.rope_scaling.factor == 32.0 and a.eos_token_id == (1, 2)
    assert from_hf(LlamaConfig, to_hf(a)) == a


LOGICAL_AXES = {"embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "q_lora", "kv_lora", "kv_latent",
                "ssm_in", "ssm_conv", "conv", "ssm_heads", "ssm_inner"}


@pytest.mark.parametrize("family", ["llama", "mamba2", "deepseek_v3"])
def test_every_parameter_has_logical_axes_of_its_rank(family):
    import jax

    from zebrax.config import DeepseekV3Config, Mamba2Config, Mamba2LMConfig, MLAConfig

    config = {
        "llama": LlamaConfig(**TINY, attention_bias=True),
        "mamba2": Mamba2LMConfig(vocab_size=64, num_hidden_layers=2, mixer=Mamba2Config(
            d_model=32, d_inner=64, n_heads=4, head_dim=16, d_state=8, use_bias=True)),
        "deepseek_v3": DeepseekV3Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, attention=MLAConfig(
            d_model=32, n_heads=4, kv_groups=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=4,
            qk_rope_head_dim=4, v_head_dim=4, q_latent_norm=True, kv_latent_norm=True, attention_bias=True)),
    }[family]
    axes, shapes = logical_axes(config), abstract_params(config)
    leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    for names, shape in zip(leaves, jax.tree.leaves(shapes), strict=True):
        assert len(names) == len(shape.shape) and set(names) <= LOGICAL_AXES, (names, shape)
    if family == "llama":
        assert axes["layers_0"]["self_attn"]["o_proj"]["kernel"] == ("heads", "head_dim", "embed")


@pytest.mark.parametrize(
    "preset, params, cache_bytes",
    [
        # published parameter counts; KV cache in bf16: layers x 2 x kv_heads x head_dim x 2 bytes
        ("smollm2_135m", 134_515_008, 30 * 2 * 3 * 64 * 2),
        ("llama3_2_1b", 1_235_814_400, 16 * 2 * 8 * 64 * 2),
        ("llama3_2_3b", 3_212_749_824, 28 * 2 * 8 * 128 * 2),
        ("llama3_1_8b", 8_030_261_248, 32 * 2 * 8 * 128 * 2),
    ],
)
def test_presets_have_the_published_sizes(preset, params, cache_bytes):
    from zebrax.app.presets import preset_config
    from zebrax.models import cache_sizes

    config = preset_config(preset)
    assert param_count(config) == params
    assert cache_sizes(config) == (cache_bytes, 0)


def test_mamba2_preset_matches_transformers_parameter_count():
    """configs/models/mamba2_130m.gin against transformers' Mamba2ForCausalLM of the same sizes (meta device)."""
    import torch
    import transformers

    from zebrax.app.presets import preset_config
    from zebrax.models import cache_sizes

    config = preset_config("mamba2_130m")
    with torch.device("meta"):
        hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**to_hf(config)))
    assert param_count(config) == sum(p.numel() for p in hf.parameters()) == 128_989_632
    m = config.mixer  # bf16 conv state, fp32 SSM state, per layer; nothing grows with length
    state = ((m.d_inner + 2 * m.d_state) * (m.conv_kernel - 1) * 2 + m.n_heads * m.head_dim * m.d_state * 4) * 24
    assert cache_sizes(config) == (0, state)
