"""Generation: cached decoding equals the full forward pass; batching, EOS, sampling, compilation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zebrax
from zebrax.generate import Generator, bucket_length, sample

ATOL = 1e-5  # fp32


@pytest.fixture(scope="module")
def model(tiny_llama):
    return zebrax.load(tiny_llama("gqa_llama3_untied")[2])


@pytest.mark.parametrize("pad", [0, 5])
def test_prefill_then_decode_steps_equal_full_forward(model, rng, pad):
    """Prefill 9 tokens (after `pad` left-padding slots), then feed 7 one by one: every logit equals the
    full forward pass over the same 16 tokens."""
    tokens = rng.integers(0, model.config.vocab_size, (2, 16)).astype(np.int32)
    full = model.logits(tokens)
    gen = Generator(model.module)
    prompt = np.concatenate([np.zeros((2, pad), np.int32), tokens[:, :9]], axis=1)
    mask = np.concatenate([np.zeros((2, pad), bool), np.ones((2, 9), bool)], axis=1)
    logits, cache = gen.prefill(model.params, prompt, mask, max_len=pad + 16)
    np.testing.assert_allclose(logits, full[:, 8], rtol=0, atol=ATOL)
    step = gen.decode_step
    for i in range(9, 16):
        logits, cache = step(model.params, cache, jnp.asarray(tokens[:, i]))
        np.testing.assert_allclose(logits, full[:, i], rtol=0, atol=ATOL)
    assert int(cache.index) == pad + 16


def test_batched_prompts_of_different_lengths_equal_one_at_a_time(model, rng):
    prompts = [rng.integers(4, model.config.vocab_size, n).tolist() for n in (3, 11, 7)]
    batched = model.generate(prompts, max_new_tokens=10, ignore_eos=True)
    for prompt, out in zip(prompts, batched, strict=True):
        assert out == model.generate([prompt], max_new_tokens=10, ignore_eos=True)[0]


def test_rows_stop_at_eos_and_are_padded(model, rng):
    prompt = rng.integers(4, model.config.vocab_size, (2, 6))
    free = model.generate(prompt, max_new_tokens=12, ignore_eos=True)
    eos = int(free[0, 6 + 3])  # make row 0's fourth new token the end of sequence
    stopping = zebrax.Model(model.config.replace(eos_token_id=(eos,)), model.params)
    out = stopping.generate(prompt, max_new_tokens=12)
    first = 6 + int(np.argmax(free[0, 6:] == eos))
    np.testing.assert_array_equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first + 1:] == stopping.pad_id).all()
    as_list = stopping.generate(prompt.tolist(), max_new_tokens=12)
    assert as_list[0] == free[0, : first + 1].tolist()


def test_generation_stops_early_when_every_row_is_done(model, rng):
    prompt = rng.integers(4, model.config.vocab_size, (1, 5))
    free = model.generate(prompt, max_new_tokens=8, ignore_eos=True)
    stopping = zebrax.Model(model.config.replace(eos_token_id=(int(free[0, 6]),)), model.params)
    out = stopping.generate(prompt, max_new_tokens=8)
    assert out.shape[1] <= 7 and out[0, -1] == free[0, 6]


def test_new_prompt_lengths_and_step_counts_reuse_the_compiled_functions(model, rng):
    fresh = zebrax.Model(model.config, model.params)
    gen = fresh.generator
    for length, new in ((5, 3), (9, 7), (12, 2)):  # all in the same buckets: prompt 16, cache 32
        fresh.generate(rng.integers(4, 200, (2, length)), max_new_tokens=new, ignore_eos=True)
    assert gen.prefill._cache_size() == 1 and gen.decode._cache_size() == 1


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 16, 17, 100, 1024, 1025, 3000)] == [16, 16, 32, 128, 1024, 2048, 3072]


def test_sampling_is_seeded_and_temperature_zero_is_greedy(model, rng):
    prompt = rng.integers(4, model.config.vocab_size, (2, 6))
    a = model.generate(prompt, max_new_tokens=12, temperature=1.5, seed=1, ignore_eos=True)
    b = model.generate(prompt, max_new_tokens=12, temperature=1.5, seed=1, ignore_eos=True)
    c = model.generate(prompt, max_new_tokens=12, temperature=1.5, seed=2, ignore_eos=True)
    greedy = model.generate(prompt, max_new_tokens=12, ignore_eos=True)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    tiny_p = model.generate(prompt, max_new_tokens=12, temperature=1.5, top_p=1e-6, seed=3, ignore_eos=True)
    np.testing.assert_array_equal(tiny_p, greedy)


def test_sample_follows_softmax_and_top_p_cuts_the_tail():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.vmap(lambda k, t, p: sample(logits, k, t, p)[0], in_axes=(0, None, None))
    freq = np.bincount(np.asarray(draw(keys, 1.0, 1.0)), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    nucleus = np.bincount(np.asarray(draw(keys, 1.0, 0.7)), minlength=4) / 4000  # keeps {0.5, 0.3}
    assert nucleus[2:].sum() == 0
    np.testing.assert_allclose(nucleus[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)


def test_bad_generation_arguments_are_refused(model):
    for kwargs in (dict(max_new_tokens=0), dict(max_new_tokens=4, top_p=0.0), dict(max_new_tokens=4, temperature=-1)):
        with pytest.raises(zebrax.ZebraxError):
            model.generate([[5, 6]], **kwargs)
    with pytest.raises(zebrax.ZebraxError, match="at least one token"):
        model.generate([[]], max_new_tokens=3)
