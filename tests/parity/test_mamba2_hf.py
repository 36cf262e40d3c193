"""zebrax Mamba2 LM vs transformers' Mamba2ForCausalLM (its PyTorch path) on tiny random checkpoints (fp32)."""

from __future__ import annotations

import pytest

import zebrax
from tests.helpers import (
    TINY_MAMBA2S,
    assert_export_round_trip,
    assert_greedy_matches,
    assert_logits_match,
)

LOGIT_ATOL = 1e-4  # fp32, max |Δlogit|


@pytest.mark.parametrize("name", sorted(TINY_MAMBA2S))
def test_logits_match_transformers(tiny_mamba2, name, rng):
    hf, _, ckpt = tiny_mamba2(name)
    model = zebrax.load(ckpt)
    tokens = rng.integers(0, model.config.vocab_size, (2, 29))  # 29: odd, several chunks plus a ragged tail
    assert_logits_match(model, hf, tokens, LOGIT_ATOL)


@pytest.mark.parametrize("name", sorted(TINY_MAMBA2S))
def test_greedy_generation_matches_transformers(tiny_mamba2, name, rng):
    hf, _, ckpt = tiny_mamba2(name)
    model = zebrax.load(ckpt)
    prompt = rng.integers(4, model.config.vocab_size, (2, 9))
    assert_greedy_matches(model, hf, prompt, 16)


def test_left_padded_batch_equals_one_prompt_at_a_time(tiny_mamba2, rng):
    """Padding is a no-op step for the conv and the SSM state."""
    model = zebrax.load(tiny_mamba2("groups2_bias")[2])
    prompts = [rng.integers(4, model.config.vocab_size, n).tolist() for n in (2, 13, 6)]
    batched = model.generate(prompts, max_new_tokens=8, ignore_eos=True)
    for prompt, out in zip(prompts, batched, strict=True):
        assert out == model.generate([prompt], max_new_tokens=8, ignore_eos=True)[0]


def test_decode_state_is_constant_in_length(tiny_mamba2):
    model = zebrax.load(tiny_mamba2("groups2_bias")[2])
    m = model.config.mixer
    conv = (m.d_inner + 2 * m.n_groups * m.d_state) * (m.conv_kernel - 1) * 4
    per_layer = conv + m.n_heads * m.head_dim * m.d_state * 4
    assert model.cache_bytes_per_token() == 0
    assert model.cache_state_bytes() == model.config.num_hidden_layers * per_layer


def test_export_round_trip(tiny_mamba2, tmp_path, rng):
    hf, _, ckpt = tiny_mamba2("groups3_tied_bin")
    assert_export_round_trip(ckpt, hf, tmp_path / "hf", rng.integers(0, 90, (2, 11)))
