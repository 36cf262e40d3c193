"""Every transformers config field that changes the computation is honoured (parity-tested here) or refused by
name; the rest are listed in ``hf_config.IGNORED`` with the reason. fp32, max |Δlogit| against transformers."""

from __future__ import annotations

import inspect
import json
import shutil

import numpy as np
import pytest
import torch
import transformers

import zebrax
from tests.helpers import assert_logits_match, save_hf
from zebrax.config import DeepseekV3Config, LlamaConfig, Mamba2LMConfig
from zebrax.convert.hf_config import IGNORED, from_hf, rope_from_hf
from zebrax.errors import ConfigError

LOGIT_ATOL = 1e-4


class Recording(dict):
    """A config dict that remembers which keys were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


ARCHS = {
    "llama": (transformers.LlamaConfig, LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, LlamaConfig, {"sliding_window": None}),
    "mamba2": (transformers.Mamba2Config, Mamba2LMConfig, {}),
    "deepseek_v3": (transformers.DeepseekV3Config, DeepseekV3Config,
                    {"num_hidden_layers": 4, "first_k_dense_replace": 4, "num_key_value_heads": 128}),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_transformers_field_is_read_or_ignored_for_a_stated_reason(arch):
    """The fields come from transformers' own config class, so a field added upstream fails this test until
    someone decides how zebrax treats it."""
    hf_cls, cls, overrides = ARCHS[arch]
    d = Recording({**hf_cls(**overrides).to_dict(), **overrides})
    from_hf(cls, d)
    fields = set(inspect.signature(hf_cls.__init__).parameters) - {"self", "kwargs"}
    undecided = sorted(fields - d.read - set(IGNORED[cls]))
    assert not undecided, f"{arch}: transformers fields neither read nor in IGNORED: {undecided}"
    assert all(reason for reason in IGNORED[cls].values())


def _tiny(cls, directory, seed=0, **kw):
    torch.manual_seed(seed)
    model = cls(kw.pop("config")).to(torch.float32).eval()
    save_hf(model, directory)
    return model


LLAMA = dict(vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)


@pytest.mark.parametrize("variant", [
    {"hidden_act": "gelu"},
    {"hidden_act": "relu"},
    {"hidden_act": "gelu_pytorch_tanh"},
    # YaRN on a Llama: cos/sin times the attention factor, which transformers applies to every rope type
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                         "original_max_position_embeddings": 16}},
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "attention_factor": 1.7,
                         "beta_fast": 32.0, "beta_slow": 1.0, "original_max_position_embeddings": 2048,
                         "truncate": False}},  # correction range (1.51, 3.77): truncation would change the ramp
], ids=["gelu", "relu", "gelu_tanh", "yarn", "yarn_explicit_untruncated"])
def test_llama_fields_that_change_the_computation_match_transformers(tmp_path, rng, variant):
    hf = _tiny(transformers.LlamaForCausalLM, tmp_path / "hf", config=transformers.LlamaConfig(**LLAMA, **variant))
    zebrax.convert(tmp_path / "hf", tmp_path / "zx")
    model = zebrax.load(tmp_path / "zx")
    assert_logits_match(model, hf, rng.integers(0, 101, (2, 40)), LOGIT_ATOL)


def test_a_context_stretched_by_yarn_is_transformers_yarn(tmp_path, rng):
    """``yarn_extended``: a Llama trained to 16 positions, stretched to 128, computes what transformers' Llama with
    YaRN of factor 8 over an original 16 does, at 100 tokens; a hybrid's MLA YaRN takes the factor that reaches the
    length from its own original; a config that reaches it comes back equal; ``llama3`` scaling is refused."""
    from tests.helpers import MIXED
    from tests.helpers import hybrid as hybrid_of
    from zebrax import checkpoint
    from zebrax.config import RopeScaling, yarn_extended

    short = dict(LLAMA, max_position_embeddings=16)
    hf = _tiny(transformers.LlamaForCausalLM, tmp_path / "hf", config=transformers.LlamaConfig(**short))
    zebrax.convert(tmp_path / "hf", tmp_path / "zx")
    trained = zebrax.load(tmp_path / "zx")
    stretched = yarn_extended(trained.config, 128)
    assert stretched.max_position_embeddings == 128 and stretched.rope_scaling.factor == 8.0
    (tmp_path / "long").mkdir()
    checkpoint.save(tmp_path / "long", stretched, trained.params)
    yarn = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(short, max_position_embeddings=128,
                                         rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                                          "original_max_position_embeddings": 16}))).eval()
    yarn.load_state_dict(hf.state_dict())
    assert_logits_match(zebrax.load(tmp_path / "long"), yarn, rng.integers(0, 101, (2, 100)), LOGIT_ATOL)

    hybrid = yarn_extended(hybrid_of([0, 3], rope_factor=1.0, rope_original_max_position_embeddings=32), 128)
    assert hybrid.mla.rope_scaling == RopeScaling("yarn", factor=4.0, original_max_position_embeddings=32)
    # its teacher's attention was trained to 128: plain RoPE reaches it
    assert hybrid.max_position_embeddings == 128 and hybrid.attention.rope_scaling.rope_type == "default"
    assert yarn_extended(hybrid, 64) == hybrid and yarn_extended(trained.config, 16) == trained.config
    assert yarn_extended(MIXED, 4096).mla == MIXED.mla  # the recipe's YaRN of factor 32 reaches 32 × 8,192
    llama3 = trained.config.replace(rope_scaling=RopeScaling("llama3", factor=8.0, original_max_position_embeddings=16))
    with pytest.raises(ConfigError, match="'llama3' cannot be stretched by YaRN"):
        yarn_extended(llama3, 256)


def test_mamba2_conv_activation_and_deepseek_mlp_activation_match_transformers(tmp_path, rng):
    mamba = _tiny(transformers.Mamba2ForCausalLM, tmp_path / "m", config=transformers.Mamba2Config(
        vocab_size=77, hidden_size=32, expand=2, num_heads=4, head_dim=16, n_groups=2, state_size=8,
        num_hidden_layers=2, chunk_size=8, hidden_act="gelu", initializer_range=0.1))
    zebrax.convert(tmp_path / "m", tmp_path / "mz")
    model = zebrax.load(tmp_path / "mz")
    assert model.config.mixer.activation == "gelu"
    assert_logits_match(model, mamba, rng.integers(0, 77, (2, 21)), LOGIT_ATOL)
    deepseek = _tiny(transformers.DeepseekV3ForCausalLM, tmp_path / "d", config=transformers.DeepseekV3Config(
        vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, first_k_dense_replace=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, hidden_act="relu", initializer_range=0.1, max_position_embeddings=64))
    zebrax.convert(tmp_path / "d", tmp_path / "dz")
    assert_logits_match(zebrax.load(tmp_path / "dz"), deepseek, rng.integers(0, 80, (2, 19)), LOGIT_ATOL)


@pytest.mark.parametrize("change, needles", [
    ({"hidden_act": "xielu"}, ["hidden_act='xielu'", "gelu"]),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, ["rope_type='dynamic'"]),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, ["rope_type='longrope'"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     ["partial_rotary_factor=0.5"]),
    ({"partial_rotary_factor": 0.25}, ["partial_rotary_factor=0.25"]),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32, "smoothing": 2}},
     ["unknown rope parameters", "smoothing"]),
    ({"model_type": "mistral", "sliding_window": 4096}, ["sliding_window=4096"]),
    ({"quantization_config": {"quant_method": "gptq"}}, ["quantization_config"]),
])
def test_fields_zebrax_does_not_compute_are_refused_by_name(capsys, tiny_llama, tmp_path, change, needles):
    from tests.helpers import assert_nothing_left, assert_one_line_error, convert_cli

    hf = shutil.copytree(tiny_llama("gqa_llama3_untied")[1], tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config.pop("rope_scaling", None)
    config.update(change)
    (hf / "config.json").write_text(json.dumps(config))
    code, err = convert_cli(capsys, hf, tmp_path / "out")
    assert_one_line_error(code, err, str(hf / "config.json"), *needles)
    assert_nothing_left(tmp_path / "out")


def test_yarn_without_a_factor_takes_the_ratio_of_the_context_lengths_as_transformers_does():
    rope = rope_from_hf({"rope_type": "yarn", "original_max_position_embeddings": 1024}, 4096)
    assert rope.factor == 4.0
    with pytest.raises(ConfigError, match="rope_type='su'"):
        rope_from_hf({"rope_type": "su"})


def test_saved_configs_without_the_new_fields_still_load(tiny_llama):
    """Checkpoints written before hidden_act / truncate existed read as SiLU and truncated YaRN."""
    d = zebrax.load(tiny_llama("gqa_llama3_untied")[2]).config.to_dict()
    del d["hidden_act"], d["rope_scaling"]["truncate"]
    config = LlamaConfig.from_dict(d)
    assert config.hidden_act == "silu" and config.rope_scaling.truncate
    np.testing.assert_equal(config.to_dict()["hidden_act"], "silu")
