"""zebrax Llama vs transformers' LlamaForCausalLM on tiny random checkpoints (float32)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import zebrax
from tests.helpers import TINY_LLAMAS, assert_export_round_trip, assert_greedy_matches, assert_logits_match
from zebrax.models import param_count

LOGIT_ATOL = 1e-4  # fp32, max |Δlogit|


@pytest.mark.parametrize("name", sorted(TINY_LLAMAS))
def test_logits_match_transformers(tiny_llama, name, rng):
    hf, _, ckpt = tiny_llama(name)
    model = zebrax.load(ckpt)
    tokens = rng.integers(0, model.config.vocab_size, (3, 37))  # 37: not a power of two
    assert_logits_match(model, hf, tokens, LOGIT_ATOL)


@pytest.mark.parametrize("name", sorted(TINY_LLAMAS))
def test_greedy_generation_matches_transformers(tiny_llama, name, rng):
    hf, _, ckpt = tiny_llama(name)
    model = zebrax.load(ckpt)
    assert_greedy_matches(model, hf, rng.integers(4, model.config.vocab_size, (2, 11)), 20)


def test_config_translation_keeps_every_field(tiny_llama):
    hf, _, ckpt = tiny_llama("gqa_llama3_untied")
    config = zebrax.load(ckpt).config
    assert config.rope_scaling.rope_type == "llama3" and config.rope_scaling.original_max_position_embeddings == 32
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (6, 2, 12)
    assert not config.tie_word_embeddings and config.eos_token_id == (3,)
    assert param_count(zebrax.load(ckpt).config) == sum(p.numel() for p in hf.parameters())


def test_export_round_trip_reloads_in_transformers(tiny_llama, tmp_path, rng):
    """zebrax → HF directory → transformers gives the original model's logits; → zebrax again, the same params."""
    hf, _, ckpt = tiny_llama("tied_bias_bin")
    assert_export_round_trip(ckpt, hf, tmp_path / "hf", rng.integers(0, 150, (2, 13)))
    zebrax.convert(tmp_path / "hf", tmp_path / "zx")
    a, b = zebrax.load(ckpt).params, zebrax.load(tmp_path / "zx").params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bfloat16_parameters_and_compute_stay_close_to_float32(tiny_llama, rng):
    """dtype="bfloat16" stores and computes in bf16 (softmax and norms stay fp32): |Δlogit| <= 0.1 at std ~0.8."""
    _, _, ckpt = tiny_llama("gqa_llama3_untied")
    fp32, bf16 = zebrax.load(ckpt), zebrax.load(ckpt, dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16.params)} == {np.dtype("bfloat16")}
    tokens = rng.integers(0, fp32.config.vocab_size, (2, 37))
    np.testing.assert_allclose(bf16.logits(tokens), fp32.logits(tokens), rtol=0, atol=0.1)
    assert bf16.cache_bytes_per_token() == fp32.cache_bytes_per_token() // 2
